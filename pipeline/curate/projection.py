"""`fc7 map`: 2-D coordinates for every image, for the map view of `fc7 serve --map`.

UMAP (umap-learn) keeps neighbourhoods: images that are near in embedding space land near on
the map. Vectors are L2-normalised (the cosine geometry of search) and reduced with PCA
first, as umap-learn advises for wide inputs. PCA alone (`--method pca`) is a fast linear
preview. Both are fitted on a seeded sample of at most `--sample` rows and then applied to
every row a batch at a time, so memory holds the sample, not the collection.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from sklearn.decomposition import PCA

from pipeline.curate.config import MapConfig
from pipeline.curate.output import check_out, staged_folder, write_manifest, write_results
from pipeline.curate.rows import check_fits, read_collection, vector_batches
from pipeline.errors import ConfigError
from pipeline.store import EmbeddingDataset

KIND = "fc7-map"


def make_map(config: MapConfig, data: EmbeddingDataset, report: Callable[[str], None]) -> dict:
    """Run `fc7 map`: fit the projection on a sample, place every image, write map.parquet
    and manifest.json to `config.out`; return the manifest.

    Raises:
        ConfigError: fewer than 3 images with an embedding, or a sample too large for memory.
        OutputError: --out holds something else, or a map without --overwrite.
    """
    check_out(Path(config.out), KIND, config.overwrite)  # before the work, not after
    started = time.perf_counter()
    collection = read_collection(data, config.batch_size)
    rows = len(collection.vector_rows)
    if rows < 3:
        raise ConfigError(f"{data.uri}: {rows} images with an embedding; a map needs 3 or more")
    sample_rows = np.sort(
        np.random.default_rng(config.seed).choice(rows, min(rows, config.sample), replace=False)
    )
    check_fits(len(sample_rows), data.provenance.dim, data.uri, "Use a smaller --sample")
    sample = _take(data, config.batch_size, sample_rows)
    report(f"fitting {config.method} on {len(sample_rows):,} of {rows:,} images")
    project = fit(config, sample)
    fitted = time.perf_counter() - started
    coordinates = np.empty((rows, 2), dtype=np.float32)
    start = 0
    for vectors in vector_batches(data, config.batch_size):
        coordinates[start : start + len(vectors)] = project(vectors)
        start += len(vectors)
    placed = collection.rows.take(pa.array(collection.vector_rows))
    table = pa.table({
        "id": placed["id"], "path": placed["path"], "label": placed["label"],
        "x": pa.array(coordinates[:, 0]), "y": pa.array(coordinates[:, 1]),
    })
    with staged_folder(Path(config.out), KIND, config.overwrite) as folder:
        write_results(folder, "map.parquet", table, data.provenance)
        return write_manifest(folder, KIND, data, {
            "method": config.method,
            "rows": rows,
            "sample": len(sample_rows),
            "pca": config.pca if config.method == "umap" else None,
            "neighbours": config.neighbours if config.method == "umap" else None,
            "min_dist": config.min_dist if config.method == "umap" else None,
            "seed": config.seed,
            "skipped_errors": len(collection) - rows,
            "seconds": {"fit": round(fitted, 3),
                        "total": round(time.perf_counter() - started, 3)},
        })


def fit(config: MapConfig, sample: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Fit the projection on `sample` (unit-length rows); return what places any rows.

    The sample's own coordinates come from the fitted embedding (UMAP's `embedding_`), the
    other rows' from `transform`, so a collection no larger than `--sample` is laid out
    exactly as UMAP fitted it.
    """
    components = min(config.pca if config.method == "umap" else 2, *sample.shape)
    pca = PCA(n_components=components, random_state=config.seed).fit(sample)
    if config.method == "pca":
        return lambda vectors: pca.transform(vectors)[:, :2].astype(np.float32)
    try:  # imported here: an optional dependency, slow to import
        import umap
    except ImportError as err:
        raise ConfigError(
            f"fc7 map --method umap needs umap-learn ({err}): pip install 'fc7[curate]', or "
            f"use --method pca"
        ) from None

    neighbours = min(config.neighbours, len(sample) - 1)
    reducer = umap.UMAP(
        n_neighbors=neighbours, min_dist=config.min_dist, random_state=config.seed,
        n_components=2,
    )
    reduced = pca.transform(sample)
    with warnings.catch_warnings():
        # "n_jobs overridden to 1 by setting random_state": the price of a reproducible map.
        warnings.filterwarnings("ignore", message=".*n_jobs.*")
        fitted = reducer.fit_transform(reduced).astype(np.float32)
    known = {row.tobytes(): i for i, row in enumerate(reduced)} if len(sample) < 10**6 else {}

    def place(vectors: np.ndarray) -> np.ndarray:
        reduced_rows = pca.transform(vectors)
        out = np.empty((len(vectors), 2), dtype=np.float32)
        seen = np.array([known.get(row.tobytes(), -1) for row in reduced_rows])
        out[seen >= 0] = fitted[seen[seen >= 0]]
        if (seen < 0).any():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*n_jobs.*")
                out[seen < 0] = reducer.transform(reduced_rows[seen < 0])
        return out

    return place


def _take(data: EmbeddingDataset, batch_size: int, wanted: np.ndarray) -> np.ndarray:
    """The unit-length vectors at vector rows `wanted` (ascending), in one pass."""
    out = np.empty((len(wanted), data.provenance.dim), dtype=np.float32)
    start = filled = 0
    for vectors in vector_batches(data, batch_size):
        rows = wanted[(wanted >= start) & (wanted < start + len(vectors))]
        out[filled : filled + len(rows)] = vectors[rows - start]
        filled += len(rows)
        start += len(vectors)
    return out


def summary(manifest: dict[str, Any], out: str) -> str:
    """What `fc7 map` prints when done."""
    return (
        f"{manifest['rows']:,} images placed with {manifest['method']} (fitted on "
        f"{manifest['sample']:,}) in {manifest['seconds']['total']:.1f} s\n"
        f"  {out}/map.parquet  id, path, label, x, y: show it with fc7 serve INDEX --map {out}"
    )
