"""Shared test fixtures: generated images, embeddings in the project's Parquet schema."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.provenance import Provenance
from pipeline.store import build_table, resolve, write_table_atomically

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CALTECH = SHARED / "datasets" / "caltech101" / "101_ObjectCategories"

needs_caltech = pytest.mark.skipif(not CALTECH.is_dir(), reason="../shared/datasets is absent")


def jpeg_bytes(seed: int, size: tuple[int, int] = (96, 72), quality: int = 90) -> bytes:
    """A smooth, seeded, photo-like JPEG (gradients plus a blob) of `size` (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(8, 40)
        blob = 120 * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * r * r))
        channels.append(128 + 60 * (a * xs / width + b * ys / height) + c * blob)
    array = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_labelled_folder(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """Folders `class_i/img_j.jpg` of generated JPEGs; returns `root`."""
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            (folder / f"img_{j}.jpg").write_bytes(jpeg_bytes(seed=1000 * c + j))
    return root


def test_provenance(dim: int = 64, **changes) -> Provenance:
    """Provenance for generated vectors (random:0 weights, a made-up sha256)."""
    fields = dict(weights="random:0", weights_sha256="0" * 64, layer="fc7", dim=dim)
    fields.update(changes)
    return Provenance(**fields).stamped()


test_provenance.__test__ = False  # a helper, not a test


def clustered_vectors(
    rows: int, dim: int, clusters: int = 20, spread: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Embedding-like data: non-negative vectors around `clusters` centres; returns (x, labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(1.0, 1.0, size=(clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, size=rows)
    noise = rng.normal(0, spread, size=(rows, dim)).astype(np.float32)
    return np.maximum(centres[labels] + noise, 0), labels


def write_embeddings(
    folder: Path,
    vectors: np.ndarray,
    labels: list[str | None] | None = None,
    provenance: Provenance | None = None,
    shards: int = 1,
    errors: list[str | None] | None = None,
    id_prefix: str = "img",
) -> Path:
    """Write vectors as an extraction output (Parquet parts) in `folder`; returns `folder`."""
    provenance = provenance or test_provenance(dim=vectors.shape[1])
    rows = len(vectors)
    ids = [f"{id_prefix}_{i:06d}.jpg" for i in range(rows)]
    labels = labels if labels is not None else [None] * rows
    errors = errors if errors is not None else [None] * rows
    folder.mkdir(parents=True, exist_ok=True)
    fs, base = resolve(str(folder))
    for shard, part in enumerate(np.array_split(np.arange(rows), shards)):
        table = build_table(
            provenance,
            [ids[i] for i in part],
            [f"/images/{ids[i]}" for i in part],
            [labels[i] for i in part],
            vectors[part],
            [errors[i] for i in part],
        )
        write_table_atomically(table, fs, f"{base}/part-{shard:05d}.parquet")
    return folder


@pytest.fixture
def labelled_images(tmp_path: Path) -> Path:
    """A folder of 3 classes x 4 generated JPEGs."""
    return write_labelled_folder(tmp_path / "images")
