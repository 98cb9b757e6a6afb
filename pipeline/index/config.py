"""The options of `fc7 index`: one validated model, also the command line."""

from __future__ import annotations

from typing import Literal

from pydantic import PositiveInt, field_validator, model_validator

from pipeline.config import Device, JobConfig, Size, option

# The kinds `--kind` names; any other value is a FAISS index factory string.
KINDS = ("auto", "flat", "hnsw", "ivf-flat", "ivf-pq")


class IndexConfig(JobConfig):
    """Options of `fc7 index` (and `jobs/build_index.py`, `configs/index.yaml`)."""

    embeddings: str = option(
        help="extraction output folder or URI (fc7 extract --out)", positional=True
    )
    out: str = option(help="index folder to write (local)")
    kind: str = option(
        "auto",
        "auto (by size and --max-memory), flat (exact), hnsw, ivf-flat, ivf-pq, or any FAISS "
        "index factory string",
    )
    metric: Literal["cosine", "l2", "ip"] = option(
        "cosine", "cosine (L2-normalised inner product), l2 or ip"
    )
    pca: PositiveInt | None = option(
        None, "reduce to D dimensions with PCA trained on the sample", metavar="D"
    )
    whiten: bool = option(False, "whiten the PCA output")
    max_memory: Size | None = option(
        None,
        "memory budget of the build, e.g. 8GB: --kind auto fits the index in what the training "
        "sample and batches leave, and other kinds are refused when they cannot fit; none "
        "means half the memory available now for the index",
        metavar="SIZE",
    )
    train_sample: PositiveInt = option(
        100_000, "rows drawn at random across all shards to train on", metavar="N"
    )
    eval_queries: int = option(
        500, "held-out queries for recall@10 (all rows when fewer)", metavar="N", ge=200
    )
    target_recall: float = option(
        0.95, "tune nprobe/efSearch to reach this recall@10", metavar="R", gt=0, le=1
    )
    batch_size: PositiveInt = option(8192, "rows read per batch", metavar="N")
    device: Device = option(
        "auto", "auto (GPU when FAISS has one), cpu or cuda (gpu is an alias)"
    )
    runner: Literal["auto", "local", "ray"] = option(
        "auto",
        "where IVF indexes are filled: local (this process), ray (tasks on the Ray cluster in "
        "RAY_ADDRESS, or a local Ray), auto (ray when RAY_ADDRESS is set and there are at "
        "least 1M rows)",
    )
    cpus_per_task: PositiveInt = option(
        1, "CPUs of each Ray task that fills a range of shards (--runner ray)", metavar="N"
    )
    seed: int = option(0, "seed of the training and query samples")
    keep: str | None = option(
        None,
        "index only the ids listed in this Parquet or CSV file's id column, e.g. the "
        "keep.parquet of fc7 duplicates",
        metavar="FILE",
    )
    add: bool = option(False, "append rows whose ids are not yet in --out, without retraining")
    overwrite: bool = option(
        False, "replace the fc7 index at --out (refused if the folder holds anything else)"
    )

    @field_validator("out")
    @classmethod
    def _local_out(cls, value: str) -> str:
        if "://" in value:
            raise ValueError("the index folder must be a local path (FAISS writes local files)")
        return value

    @model_validator(mode="after")
    def _add_keeps_the_index(self) -> IndexConfig:
        # --add appends to an index as it was built; other settings would be silently ignored.
        given = self.model_fields_set & {"kind", "metric", "pca", "whiten", "train_sample"}
        if self.add and given:
            flags = ", ".join("--" + name.replace("_", "-") for name in sorted(given))
            raise ValueError(f"--add keeps the index's own settings; drop {flags}")
        return self
