"""`fc7 map EMBEDDINGS --out DIR`: 2-D coordinates of every image (UMAP or PCA).

Also runs as `ray job submit --working-dir . -- python jobs/map.py EMBEDDINGS --out DIR`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `ray job submit`

from jobs import run  # noqa: E402
from pipeline.config import parse_config  # noqa: E402
from pipeline.curate import MapConfig  # noqa: E402
from pipeline.curate.projection import make_map, summary  # noqa: E402
from pipeline.store import EmbeddingDataset  # noqa: E402

DESCRIPTION = """Lay the collection out in two dimensions: UMAP (umap-learn) after PCA keeps
images that look alike close together; PCA alone is a fast linear preview. Fitted on a
sample of --sample images, then applied to all.

Writes DIR/map.parquet (id, path, label, x, y) and DIR/manifest.json; fc7 serve INDEX --map
DIR draws it."""
EPILOG = """examples:
  fc7 map out/embeddings --out out/map
  fc7 map out/embeddings --out out/map-preview --method pca
  fc7 serve out/index --map out/map"""


def main(argv: list[str] | None = None) -> int:
    config = parse_config(MapConfig, argv, "fc7 map", DESCRIPTION, EPILOG)
    data = EmbeddingDataset.open(config.embeddings)

    def report(line: str) -> None:
        print(f"fc7 map: {line}", file=sys.stderr)

    print(summary(make_map(config, data, report), config.out))
    return 0


if __name__ == "__main__":
    sys.exit(run("map", main, None))
