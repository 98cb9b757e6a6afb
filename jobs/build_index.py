"""`fc7 index EMBEDDINGS --out INDEX_DIR`: build (or `--add` to) a FAISS similarity index.

Also runs as `ray job submit --working-dir . -- python jobs/build_index.py EMBEDDINGS --out DIR`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import index  # noqa: E402  (sets OPENBLAS_CORETYPE before faiss loads)
from pipeline.cli import run  # noqa: E402
from pipeline.config import add_option, load_config, new_parser  # noqa: E402
from pipeline.index import IndexConfig  # noqa: E402
from pipeline.store import EmbeddingDataset  # noqa: E402


def parse(argv: list[str] | None) -> IndexConfig:
    parser = new_parser(
        prog="fc7 index",
        description="Build a FAISS index over an extraction output, measure its recall@10\n"
        "against exact search, and tune it to a target recall; or --add new rows to one.\n\n"
        "Scores at query time: cosine similarity (cosine), inner product (ip), or squared\n"
        "L2 distance (l2, lower is more similar).",
        epilog="examples:\n"
        "  fc7 index out/embeddings --out out/index\n"
        "  fc7 index out/embeddings --out out/index --kind hnsw --pca 256\n"
        "  fc7 index out/more-embeddings --out out/index --add",
    )
    parser.add_argument("embeddings", help="extraction output folder or URI (fc7 extract --out)")
    C = IndexConfig
    add_option(parser, "--out", C, "index folder to write (local)")
    add_option(
        parser,
        "--kind",
        C,
        "auto (by size and --max-memory), flat (exact), hnsw, "
        "ivf-flat, ivf-pq, or any FAISS index factory string",
    )
    add_option(
        parser,
        "--metric",
        C,
        "cosine (L2-normalised inner product), l2 or ip",
        choices=["cosine", "l2", "ip"],
    )
    add_option(
        parser,
        "--pca",
        C,
        "reduce to D dimensions with PCA trained on the sample",
        type=int,
        metavar="D",
    )
    add_option(parser, "--whiten", C, "whiten the PCA output", action="store_true")
    add_option(
        parser,
        "--max-memory",
        C,
        "memory budget for the index that --kind auto "
        "respects, e.g. 4GB; none means half this machine's memory",
    )
    add_option(
        parser,
        "--train-sample",
        C,
        "rows drawn at random across all shards to train on",
        type=int,
        metavar="N",
    )
    add_option(
        parser,
        "--eval-queries",
        C,
        "held-out queries for recall@10 (all rows when fewer)",
        type=int,
        metavar="N",
    )
    add_option(
        parser, "--target-recall", C, "tune nprobe/efSearch to reach this recall@10", type=float
    )
    add_option(parser, "--batch-size", C, "rows read per batch", type=int)
    add_option(
        parser,
        "--device",
        C,
        "auto (GPU when FAISS has one), cpu or gpu",
        choices=["auto", "cpu", "gpu"],
    )
    add_option(parser, "--seed", C, "seed of the training and query samples", type=int)
    add_option(
        parser,
        "--add",
        C,
        "append rows whose ids are not yet in --out, without retraining",
        action="store_true",
    )
    add_option(
        parser,
        "--overwrite",
        C,
        "replace the fc7 index at --out (refused if the folder holds anything else)",
        action="store_true",
    )
    return load_config(IndexConfig, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    config = parse(argv)
    if index.BLAS_NOTE:
        print(f"fc7 index: {index.BLAS_NOTE}", file=sys.stderr)
    data = EmbeddingDataset.open(config.embeddings)
    report = lambda line: print(f"fc7 index: {line}", file=sys.stderr)  # noqa: E731
    if config.add:
        result = index.add_to_index(config, data, report)
    else:
        result = index.build_index(config, data, report)
    print(index.summary(config, result))
    return 0


if __name__ == "__main__":
    sys.exit(run("index", main, None))
