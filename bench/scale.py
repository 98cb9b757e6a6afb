"""Planning at scale: the driver's peak memory and time to plan a million images, in one run.

Each case runs in a fresh child process that does what `fc7 extract SOURCE --out DIR --dry-run`
does, with the same functions: parse the options, load the weights (random:0), then
`prepare_output` + `write_plan(config, provenance, iter_inputs(source))`, then the dry run
(`pipeline.extract.dryrun.dry_run`: the plan summed up one shard at a time, the layout, a
32-image calibration). The cases:

  manifest   a .parquet manifest of --rows paths in 1,000 labels (the files need not exist)
  folder     a tree of --files empty files: 20 label folders x 10 subfolders
  s3         a prefix of --keys objects on a local S3 API (moto's server, as
             tests/test_object_store.py starts it), listed by pyarrow

Baselines, in the same run:
  imports    a child that does only the command's set-up (imports, weights, provenance): the
             floor of every driver, whatever the collection
  as list    the same inputs made into a Python list (`list(iter_inputs(source))`), after the
             same set-up: what a plan that does not stream would hold

Columns: peak RSS is the child's ru_maxrss (os.wait4), imports included; "+plan" and "+dry run"
are what planning, then the dry run, added to the child's peak over its RSS after set-up (the
peak is reset there through /proc/self/clear_refs); "as list" is the same for the list.

    python bench/scale.py                                  # 1,000,000 rows, 200,000 files,
                                                           # 100,000 keys (about 10 minutes)
    python bench/scale.py --rows 20000 --files 5000 --keys 2000     # a smoke run
    python bench/scale.py --keys 0                         # no S3 case
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MOTO = Path(sys.executable).with_name("moto_server")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
BUCKET = "bench"


# ---- children ---------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Make this process's peak RSS its current RSS, so that growth from here is measurable."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def child(mode: str, source: str, out: str) -> None:
    """Run one case in this (fresh) process and print its figures as JSON on the last line."""
    started = time.perf_counter()
    from jobs.extract import main  # noqa: F401  the command's imports, all of them
    from pipeline.config import parse_config
    from pipeline.extract import ExtractConfig, prepare_output, write_plan
    from pipeline.extract.dryrun import dry_run
    from pipeline.model import load_weights, make_provenance, resolve_precision
    from pipeline.sources import iter_inputs

    argv = [source, "--out", out, "--weights", "random:0", "--dry-run"]
    config = parse_config(ExtractConfig, argv, "fc7 extract", "")
    weights = load_weights(config.weights)
    provenance = make_provenance(weights, config.layer, config.dtype,
                                 precision=resolve_precision(config.precision, config.device))
    figures = {"setup_s": time.perf_counter() - started}
    resettable = _reset_peak()
    base = _status_kib("VmRSS")

    def growth() -> float | None:
        return (_status_kib("VmHWM") - base) / 1024 if resettable else None

    started = time.perf_counter()
    if mode == "list":
        figures["inputs"] = len(list(iter_inputs(config.source)))
        figures.update(list_s=time.perf_counter() - started, list_mb=growth())
    elif mode == "plan":
        plan = prepare_output(config, provenance) or write_plan(
            config, provenance, iter_inputs(config.source)
        )
        figures.update(inputs=plan.inputs, plan_s=time.perf_counter() - started,
                       plan_mb=growth())
        started = time.perf_counter()
        report = dry_run(config, plan, weights)
        figures.update(dry_s=time.perf_counter() - started, dry_mb=growth(),
                       summary=report.describe())
    print(json.dumps(figures))


def serve_s3(port: int, keys: int) -> None:
    """A moto S3 server with `keys` objects under photos/, put into its backend directly (an
    HTTP PUT each takes ~100x longer); prints `ready SECONDS` once filled."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    started = time.perf_counter()
    try:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        backend.create_bucket(BUCKET, "us-east-1")
        for i in range(keys):
            backend.put_object(BUCKET, f"photos/img_{i:07d}.jpg", b"x")
        print(f"ready {time.perf_counter() - started:.1f} direct", flush=True)
    except (ImportError, KeyError, AttributeError):  # moto's internals moved: go through HTTP
        print(f"ready {_upload(port, keys, 'photos'):.1f} http", flush=True)
    while True:
        time.sleep(3600)


def _s3(port: int):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                             region="us-east-1", access_key="test", secret_key="test",
                             allow_bucket_creation=True)


def _upload(port: int, keys: int, prefix: str) -> float:
    """PUT `keys` one-byte objects through pyarrow from 16 threads; returns the seconds."""
    s3 = _s3(port)
    s3.create_dir(BUCKET)

    def put(i: int) -> None:
        with s3.open_output_stream(f"{BUCKET}/{prefix}/img_{i:07d}.jpg") as stream:
            stream.write(b"x")

    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(keys)))
    return time.perf_counter() - started


# ---- the parent -------------------------------------------------------------------------


def run_child(mode: str, source: str, out: str, env: dict | None = None) -> dict:
    """One case in a fresh interpreter; its figures plus ru_maxrss and CPU time from wait4."""
    environment = {**os.environ, **(env or {})}
    environment.pop("RAY_ADDRESS", None)  # a dry run here sizes this machine, joins nothing
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(
            [sys.executable, __file__, "--child", mode, source, out],
            stdout=subprocess.PIPE, stderr=errors, text=True, env=environment,
        )
        output = process.stdout.read()
        # wait4 rather than Popen.wait: it also gives this child's own ru_maxrss and CPU time.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        process.stdout.close()
        if process.returncode:
            errors.seek(0)
            raise SystemExit(f"child {mode} {source} failed:\n{errors.read()[-3000:]}")
    figures = json.loads(output.strip().splitlines()[-1])
    figures["wall_s"] = time.perf_counter() - started
    figures["peak_mb"] = usage.ru_maxrss / 1024
    figures["cpu_s"] = usage.ru_utime + usage.ru_stime
    return figures


def make_manifest(root: Path, rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / "manifest.parquet"
    with pq.ParquetWriter(path, pa.schema([("path", pa.string()), ("label", pa.string())])) as w:
        for start in range(0, rows, 100_000):
            numbers = range(start, min(rows, start + 100_000))
            w.write_table(pa.table({
                "path": [f"images/label_{i % 1000:04d}/img_{i:07d}.jpg" for i in numbers],
                "label": [f"label_{i % 1000:04d}" for i in numbers],
            }))
    return path


def make_tree(root: Path, files: int) -> Path:
    """`files` empty .jpg files: 20 label folders x 10 subfolders."""
    tree = root / "tree"
    folders = [tree / f"label_{label:02d}" / f"part_{part}" for label in range(20)
               for part in range(10)]
    for folder in folders:
        folder.mkdir(parents=True)
    for i in range(files):
        (folders[i % len(folders)] / f"img_{i:07d}.jpg").touch()
    return tree


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3(keys: int) -> tuple[subprocess.Popen, int, str]:
    """The S3 server child, filled; returns it, its port and how it was filled."""
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve-s3", str(port), str(keys)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = server.stdout.readline().split()
    if not line or line[0] != "ready":
        server.terminate()
        raise SystemExit("the S3 server did not start (is moto[server] installed?)")
    return server, port, f"{keys:,} objects put in {float(line[1]):.1f} s ({line[2]})"


def mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="manifest rows; 0 skips the case (default: 1000000)")
    parser.add_argument("--files", type=int, default=200_000,
                        help="files in the folder tree; 0 skips the case (default: 200000)")
    parser.add_argument("--keys", type=int, default=100_000,
                        help="objects under the S3 prefix; 0 skips the case (default: 100000)")
    parser.add_argument("--http-sample", type=int, default=1000,
                        help="objects PUT over HTTP to time an upload (default: 1000)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--serve-s3", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.serve_s3:
        return serve_s3(*args.serve_s3)

    began = time.perf_counter()
    notes, rows = [], []
    with tempfile.TemporaryDirectory(prefix="fc7-scale-") as scratch:
        root = Path(scratch)
        baseline = run_child("imports", str(REPO / "examples/images"), str(root / "none"))
        cases = []
        if args.rows:
            started = time.perf_counter()
            cases.append(("manifest", f"{args.rows:,} rows", str(make_manifest(root, args.rows)),
                          {}))
            notes.append(f"manifest: {args.rows:,}-row .parquet written in "
                         f"{time.perf_counter() - started:.1f} s")
        if args.files:
            started = time.perf_counter()
            cases.append(("folder", f"{args.files:,} files", str(make_tree(root, args.files)),
                          {}))
            notes.append(f"folder: {args.files:,} empty files made in "
                         f"{time.perf_counter() - started:.1f} s")
        server = None
        try:
            if args.keys:
                if not MOTO.exists():
                    raise SystemExit("moto_server is not installed: pip install 'moto[server]' "
                                     "(or pass --keys 0)")
                server, port, filled = start_s3(args.keys)
                notes.append(f"s3: {filled}")
                if args.http_sample:
                    seconds = _upload(port, args.http_sample, "upload-sample")
                    rate = args.http_sample / seconds
                    notes.append(
                        f"s3: {args.http_sample:,} objects PUT over HTTP (16 threads) in "
                        f"{seconds:.1f} s = {rate:.0f}/s, so {args.keys:,} would take about "
                        f"{args.keys / rate:.0f} s; hence the direct fill")
                query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
                cases.append(("s3 prefix", f"{args.keys:,} keys",
                              f"s3://{BUCKET}/photos?{query}", CREDENTIALS))
            summaries = []
            for index, (name, size, source, env) in enumerate(cases):
                planned = run_child("plan", source, str(root / f"out{index}"), env)
                # Listing the S3 prefix again only to hold it as a list would double the
                # longest case; the plan's listing is pyarrow's whole list already.
                listed = run_child("list", source, str(root / "unused"), env) \
                    if name != "s3 prefix" else {}
                rows.append((name, size, planned, listed))
                summaries.append((name, planned["summary"]))
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)

    print(f"fc7 planning at scale: {sys.executable} bench/scale.py --rows {args.rows} --files "
          f"{args.files} --keys {args.keys}  ({os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB)")
    print()
    header = (f"{'case':<10} {'inputs':>16} {'plan s':>7} {'inputs/s':>9} {'dry-run s':>9} "
              f"{'CPU s':>6} {'peak RSS MB':>11} {'+plan MB':>8} {'+dry run MB':>11} "
              f"{'as list MB':>10} {'list/plan':>9}")
    print(header)
    print("-" * len(header))
    print(f"{'imports':<10} {'(set-up only)':>16} {'':>7} {'':>9} {'':>9} "
          f"{baseline['cpu_s']:>6.1f} {mb(baseline['peak_mb']):>11} {'':>8} {'':>11} {'':>10} "
          f"{'':>9}")
    for name, size, planned, listed in rows:
        ratio = (f"{listed['list_mb'] / planned['plan_mb']:.1f}x"
                 if listed.get("list_mb") and planned.get("plan_mb") else "-")
        print(f"{name:<10} {size:>16} {planned['plan_s']:>7.1f} "
              f"{planned['inputs'] / planned['plan_s']:>9,.0f} {planned['dry_s']:>9.1f} "
              f"{planned['cpu_s']:>6.1f} {mb(planned['peak_mb']):>11} {mb(planned['plan_mb']):>8} "
              f"{mb(planned['dry_mb']):>11} {mb(listed.get('list_mb')) if listed else '-':>10} "
              f"{ratio:>9}")
    print()
    for name, _, planned, _ in rows:
        if name in ("manifest", "folder"):
            added = max(planned["plan_mb"] or 0, planned["dry_mb"] or 0)
            verdict = "met" if added < 500 else "NOT met"
            print(f"goal, {name}: planning and the dry run add {added:,.0f} MB to the driver "
                  f"(< 500 MB: {verdict}); its peak RSS, {mb(planned['peak_mb'])} MB, is "
                  f"{mb(baseline['peak_mb'])} MB of imports and weights first")
    for note in notes:
        print(f"note, {note}")
    print(f"note, this benchmark took {time.perf_counter() - began:.0f} s")
    for name, summary in summaries:
        print(f"\n--- fc7 extract --dry-run, {name} case:\n{summary}")


if __name__ == "__main__":
    main()
