"""The options of `fc7 duplicates`, `fc7 audit` and `fc7 map`: one validated model per job."""

from __future__ import annotations

from typing import Literal

from pydantic import PositiveInt, field_validator, model_validator

from pipeline.config import JobConfig, option
from pipeline.neighbours import NEAR_DUPLICATE_COSINE

DEFAULT_THRESHOLD = NEAR_DUPLICATE_COSINE
# Neighbours searched per image for near-duplicate edges; rows whose last neighbour is still
# above the threshold are searched again with more (up to MAX_NEIGHBOURS).
DEFAULT_NEIGHBOURS = 16
MAX_NEIGHBOURS = 1024


class CurateConfig(JobConfig):
    """What the curation jobs share: the embeddings they read and a local folder they write."""

    embeddings: str = option(
        help="extraction output folder or URI (fc7 extract --out)", positional=True
    )
    out: str = option(help="folder to write (local)")

    @field_validator("out")
    @classmethod
    def _local_out(cls, value: str) -> str:
        if "://" in value:
            raise ValueError("the output folder must be a local path")
        return value


class DuplicatesConfig(CurateConfig):
    """Options of `fc7 duplicates` (and `jobs/duplicates.py`)."""

    out: str = option(help="folder for duplicates.parquet, keep.parquet and manifest.json")
    index: str | None = option(
        None,
        "a cosine index of these embeddings built by fc7 index: search it instead of holding "
        "all vectors in memory (for collections larger than memory)",
        metavar="INDEX_DIR",
    )
    threshold: float = option(
        DEFAULT_THRESHOLD,
        "cosine similarity at or above which two images are near-duplicates",
        metavar="T",
        gt=-1,
        le=1,
    )
    neighbours: PositiveInt = option(
        DEFAULT_NEIGHBOURS,
        f"neighbours searched per image (more where all are above --threshold, up to "
        f"{MAX_NEIGHBOURS})",
        flag="-k",
        metavar="K",
    )
    keep: Literal["first", "largest"] = option(
        "first",
        "which image of a group is kept: first (in the collection's order) or largest "
        "(most pixels)",
    )
    batch_size: PositiveInt = option(8192, "rows read per batch", metavar="N")
    overwrite: bool = option(False, "replace the fc7 duplicates output in --out")


class AuditConfig(CurateConfig):
    """Options of `fc7 audit` (and `jobs/audit.py`)."""

    embeddings: str = option(
        help="labelled extraction output (the training split) to audit", positional=True
    )
    out: str = option(help="folder for audit.parquet, report.md and manifest.json")
    test: str | None = option(
        None,
        "a test split's extraction output: its images that repeat a training image are leaks",
        metavar="EMBEDDINGS",
    )
    index: str | None = option(
        None,
        "a cosine index of the embeddings built by fc7 index: the k-NN graph comes from it "
        "(approximate, for large collections) instead of exact search",
        metavar="INDEX_DIR",
    )
    neighbours: Literal["faiss", "datalab"] = option(
        "faiss",
        "faiss: hand cleanlab's Datalab the k-NN graph FAISS found; datalab: leave Datalab to "
        "build its own with scikit-learn (slower; for comparison)",
    )
    k: PositiveInt = option(10, "neighbours per image in the k-NN graph", flag="-k", metavar="K")
    label_column: str = option("label", "column holding the class names")
    classifier: Literal["logreg", "knn", "sgd", "mlp"] = option(
        "logreg", "classifier whose out-of-fold probabilities rank label issues"
    )
    pca: PositiveInt | None = option(
        256, "reduce to D dimensions with PCA before the classifier (none: keep all)",
        metavar="D",
    )
    folds: int = option(5, "cross-validation folds for the out-of-fold probabilities",
                        metavar="K", ge=2)
    threshold: float = option(
        DEFAULT_THRESHOLD,
        "cosine similarity at or above which a test image repeats a training image",
        metavar="T",
        gt=-1,
        le=1,
    )
    top: PositiveInt = option(20, "findings of each kind shown in report.md", metavar="N")
    batch_size: PositiveInt = option(8192, "rows read per batch", metavar="N")
    seed: int = option(0, "seed of the folds and the classifier")
    overwrite: bool = option(False, "replace the fc7 audit output in --out")


    @model_validator(mode="after")
    def _one_graph(self) -> AuditConfig:
        if self.index and self.neighbours == "datalab":
            raise ValueError("--index gives Datalab FAISS's graph; --neighbours datalab asks "
                             "for Datalab's own: choose one")
        return self


class MapConfig(CurateConfig):
    """Options of `fc7 map` (and `jobs/map.py`)."""

    out: str = option(help="folder for map.parquet and manifest.json")
    method: Literal["umap", "pca"] = option(
        "umap", "umap (umap-learn: neighbourhoods kept) or pca (fast, linear preview)"
    )
    sample: PositiveInt = option(
        50_000,
        "rows the projection is fitted on (drawn at random); the others are transformed",
        metavar="N",
    )
    pca: PositiveInt = option(
        50, "umap: reduce to D dimensions with PCA first (umap-learn's advice)", metavar="D"
    )
    neighbours: int = option(15, "umap: n_neighbors", metavar="K", ge=2)
    min_dist: float = option(0.1, "umap: min_dist", metavar="D", ge=0)
    batch_size: PositiveInt = option(8192, "rows read per batch", metavar="N")
    seed: int = option(0, "seed of the sample and the projection")
    overwrite: bool = option(False, "replace the fc7 map output in --out")
