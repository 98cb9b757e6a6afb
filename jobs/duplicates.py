"""`fc7 duplicates EMBEDDINGS --out DIR`: exact and near-duplicate images, grouped.

Also runs as `ray job submit --working-dir . -- python jobs/duplicates.py EMBEDDINGS --out DIR`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `ray job submit`

from jobs import run  # noqa: E402
from pipeline.config import parse_config  # noqa: E402
from pipeline.curate import DuplicatesConfig  # noqa: E402
from pipeline.curate.duplicates import find_duplicates, summary  # noqa: E402
from pipeline.store import EmbeddingDataset  # noqa: E402

DESCRIPTION = """Find exact duplicates (same bytes: the sha256 fc7 extract stored, even for
images that failed to decode) and near-duplicates (cosine similarity of their embeddings at
or above --threshold), group them (a chain of near copies is one group), and pick the image
to keep in each group.

Writes DIR/duplicates.parquet (group, id, path, label, similarity to the kept image,
representative, kind: exact or near), DIR/keep.parquet (the images to keep: a manifest for
fc7 extract and fc7 index --keep) and DIR/manifest.json."""
EPILOG = """examples:
  fc7 duplicates out/embeddings --out out/duplicates
  fc7 duplicates out/embeddings --out out/duplicates --threshold 0.9 --keep largest
  fc7 duplicates out/embeddings --out out/duplicates --index out/index   # larger than memory
  fc7 index out/embeddings --out out/index-dedup --keep out/duplicates/keep.parquet"""


def main(argv: list[str] | None = None) -> int:
    config = parse_config(DuplicatesConfig, argv, "fc7 duplicates", DESCRIPTION, EPILOG)
    data = EmbeddingDataset.open(config.embeddings)

    def report(line: str) -> None:
        print(f"fc7 duplicates: {line}", file=sys.stderr)

    print(summary(find_duplicates(config, data, report), config.out))
    return 0


if __name__ == "__main__":
    sys.exit(run("duplicates", main, None))
