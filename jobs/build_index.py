"""`fc7 index EMBEDDINGS --out INDEX_DIR`: build (or `--add` to) a FAISS similarity index.

Also runs as `ray job submit --working-dir . -- python jobs/build_index.py EMBEDDINGS --out DIR`:
there, IVF indexes of 1M rows or more are filled by Ray tasks across the cluster (--runner).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `ray job submit`

from jobs import run  # noqa: E402
from pipeline.config import parse_config  # noqa: E402
from pipeline.index import BLAS_NOTE, IndexConfig, add_to_index, build_index, summary  # noqa: E402
from pipeline.store import EmbeddingDataset, read_id_list  # noqa: E402

DESCRIPTION = """Build a FAISS index over an extraction output, measure its recall@10
against exact search, and tune it to a target recall; or --add new rows to one.

Scores at query time: cosine similarity (cosine), inner product (ip), or squared
L2 distance (l2, lower is more similar)."""
EPILOG = """examples:
  fc7 index out/embeddings --out out/index
  fc7 index out/embeddings --out out/index --kind hnsw --pca 256
  fc7 index out/more-embeddings --out out/index --add
  RAY_ADDRESS=auto fc7 index out/embeddings --out out/index --kind ivf-pq --runner ray
  fc7 index out/embeddings --out out/index --max-memory 8GB
  fc7 index out/embeddings --out out/index --keep out/duplicates/keep.parquet"""


def main(argv: list[str] | None = None) -> int:
    config = parse_config(IndexConfig, argv, "fc7 index", DESCRIPTION, EPILOG)
    if BLAS_NOTE:
        print(f"fc7 index: {BLAS_NOTE}", file=sys.stderr)
    data = EmbeddingDataset.open(config.embeddings)
    if config.keep:
        data = data.keeping(read_id_list(config.keep))

    def report(line: str) -> None:
        print(f"fc7 index: {line}", file=sys.stderr)

    build = add_to_index if config.add else build_index
    print(summary(config, build(config, data, report)))
    return 0


if __name__ == "__main__":
    sys.exit(run("index", main, None))
