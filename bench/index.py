"""Benchmark `fc7 index` kinds against exact search on generated, clustered embeddings.

Writes `--rows` x `--dim` clustered non-negative vectors (embedding-like; random Gaussian data
makes every approximate index look broken) as an extraction output, then builds each kind in
its own process with `jobs/build_index.py` and reads its manifest: build time, peak resident
memory of the build process (from `wait4`), index size, recall@10 against exact search on the
same 500 held-out queries (same seed for every kind), and queries/s at the tuned
nprobe/efSearch. Each build also times exact search (FAISS's brute force over every row, the
oracle of its recall) for the same queries on the same machine state, so every kind's speed-up
is a ratio measured in its own run.

A kind is `KIND`, `KIND+pcaD` (adds --pca D) or either with `@ray` (adds --runner ray: the
vectors are added by Ray tasks on a local Ray, or on RAY_ADDRESS's cluster). A `@ray` build
records no exact search speed (its oracle runs in pieces on the workers); its ratio is taken
from the same kind built locally in the same run.

Example:
    python bench/index.py --rows 100000 --dim 4096 --work /tmp/fc7-bench-index
    python bench/index.py --rows 1000000 --dim 4096 --max-memory 8GB --kinds auto auto@ray
    python bench/index.py --rows 20000 --dim 512 --kinds flat hnsw ivf-pq+pca128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.fs import resolve  # noqa: E402
from pipeline.provenance import Provenance  # noqa: E402
from pipeline.store import build_table, write_table_atomically  # noqa: E402

DEFAULT_KINDS = ["flat", "hnsw", "ivf-flat", "ivf-pq", "hnsw+pca256", "ivf-pq+pca256"]


def write_dataset(folder: Path, rows: int, dim: int, dtype: str, seed: int) -> None:
    """Clustered vectors (gamma centres, Gaussian spread, clipped at 0), written in shards."""
    rng = np.random.default_rng(seed)
    clusters = max(10, rows // 100)
    centres = rng.gamma(1.0, 1.0, size=(clusters, dim)).astype(np.float32)
    provenance = Provenance(
        weights="random:0", weights_sha256="0" * 64, layer="fc7", dim=dim, dtype=dtype
    ).stamped()
    fs, base = resolve(str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    shard_rows = 10_000
    for shard, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        labels = rng.integers(0, clusters, size=n)
        x = np.maximum(centres[labels] + rng.normal(0, 0.3, (n, dim)).astype(np.float32), 0)
        ids = [f"vec_{start + i:08d}" for i in range(n)]
        table = build_table(
            provenance, ids, [f"/gen/{i}" for i in ids], [str(c) for c in labels], x, [None] * n
        )
        write_table_atomically(table, fs, f"{base}/part-{shard:05d}.parquet")


def run_kind(name: str, data: Path, work: Path, extra: list[str]) -> dict:
    spec, _, runner = name.partition("@")
    kind, _, option = spec.partition("+")
    out = work / f"index-{name.replace('+', '-').replace('@', '-')}"
    argv = [
        sys.executable,
        str(REPO / "jobs" / "build_index.py"),
        str(data),
        "--out",
        str(out),
        "--kind",
        kind,
        "--overwrite",
        *extra,
    ]
    if option:
        argv += ["--pca", option.removeprefix("pca")]
    if runner:
        argv += ["--runner", runner]
    started = time.perf_counter()
    log = work / f"{out.name}.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
        stdout = process.stdout.read()
        # wait4 gives this child's own peak RSS (Linux: KiB).
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        print(log.read_text()[-5000:], file=sys.stderr)
        raise SystemExit(f"{name}: fc7 index failed ({os.waitstatus_to_exitcode(status)})")
    print(stdout, flush=True)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["wall_seconds"] = wall
    manifest["process_peak_rss"] = usage.ru_maxrss * 1024
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="vectors (default: 100000)")
    parser.add_argument("--dim", type=int, default=4096, help="dimensions (default: 4096)")
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=DEFAULT_KINDS,
        help=f"kinds to build; KIND+pcaD adds --pca D (default: {' '.join(DEFAULT_KINDS)})",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float16",
        help="vector type on disk (default: float16)",
    )
    parser.add_argument(
        "--train-sample", type=int, default=50_000, help="training rows per kind (default: 50000)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/fc7-bench-index"),
        help="scratch folder (default: /tmp/fc7-bench-index)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data seed (default: 0)")
    parser.add_argument(
        "--max-memory", help="passed to every build, e.g. 8GB (default: none)"
    )
    args = parser.parse_args(argv)

    data = args.work / f"emb-{args.rows}x{args.dim}-{args.dtype}"
    if not data.exists():
        started = time.perf_counter()
        write_dataset(data, args.rows, args.dim, args.dtype, args.seed)
        print(
            f"wrote {args.rows:,} x {args.dim} {args.dtype} vectors to {data} in "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
    extra = ["--train-sample", str(args.train_sample)]
    if args.max_memory:
        extra += ["--max-memory", args.max_memory]
    results = {name: run_kind(name, data, args.work, extra) for name in args.kinds}
    first = results[args.kinds[0]]
    print(
        f"\n{args.rows:,} x {args.dim} clustered {args.dtype} vectors, "
        f"{first['recall_queries']} held-out queries, k=10"
        + (f", --max-memory {args.max_memory}" if args.max_memory else "")
    )
    header = (
        f"{'kind':<16} {'factory':<34} {'build s':>8} {'peak RSS':>9} {'index MB':>9} "
        f"{'recall@10':>9} {'params':<22} {'q/s':>8} {'exact q/s':>9} {'x exact':>8} "
        f"{'ms/query':>9}"
    )
    print(header)
    for name, m in results.items():
        params = ",".join(f"{k}={v}" for k, v in m["search_params"].items()) or "-"
        qps = m["queries_per_second"]
        # A @ray build's exact speed is the local build's of the same kind, in this run.
        exact = m.get("exact_queries_per_second") or results.get(name.partition("@")[0], {}).get(
            "exact_queries_per_second"
        )
        print(
            f"{name:<16} {m['factory']:<34} {m['build_seconds']['total']:>8.1f} "
            f"{m['process_peak_rss'] / 1e9:>8.2f}G {m['index_bytes'] / 1e6:>9.1f} "
            f"{m['recall_at_10']:>9.3f} {params:<22} {qps:>8.0f} "
            f"{exact or float('nan'):>9.1f} {qps / exact if exact else float('nan'):>8.1f} "
            f"{m['latency_ms']:>9.2f}"
        )
        steps = ", ".join(f"{k} {v:.0f} s" for k, v in m["build_seconds"].items())
        print(f"{'':<16} {steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
