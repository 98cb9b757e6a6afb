"""`fc7 audit EMBEDDINGS --out DIR`: suspected label errors, outliers and train/test leaks.

Also runs as `ray job submit --working-dir . -- python jobs/audit.py EMBEDDINGS --out DIR`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `ray job submit`

from jobs import run  # noqa: E402
from pipeline.config import parse_config  # noqa: E402
from pipeline.curate import AuditConfig  # noqa: E402
from pipeline.curate.audit import audit, summary  # noqa: E402
from pipeline.store import EmbeddingDataset  # noqa: E402

DESCRIPTION = """Audit a labelled collection with cleanlab's Datalab: suspected label errors
(ranked by out-of-fold probabilities of fc7 train's classifier), outliers and near-duplicates
(from the k-NN graph FAISS finds), under-represented classes, and with --test the test
images that repeat a training image (leaks).

Writes DIR/audit.parquet (one row per image: scores and flags), DIR/report.md (the top
findings with thumbnails) and DIR/manifest.json (counts, class sizes, timings)."""
EPILOG = """examples:
  fc7 audit out/embeddings --out out/audit
  fc7 audit out/train-embeddings --test out/test-embeddings --out out/audit
  fc7 audit out/embeddings --out out/audit --index out/index   # graph from the index
  fc7 audit out/embeddings --out out/audit-sk --neighbours datalab  # Datalab's own graph"""


def main(argv: list[str] | None = None) -> int:
    config = parse_config(AuditConfig, argv, "fc7 audit", DESCRIPTION, EPILOG)
    data = EmbeddingDataset.open(config.embeddings)

    def report(line: str) -> None:
        print(f"fc7 audit: {line}", file=sys.stderr)

    print(summary(audit(config, data, report), config.out))
    return 0


if __name__ == "__main__":
    sys.exit(run("audit", main, None))
