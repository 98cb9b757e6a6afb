"""Load test of `fc7 serve`: N concurrent clients on loopback, id queries then image queries.

Builds a collection with the real commands (`fc7 extract` with random:0 weights, `fc7 index`),
starts `fc7 serve` as its own process on a free port, then runs each phase for a bounded time
with N client threads (one httpx connection each) and reports queries/s, p50/p99 latency and
failed requests. With --screenshot, also photographs the search page in headless Chromium.

    python bench/serve.py                                  # Caltech-101 sample if ../shared has it
    python bench/serve.py --images photos/ --clients 8 --seconds 20
    python bench/serve.py --screenshot examples/screenshot.png
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CALTECH = REPO.parent / "shared" / "datasets" / "caltech101" / "101_ObjectCategories"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def fc7(*args: str) -> None:
    """Run an `fc7` subcommand exactly as a user would, failing loudly."""
    subprocess.run([sys.executable, "-m", "jobs.cli", *args], check=True, cwd=REPO)


def sample_manifest(images: Path, per_class: int, out: Path, seed: int = 0) -> Path:
    """A CSV manifest of up to `per_class` images from each subfolder of `images`."""
    rng = random.Random(seed)
    rows = []
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for file in rng.sample(files, min(per_class, len(files))):
            rows.append(
                {"path": str(file), "label": folder.name, "id": f"{folder.name}/{file.name}"}
            )
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label", "id"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def generated_images(folder: Path, classes: int = 10, per_class: int = 40) -> Path:
    """Seeded gradient-and-blob JPEGs in class folders, for machines without Caltech-101."""
    for c in range(classes):
        (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            rng = np.random.default_rng(1000 * c + j)
            ys, xs = np.mgrid[0:180, 0:240].astype(np.float32)
            base = rng.uniform(40, 200, 3)
            tilt = rng.uniform(-1, 1, (3, 2)) * 60
            array = np.stack(
                [base[k] + tilt[k, 0] * xs / 240 + tilt[k, 1] * ys / 180 for k in range(3)], axis=-1
            )
            buffer = io.BytesIO()
            Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(buffer, "JPEG")
            (folder / f"class_{c}" / f"img_{j}.jpg").write_bytes(buffer.getvalue())
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fc7 serve exited with status {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"fc7 serve did not answer on {url} within {timeout:.0f} s")


def load_phase(url: str, clients: int, seconds: float, request) -> dict:
    """`clients` threads call `request(http, rng)` in a loop for `seconds`; returns figures."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        mine, failed = [], []
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    response = request(http, rng)
                    if response.status_code != 200:
                        failed.append(f"{response.status_code}: {response.text[:200]}")
                        continue
                except httpx.HTTPError as err:
                    failed.append(repr(err))
                    continue
                mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)
            failures.extend(failed)

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "queries": len(latencies),
        "qps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "failed": len(failures),
        "first_failures": failures[:3],
    }


def screenshot(url: str, query: Path, out: Path) -> None:
    """Search the page for `query` in headless Chromium and save a compact PNG of it."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(url + "/")
        expect(page.locator("#info")).not_to_contain_text("loading")
        page.select_option("#k", "24")
        page.set_input_files("#file", str(query))
        expect(page.locator("#results .result").first).to_be_visible(timeout=60_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#results img')]"
            ".every((img) => img.complete && img.naturalWidth > 0)",
            timeout=60_000,
        )
        png = page.screenshot()
        browser.close()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    # A 256-colour palette keeps the README's image small; the page has few distinct colours.
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images",
        type=Path,
        default=CALTECH if CALTECH.is_dir() else None,
        help="folder of class subfolders (default: Caltech-101 when present, else generated JPEGs)",
    )
    parser.add_argument(
        "--per-class", type=int, default=10, help="images sampled per class folder (default: 10)"
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument(
        "--seconds", type=float, default=10, help="duration of each phase (default: 10)"
    )
    parser.add_argument("-k", type=int, default=10, help="results per query (default: 10)")
    parser.add_argument(
        "--screenshot",
        type=Path,
        default=None,
        help="also save a PNG of the search page here (default: none)",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fc7-bench-serve-") as tmp:
        work = Path(tmp)
        images = args.images or generated_images(work / "images")
        manifest = sample_manifest(images, args.per_class, work / "sample.csv")
        fc7("extract", str(manifest), "--out", str(work / "embeddings"), "--weights", "random:0")
        fc7("index", str(work / "embeddings"), "--out", str(work / "index"))
        with open(manifest) as handle:
            rows = list(csv.DictReader(handle))
        ids = [row["id"] for row in rows]
        payloads = [Path(row["path"]).read_bytes() for row in rows[:: max(1, len(rows) // 64)]]

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jobs.cli",
                "serve",
                str(work / "index"),
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
        try:
            wait_until_up(url, server)
            started = time.perf_counter()
            first = httpx.post(
                url + "/search", files={"image": ("q.jpg", payloads[0])}, timeout=300
            )
            first.raise_for_status()
            model_load = time.perf_counter() - started

            def by_id(http: httpx.Client, rng: random.Random) -> httpx.Response:
                return http.get("/search", params={"id": rng.choice(ids), "k": args.k})

            def by_image(http: httpx.Client, rng: random.Random) -> httpx.Response:
                return http.post(
                    "/search",
                    params={"k": args.k},
                    files={"image": ("q.jpg", rng.choice(payloads))},
                )

            results = {
                "id queries": load_phase(url, args.clients, args.seconds, by_id),
                "image queries": load_phase(url, args.clients, args.seconds, by_image),
            }
            if args.screenshot:
                screenshot(url, Path(rows[len(rows) // 3]["path"]), args.screenshot)
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(
        f"\nfc7 serve on 127.0.0.1, {len(ids):,} indexed images from {images}, "
        f"{args.clients} clients, {args.seconds:.0f} s per phase, k={args.k}, "
        f"{os.cpu_count()} CPUs (clients and server share them)"
    )
    print(f"first image query (loads the model): {model_load:.2f} s")
    print(
        f"{'phase':<14} {'queries':>8} {'queries/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}"
    )
    for phase, figures in results.items():
        print(
            f"{phase:<14} {figures['queries']:>8,} {figures['qps']:>10.1f} "
            f"{figures['p50_ms']:>8.1f} {figures['p99_ms']:>8.1f} {figures['failed']:>7}"
        )
        for failure in figures["first_failures"]:
            print(f"  failure: {failure}")
    if args.screenshot:
        print(f"screenshot: {args.screenshot} ({args.screenshot.stat().st_size:,} bytes)")
    failed = sum(figures["failed"] for figures in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
