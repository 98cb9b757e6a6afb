"""The Map view of `fc7 serve` at scale: load and draw 100,000 points in headless Chromium.

Writes a small index of generated vectors and synthetic map folders (clustered 2-D points in
50 labelled blobs; their ids need not be in the index to be drawn), then, for each size, starts
`fc7 serve INDEX --map MAP_DIR` as its own process and opens the page's Map view in Chromium:

    load      seconds the server takes at start-up to read map.parquet, check it and
              serialise and gzip /map (once; timed here in-process, on the same folders)
    /map      bytes of the answer, raw and gzipped
    fetch     ms to fetch /map (from the page's script)
    parse     ms to parse it and prepare colours and the hover grid
    first     ms from navigation to the first frame drawn
    draw      mean ms to draw one frame (points into the ImageData, put on the canvas)
    frame     mean and 95th-percentile ms between requestAnimationFrame callbacks while the
              mouse drags (pans) and wheels (zooms) the map (16.7 ms is 60 frames/s, the
              browser's ceiling: no frame missed)
    hover     mean ms to find the point under the cursor (the grid), over 2,000 positions

Each figure is printed beside the smallest size's, as a ratio, measured in the same run.

    python bench/serve_map.py                      # 10,000 and 100,000 points
    python bench/serve_map.py --points 10000 100000 1000000

With --screenshots DIR it measures nothing: it serves the folders given (an index and the
outputs of fc7 map, duplicates and audit) and saves the three views as 256-colour PNGs,
DIR/screenshot-map.png, -duplicates.png and -issues.png (as bench/serve.py --screenshot does
for the search page):

    python bench/serve_map.py --screenshots examples --index out/index --map out/map \\
        --duplicates out/duplicates --audit out/audit
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.fs import resolve  # noqa: E402
from pipeline.provenance import Provenance  # noqa: E402
from pipeline.search import SimilarityIndex  # noqa: E402
from pipeline.serve.curation import Curation  # noqa: E402
from pipeline.store import build_table, write_table_atomically  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]
INDEXED = 2000  # images in the index; the first map ids are theirs

# Runs in the page: drags and wheels are Playwright's; this records the frames meanwhile.
START_FRAMES = """() => {
    window.benchFrames = [];
    window.benchStop = false;
    const tick = (t) => {
        window.benchFrames.push(t);
        if (!window.benchStop) requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
}"""
HOVER = """(n) => {
    const canvas = document.getElementById("map-canvas");
    const rect = canvas.getBoundingClientRect();
    let found = 0;
    const started = performance.now();
    for (let k = 0; k < n; k++) {
        const x = rect.left + ((k * 7919) % rect.width);
        const y = rect.top + ((k * 104729) % rect.height);
        const move = { clientX: x, clientY: y, bubbles: true };
        canvas.parentElement.dispatchEvent(new PointerEvent("pointermove", move));
        if (!document.getElementById("map-tip").hidden) found += 1;
    }
    return [(performance.now() - started) / n, found];
}"""


def write_index(work: Path) -> Path:
    """An exact index of INDEXED generated 64-d vectors (ids img-00000, ...)."""
    rng = np.random.default_rng(0)
    vectors = rng.gamma(1.0, 1.0, size=(INDEXED, 64)).astype(np.float32)
    provenance = Provenance(weights="random:0", weights_sha256="0" * 64, layer="fc7", dim=64)
    ids = [f"img-{i:05d}" for i in range(INDEXED)]
    table = build_table(provenance.stamped(), ids, [f"/nowhere/{i}.jpg" for i in ids],
                        [None] * INDEXED, vectors, [None] * INDEXED)
    (work / "embeddings").mkdir()
    fs, base = resolve(str(work / "embeddings"))
    write_table_atomically(table, fs, f"{base}/part-00000.parquet")
    subprocess.run([sys.executable, "-m", "jobs.cli", "index", str(work / "embeddings"),
                    "--out", str(work / "index")], check=True, cwd=REPO, capture_output=True)
    return work / "index"


def write_map(folder: Path, points: int, seed: int = 0) -> Path:
    """map.parquet of `points` points in 50 labelled Gaussian blobs, and its manifest."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-20, 20, size=(50, 2))
    labels = rng.integers(0, 50, size=points)
    xy = centres[labels] + rng.normal(0, 1.2, size=(points, 2))
    ids = [f"img-{i:05d}" for i in range(points)]
    folder.mkdir(parents=True)
    pq.write_table(pa.table({
        "id": pa.array(ids, pa.string()),
        "path": pa.array([f"/nowhere/{i}.jpg" for i in ids], pa.string()),
        "label": pa.array([f"class_{c:02d}" for c in labels], pa.string()),
        "x": pa.array(xy[:, 0], pa.float32()),
        "y": pa.array(xy[:, 1], pa.float32()),
    }), folder / "map.parquet")
    manifest = {"kind": "fc7-map", "schema_version": 1, "method": "pca", "rows": points}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_seconds(index: Path, map_dir: Path) -> float:
    """What `fc7 serve --map` does with the folder at start-up, timed."""
    opened = SimilarityIndex.open(index, device="cpu")
    started = time.perf_counter()
    Curation.load(opened, str(index), map_dir=str(map_dir))
    return time.perf_counter() - started


def start_server(index: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`fc7 serve INDEX OPTIONS` on a free port, once it answers; the process and its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "serve", str(index), *options, "--port", str(port),
         "--device", "cpu", "--log-level", "warning"],
        cwd=REPO, env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"fc7 serve exited with status {server.returncode}")
        try:
            httpx.get(url + "/health", timeout=2)
            return server, url
        except httpx.TransportError:
            time.sleep(0.05)


def save(page, path: Path) -> None:
    image = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    # A 256-colour palette keeps the README's images small.
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"screenshot: {path} ({path.stat().st_size:,} bytes)")


def screenshots(browser, out: Path, index: Path, folders: dict[str, Path]) -> None:
    """The Map (hovering a point), Duplicates and Issues views of the folders, as PNGs."""
    options = [f"--{name}={folder}" for name, folder in folders.items()]
    server, url = start_server(index, *options)
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(url + "/#view=map")
        page.wait_for_function("() => fc7map.stats().firstFrameMs !== null", timeout=120_000)
        box = page.locator("#map-frame").bounding_box()
        # Hover the first point found from a little left of the centre, going right.
        for step in range(200):
            page.mouse.move(box["x"] + box["width"] * 0.4 + 2 * step, box["y"] + box["height"] / 2)
            if page.locator("#map-tip").is_visible():
                break
        page.wait_for_function(
            "() => { const img = document.getElementById('map-tip-image');"
            " return img.hidden || (img.complete && img.naturalWidth > 0); }"
        )
        save(page, out / "screenshot-map.png")
        for view, ready in (("duplicates", "#duplicates-list img"), ("issues", "#issues-list img")):
            page.click(f'#tabs button[data-view="{view}"]')
            page.wait_for_selector(ready)
            # Thumbnails load lazily: wait for those on screen.
            page.wait_for_function(
                f"() => [...document.querySelectorAll('{ready}')]"
                ".filter((img) => { const r = img.getBoundingClientRect();"
                " return r.top < innerHeight && r.left < innerWidth && r.right > 0; })"
                ".every((img) => img.complete && img.naturalWidth > 0)", timeout=60_000
            )
            save(page, out / f"screenshot-{view}.png")
        page.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def measure(browser, index: Path, map_dir: Path) -> dict[str, float]:
    server, url = start_server(index, "--map", str(map_dir))
    try:
        raw = len(httpx.get(url + "/map", headers={"accept-encoding": "identity"}).content)
        gzipped = int(httpx.get(url + "/map").headers["content-length"])
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(url + "/#view=map")
        page.wait_for_function("() => fc7map.stats().firstFrameMs !== null", timeout=120_000)
        first = page.evaluate("() => fc7map.stats()")
        box = page.locator("#map-frame").bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.evaluate(START_FRAMES)
        for _ in range(3):  # pan: drag a third of the width and back
            page.mouse.move(cx, cy)
            page.mouse.down()
            page.mouse.move(cx + box["width"] / 3, cy + 40, steps=40)
            page.mouse.move(cx, cy, steps=40)
            page.mouse.up()
        for delta in [-120] * 15 + [120] * 15:  # zoom in, then out, around the centre
            page.mouse.wheel(0, delta)
            page.wait_for_timeout(16)
        page.evaluate("() => { window.benchStop = true; }")
        frames = np.diff(np.asarray(page.evaluate("() => window.benchFrames")))
        after = page.evaluate("() => fc7map.stats()")
        hover_ms, hovered = page.evaluate(HOVER, 2000)
        page.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "load_s": load_seconds(index, map_dir),
        "raw_mb": raw / 1e6,
        "gzip_mb": gzipped / 1e6,
        "fetch_ms": first["fetchMs"],
        "parse_ms": first["parseMs"],
        "first_ms": first["firstFrameMs"],
        "draw_ms": after["drawMs"] / after["frames"],
        "draws": after["frames"],
        "frame_ms": float(frames.mean()),
        "frame_p95_ms": float(np.percentile(frames, 95)),
        "hover_ms": hover_ms,
        "hovered": hovered,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[10_000, 100_000],
                        help="map sizes; the first is the baseline (default: 10000 100000)")
    parser.add_argument("--screenshots", type=Path, default=None, metavar="DIR",
                        help="save screenshots of the views of the folders below in DIR "
                        "instead of measuring (default: none)")
    parser.add_argument("--index", type=Path, default=None,
                        help="--screenshots: the index to serve (default: none)")
    for name in ("map", "duplicates", "audit"):
        parser.add_argument(f"--{name}", type=Path, default=None,
                            help=f"--screenshots: a folder made by fc7 {name} (default: none)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    if args.screenshots:
        folders = {name: getattr(args, name) for name in ("map", "duplicates", "audit")}
        if args.index is None or None in folders.values():
            parser.error("--screenshots needs --index, --map, --duplicates and --audit")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            screenshots(browser, args.screenshots, args.index, folders)
            browser.close()
        return 0

    results = {}
    with tempfile.TemporaryDirectory(prefix="fc7-bench-map-") as tmp, sync_playwright() as pw:
        work = Path(tmp)
        index = write_index(work)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for points in args.points:
            results[points] = measure(browser, index, write_map(work / f"map-{points}", points))
        browser.close()

    base = results[args.points[0]]
    print(f"\nfc7 serve --map in headless Chromium (1200x760 viewport, no GPU), "
          f"{os.cpu_count()} CPUs; ratio: to {args.points[0]:,} points, same run")
    columns = [("load_s", "load s", 2), ("raw_mb", "/map MB", 1), ("gzip_mb", "gzip MB", 1),
               ("fetch_ms", "fetch ms", 0), ("parse_ms", "parse ms", 0),
               ("first_ms", "first ms", 0), ("draw_ms", "draw ms", 1),
               ("frame_ms", "frame ms", 1), ("frame_p95_ms", "p95 ms", 1),
               ("hover_ms", "hover ms", 3)]
    print(f"{'points':>9} " + " ".join(f"{title:>9}" for _, title, _ in columns))
    for points, figures in results.items():
        print(f"{points:>9,} " + " ".join(
            f"{figures[key]:>9.{digits}f}" for key, _, digits in columns))
        if points != args.points[0]:
            print(f"{'ratio':>9} " + " ".join(
                f"{figures[key] / base[key]:>8.1f}x" for key, _, _ in columns))
    for points, figures in results.items():
        print(f"{points:,} points: {figures['draws']} frames drawn while panning and zooming; "
              f"hover found a point at {figures['hovered']} of 2,000 positions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
