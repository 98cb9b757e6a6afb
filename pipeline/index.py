"""FAISS mechanics: choose, train, fill, evaluate, tune, save and load a similarity index.

The user-facing query API is `pipeline.search`; the `fc7 index` job is `jobs/build_index.py`.

An index folder holds three files that must agree, and `load_index` checks that they do:
- `index.faiss`: the FAISS index (vectors L2-normalised first when the metric is cosine);
- `ids.parquet`: FAISS position -> id, path, label, provenance in its schema metadata;
- `manifest.json`: kind, factory string, metric, PCA, count, dim, tuned search parameters,
  recall@10 against exact search, latency, the embeddings' provenance, the source datasets'
  fingerprints and the sha256 of the other two files (so a corrupt file is named, not used).

`load_index` also checks what a matching sha256 cannot vouch for: the FAISS index's own
structure, metric, dimension and count, and `ids.parquet`'s page checksums and schema version.
`--overwrite` and `--add` replace a folder holding these three files and nothing else.

Building reads the embeddings twice and never holds more than the index, one batch and the
training sample in memory: pass 1 draws the training sample and the evaluation queries at
random positions across all shards; pass 2 adds every row to the index while keeping the exact
top-k of the evaluation queries (the oracle for recall@10).

The OpenBLAS bundled in the faiss wheels (0.3.15) does not recognise recent CPUs and falls back
to its slowest kernels, which made exact search 4.6x slower on the machine this was written on.
OpenBLAS reads `OPENBLAS_CORETYPE` once, when faiss loads it, so this module sets it from
/proc/cpuinfo before importing faiss, unless the user set it (see `BLAS_NOTE`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from pipeline import __version__
from pipeline.config import JobConfig, parse_size
from pipeline.errors import ArtifactError, ConfigError, OutputError
from pipeline.provenance import PARQUET_METADATA_KEY, Provenance, file_sha256
from pipeline.sources import normalize_source
from pipeline.store import (
    EmbeddingDataset,
    describe_entries,
    embeddings_to_numpy,
    foreign_entries,
    read_parquet,
)

log = logging.getLogger(__name__)


def openblas_coretype(cpuinfo: str) -> str | None:
    """The OpenBLAS core type whose kernels this CPU runs, from /proc/cpuinfo's flags.

    Example:
        >>> openblas_coretype("flags : fpu avx2 fma")
        'Haswell'
    """
    match = re.search(r"^flags\s*:(.*)$", cpuinfo, flags=re.MULTILINE)
    flags = set(match.group(1).split()) if match else set()
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def _configure_openblas() -> str | None:
    if "OPENBLAS_CORETYPE" in os.environ:
        return None  # the user's choice wins
    if "faiss" in sys.modules:
        return "faiss was imported before fc7 could set OPENBLAS_CORETYPE; set it yourself"
    try:
        with open("/proc/cpuinfo") as file:
            core = openblas_coretype(file.read())
    except OSError:
        return None
    if core is None:
        return None
    os.environ["OPENBLAS_CORETYPE"] = core
    return (
        f"set OPENBLAS_CORETYPE={core} from this CPU's flags (faiss's bundled OpenBLAS may not "
        f"recognise it and fall back to slow kernels); set it yourself to override"
    )


BLAS_NOTE = _configure_openblas()
if BLAS_NOTE:
    log.info(BLAS_NOTE)

import faiss  # noqa: E402  (after OPENBLAS_CORETYPE is set)

INDEX_SCHEMA_VERSION = 1
INDEX_FORMAT = "fc7-index"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
MANIFEST_FILE = "manifest.json"
IDS_METADATA_KEY = b"fc7.index"
# Everything fc7 writes in an index folder; --overwrite and --add replace nothing else.
INDEX_FOLDER_FILES = frozenset({INDEX_FILE, IDS_FILE, MANIFEST_FILE})

KINDS = ("auto", "flat", "hnsw", "ivf-flat", "ivf-pq")
RECALL_K = 10
# Below this many rows exact search answers in milliseconds: no approximation needed.
EXACT_MAX_ROWS = 20_000
HNSW_M = 32
REFINE_K_FACTORS = (8, 32)
SCORES = {
    "cosine": "cosine similarity (higher is more similar)",
    "ip": "inner product (higher is more similar)",
    "l2": "squared L2 distance (lower is more similar)",
}
_EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024, 2048)


class IndexConfig(JobConfig):
    """Options of `fc7 index` (and `jobs/build_index.py`)."""

    embeddings: str
    out: str
    kind: str = "auto"
    metric: Literal["cosine", "l2", "ip"] = "cosine"
    pca: int | None = Field(default=None, ge=1)
    whiten: bool = False
    max_memory: str | None = None
    train_sample: int = Field(default=100_000, ge=1)
    eval_queries: int = Field(default=500, ge=200)
    target_recall: float = Field(default=0.95, gt=0, le=1)
    batch_size: int = Field(default=8192, ge=1)
    device: Literal["auto", "cpu", "gpu"] = "auto"
    seed: int = 0
    add: bool = False
    overwrite: bool = False

    @field_validator("max_memory")
    @classmethod
    def _check_memory(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

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


def machine_memory() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------
# Choosing the index


@dataclass(frozen=True)
class IndexPlan:
    """What to build: a FAISS factory string and why it was chosen."""

    kind: str
    factory: str
    reason: str
    needs_training: bool


def plan_index(
    kind: str,
    rows: int,
    dim: int,
    metric: str,
    pca: int | None = None,
    whiten: bool = False,
    budget: int | None = None,
    train_rows: int | None = None,
) -> IndexPlan:
    """The FAISS factory string for `kind` at this size, dimension and memory budget.

    `auto` picks exact search for small collections, HNSW while full vectors fit in the budget,
    IVF-PQ with 8-bit re-ranking while those fit, then IVF-PQ (after a random-rotation PCA to at
    most 256 dimensions) sized to the budget. Any other string is used as a factory string.

    Raises:
        ConfigError: `--pca` larger than the dimension, or a factory string FAISS rejects.

    Example:
        >>> plan_index("ivf-flat", rows=100_000, dim=256, metric="cosine").factory
        'IVF1024,Flat'
    """
    if pca is not None and pca > dim:
        raise ConfigError(f"--pca {pca}: larger than the embeddings' dimension {dim}")
    train_rows = rows if train_rows is None else train_rows
    budget = budget or machine_memory() // 2
    width = pca or dim
    prefix = ""
    if pca:
        prefix = f"{'PCAW' if whiten else 'PCA'}{pca},"
    if pca and whiten and metric == "cosine":
        # Whitening rescales axes, so distances there no longer map to cosines; normalising
        # again makes scores the cosine similarity in the whitened space.
        prefix += "L2norm,"
    reason = f"--kind {kind}"
    if kind == "auto":
        flat_bytes = rows * width * 4
        if rows <= EXACT_MAX_ROWS and flat_bytes <= budget:
            kind, reason = "flat", f"auto: {rows:,} rows is small enough for exact search"
        elif rows * (width * 4 + 8 * HNSW_M + 64) <= budget:
            kind, reason = "hnsw", f"auto: full vectors and graph fit in {_size(budget)}"
        elif rows * (width + width // 8 + 16) <= budget:
            kind, reason = "ivf-pq", f"auto: 8-bit vectors for re-ranking fit in {_size(budget)}"
        else:
            if not pca and dim > 256:
                width, prefix = 256, "PCAR256,"
            m = _divisor_at_most(width, max(1, min(width // 4, 2 * budget // max(rows, 1))))
            nlist = _nlist(rows, train_rows)
            factory = f"{prefix}IVF{nlist},PQ{m}x4fs"
            reason = f"auto: only {m // 2}-byte PQ codes fit in {_size(budget)}"
            return IndexPlan("ivf-pq", factory, reason, True)
    if kind == "flat":
        factory = f"{prefix}Flat"
    elif kind == "hnsw":
        factory = f"{prefix}HNSW{HNSW_M}"
    elif kind == "ivf-flat":
        factory = f"{prefix}IVF{_nlist(rows, train_rows)},Flat"
    elif kind == "ivf-pq":
        m = _divisor_at_most(width, max(1, width // 4))
        factory = f"{prefix}IVF{_nlist(rows, train_rows)},PQ{m}x4fs,Refine(SQ8)"
    else:
        factory = kind
        try:
            faiss.index_factory(dim, factory, metric_type(metric))
        except RuntimeError as err:
            raise ConfigError(
                f"--kind {kind}: not one of {', '.join(KINDS)} nor a FAISS index factory string "
                f"for dimension {dim} ({_faiss_message(err)})"
            ) from None
        kind = "factory"
    needs_training = not faiss.index_factory(dim, factory, metric_type(metric)).is_trained
    return IndexPlan(kind, factory, reason, needs_training)


def metric_type(metric: str) -> int:
    """The FAISS metric used for `cosine`, `ip` or `l2`.

    Cosine indexes hold L2-normalised vectors and search them by L2 distance, which ranks them
    exactly as cosine does (|x - y|^2 = 2 - 2 cos) but stays right after a PCA (which centres
    the data, changing inner products but not distances) and suits IVF residual codes better.
    `scores` turns the distances back into cosine similarities.
    """
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def scores(distances: np.ndarray, metric: str) -> np.ndarray:
    """FAISS distances as the scores users see: cosine similarity, inner product or L2^2."""
    return 1.0 - distances / 2.0 if metric == "cosine" else distances


def _nlist(rows: int, train_rows: int) -> int:
    # About 4 sqrt(n) lists, a power of two, with at least 39 training points per centroid
    # (below that FAISS warns and the clustering is poor).
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(rows))))
    return int(max(1, min(target, train_rows // 39, 65536)))


def _divisor_at_most(width: int, limit: int) -> int:
    return max(m for m in range(1, min(width, limit) + 1) if width % m == 0)


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} TB"


def _faiss_message(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Error:"):
            return line.removeprefix("Error:").strip().strip("'")
    return lines[-1] if lines else "faiss error"


# ---------------------------------------------------------------------------------------------
# The parts of a FAISS index


def walk(index: faiss.Index) -> Iterator[faiss.Index]:
    """`index` and the indexes inside it (pre-transform, refine, HNSW storage), downcast."""
    index = faiss.downcast_index(index)
    yield index
    for attr in ("index", "base_index", "refine_index", "storage"):
        inner = getattr(index, attr, None)
        if isinstance(inner, faiss.Index):
            yield from walk(inner)


def _parts(index: faiss.Index, kind: type) -> list[Any]:
    return [part for part in walk(index) if isinstance(part, kind)]


def prepare_for_training(index: faiss.Index) -> None:
    """Turn off polysemous training (minutes of work for a feature we do not use)."""
    for part in walk(index):
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    for part in _parts(index, faiss.IndexRefine):
        part.k_factor = REFINE_K_FACTORS[0]


def search_settings(index: faiss.Index) -> list[dict[str, int]]:
    """The search parameter values to try, cheapest first (nprobe or efSearch, k_factor)."""
    settings: list[dict[str, int]] = [{}]
    ivfs = _parts(index, faiss.IndexIVF)
    if ivfs:
        nlist = ivfs[0].nlist
        probes = [2**i for i in range(int(math.log2(nlist)) + 1)]
        settings = [{"nprobe": p} for p in probes + ([nlist] if nlist & (nlist - 1) else [])]
    elif _parts(index, faiss.IndexHNSW):
        settings = [{"efSearch": ef} for ef in _EF_SEARCH]
    if _parts(index, faiss.IndexRefine):
        # Re-ranking more candidates is cheap next to probing more lists.
        settings = [{**s, "k_factor": f} for s in settings for f in REFINE_K_FACTORS]
    return settings


def apply_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set nprobe / efSearch on the parts of `index` that have them.

    Raises:
        ArtifactError: a parameter that no part of this index has.
    """
    for name, value in params.items():
        kind = {
            "nprobe": faiss.IndexIVF,
            "efSearch": faiss.IndexHNSW,
            "k_factor": faiss.IndexRefine,
        }.get(name)
        parts = _parts(index, kind) if kind else []
        if not parts:
            raise ArtifactError(f"search parameter {name}: this index has no part that uses it")
        for part in parts:
            if name == "nprobe":
                part.nprobe = int(value)
            elif name == "k_factor":
                part.k_factor = float(value)
            else:
                part.hnsw.efSearch = int(value)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as float32."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def gpu_count() -> int:
    """GPUs FAISS can use here (0 with faiss-cpu or without CUDA)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def to_gpu(index: faiss.Index) -> tuple[faiss.Index, Any] | None:
    """A GPU copy of `index` and its resources, or None when FAISS has no GPU version of it."""
    if gpu_count() == 0:
        return None
    try:
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, index), resources
    except (RuntimeError, AttributeError) as err:
        log.info("staying on CPU: %s", _faiss_message(err))
        return None


# ---------------------------------------------------------------------------------------------
# Building


@dataclass
class _Oracle:
    """Exact top-k of the evaluation queries, updated batch by batch."""

    queries: np.ndarray
    metric: str
    k: int
    scores: np.ndarray = field(init=False)
    ids: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        rows = len(self.queries)
        self.scores = np.full((rows, 0), -np.inf, dtype=np.float32)
        self.ids = np.zeros((rows, 0), dtype=np.int64)
        self.query_norms = (self.queries**2).sum(1)[:, None]

    def update(self, vectors: np.ndarray, first_position: int) -> None:
        scores = self.queries @ vectors.T  # higher is better for every metric below
        if self.metric == "l2":
            scores = 2 * scores - self.query_norms - (vectors**2).sum(1)[None, :]
        ids = np.broadcast_to(
            np.arange(first_position, first_position + len(vectors)), scores.shape
        )
        scores = np.concatenate([self.scores, scores], axis=1)
        ids = np.concatenate([self.ids, ids], axis=1)
        if scores.shape[1] > self.k:
            keep = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
            scores = np.take_along_axis(scores, keep, axis=1)
            ids = np.take_along_axis(ids, keep, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")
        self.scores = np.take_along_axis(scores, order, axis=1)
        self.ids = np.take_along_axis(ids, order, axis=1)


def recall_at_k(found: np.ndarray, exact: np.ndarray, self_positions: np.ndarray, k: int) -> float:
    """Mean share of the exact top-k found, leaving each query's own position out of both."""
    if k <= 0:
        return 1.0
    total = 0
    for row, own in enumerate(self_positions):
        mine = [i for i in found[row] if i != own and i >= 0][:k]
        truth = [i for i in exact[row] if i != own][:k]
        total += len(set(mine) & set(truth)) / max(len(truth), 1)
    return total / len(self_positions)


@dataclass
class Evaluation:
    """Recall and speed of an index at its chosen search parameters."""

    params: dict[str, int]
    recall: float
    queries: int
    queries_per_second: float
    latency_ms: float
    reached_target: bool
    tried: list[dict[str, Any]]


def evaluate(
    index: faiss.Index,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    self_positions: np.ndarray,
    target_recall: float,
) -> Evaluation:
    """Tune nprobe/efSearch to the cheapest value reaching `target_recall`; measure speed.

    Recall@10 counts how many of each query's exact 10 nearest neighbours (itself left out)
    the index returns in its first 10. When no value reaches the target, the best is kept and
    `reached_target` is False.
    """
    k = min(RECALL_K, index.ntotal - 1)
    tried = []
    best = None
    for params in search_settings(index):
        apply_search_params(index, params)
        started = time.perf_counter()
        _, found = index.search(queries, k + 1)
        seconds = time.perf_counter() - started
        recall = recall_at_k(found, exact_ids, self_positions, k)
        tried.append(
            {**params, "recall_at_10": round(recall, 4), "qps": round(len(queries) / seconds)}
        )
        if best is None or recall > best[1] + 1e-9:
            best = (params, recall)
        if recall >= target_recall:
            best = (params, recall)
            break
    params, recall = best
    apply_search_params(index, params)
    started = time.perf_counter()
    index.search(queries, k + 1)
    qps = len(queries) / (time.perf_counter() - started)
    singles = []
    for row in queries[: min(len(queries), 100)]:
        started = time.perf_counter()
        index.search(row[None, :], k + 1)
        singles.append(time.perf_counter() - started)
    return Evaluation(
        params,
        recall,
        len(queries),
        qps,
        1000 * float(np.median(singles)),
        recall >= target_recall,
        tried,
    )


@dataclass
class BuildResult:
    """What `build_index` and `add_to_index` did."""

    manifest: dict[str, Any]
    added: int
    skipped_errors: int
    skipped_duplicates: int
    seconds: dict[str, float]
    evaluation: Evaluation | None
    plan: IndexPlan | None = None
    on_gpu: bool = False


def _sample_positions(
    rows: int, queries: int, train: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    query_positions = np.sort(rng.choice(rows, size=min(queries, rows), replace=False))
    rest = np.setdiff1d(np.arange(rows), query_positions, assume_unique=True)
    # Training rows are held apart from the evaluation queries when there are enough rows.
    pool = rest if len(rest) >= min(train, rows) else np.arange(rows)
    train_positions = np.sort(rng.choice(pool, size=min(train, len(pool)), replace=False))
    return query_positions, train_positions


def _gather(data: EmbeddingDataset, wanted: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """The embeddings at sorted dataset positions (rows without errors), for each list."""
    out = [np.zeros((len(w), data.provenance.dim), dtype=np.float32) for w in wanted]
    offset = 0
    for batch in data.batches(["embedding"], batch_size=batch_size):
        end = offset + batch.num_rows
        for target, positions in zip(out, wanted, strict=True):
            lo, hi = np.searchsorted(positions, [offset, end])
            if hi > lo:
                rows = pa.array(positions[lo:hi] - offset)
                target[lo:hi] = embeddings_to_numpy(batch.column("embedding").take(rows))
        offset = end
    return out


def build_index(
    config: IndexConfig, data: EmbeddingDataset, report: Callable[[str], None] = log.info
) -> BuildResult:
    """Build an index folder at `config.out` from `data` (written atomically).

    Args:
        config: the job's options (kind, metric, pca, memory budget, sample sizes, ...).
        data: the embeddings, opened with `EmbeddingDataset.open`.
        report: called with progress lines.

    Returns:
        The manifest written and the counts, timings and evaluation.

    Raises:
        OutputError: `config.out` is an index and --overwrite was not given, holds files fc7
            did not write, or is not a folder.
        ArtifactError: the embeddings hold no rows without errors, or a damaged part file.
        ConfigError: an invalid kind or PCA dimension for these embeddings.

    Example:
        >>> config = IndexConfig(embeddings="out/emb", out="out/index")  # doctest: +SKIP
        >>> build_index(config, EmbeddingDataset.open(config.embeddings)).manifest["kind"]
        'flat'
    """
    out = Path(config.out)
    check_index_out(out, replace=config.overwrite)
    started = time.perf_counter()
    rows = data.count()
    total = data.count(with_errors=True)
    if rows == 0:
        raise ArtifactError(f"{data.uri}: no rows without errors to index ({total:,} rows)")
    dim = data.provenance.dim
    budget = parse_size(config.max_memory) if config.max_memory else machine_memory() // 2
    train_rows = min(config.train_sample, rows)
    plan = plan_index(
        config.kind, rows, dim, config.metric, config.pca, config.whiten, budget, train_rows
    )
    report(f"plan: {plan.factory} ({plan.reason})")
    index = faiss.index_factory(dim, plan.factory, metric_type(config.metric))
    prepare_for_training(index)
    rng = np.random.default_rng(config.seed)
    query_positions, train_positions = _sample_positions(
        rows, config.eval_queries, train_rows if plan.needs_training else 0, rng
    )
    queries, sample = _gather(data, [query_positions, train_positions], config.batch_size)
    if config.metric == "cosine":
        queries, sample = normalise(queries), normalise(sample)
    seconds = {"read_sample": time.perf_counter() - started}

    gpu = to_gpu(index) if config.device != "cpu" else None
    if config.device == "gpu" and gpu is None:
        raise ConfigError(f"--device gpu: FAISS has no GPU here for {plan.factory}")
    working = gpu[0] if gpu else index
    if plan.needs_training:
        report(f"training on {len(sample):,} rows sampled across all shards")
        mark = time.perf_counter()
        working.train(sample)
        seconds["train"] = time.perf_counter() - mark
    del sample

    mark = time.perf_counter()
    oracle = _Oracle(queries, config.metric, RECALL_K + 1)
    self_positions = np.full(len(query_positions), -1, dtype=np.int64)
    ids: list[str] = []
    paths: list[str] = []
    labels: list[str | None] = []
    seen: set[str] = set()
    duplicates = 0
    offset = 0
    for batch in data.batches(["id", "path", "label", "embedding"], config.batch_size):
        batch_ids = batch.column("id").to_pylist()
        keep = []
        for row, item in enumerate(batch_ids):
            if item in seen:
                duplicates += 1
            else:
                seen.add(item)
                keep.append(row)
        lo, hi = np.searchsorted(query_positions, [offset, offset + batch.num_rows])
        for q in range(lo, hi):
            row = int(query_positions[q] - offset)
            if keep and row in keep:
                self_positions[q] = len(ids) + keep.index(row)
        offset += batch.num_rows
        if len(keep) < batch.num_rows:
            batch = batch.take(pa.array(keep, pa.int64()))
        if not batch.num_rows:
            continue
        vectors = embeddings_to_numpy(batch.column("embedding"))
        if config.metric == "cosine":
            vectors = normalise(vectors)
        oracle.update(vectors, len(ids))
        working.add(vectors)
        ids += batch.column("id").to_pylist()
        paths += batch.column("path").to_pylist()
        labels += batch.column("label").to_pylist()
    seconds["add"] = time.perf_counter() - mark
    if gpu:
        index = faiss.index_gpu_to_cpu(working)
    report(
        f"added {len(ids):,} rows; tuning search parameters to recall@10 "
        f">= {config.target_recall} on {len(queries):,} held-out queries"
    )

    mark = time.perf_counter()
    evaluation = evaluate(index, queries, oracle.ids, self_positions, config.target_recall)
    seconds["evaluate"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started
    source = _source_entry(data, len(ids), total - rows, duplicates)
    manifest = {
        "format": INDEX_FORMAT,
        "schema_version": INDEX_SCHEMA_VERSION,
        "kind": plan.kind,
        "factory": plan.factory,
        "reason": plan.reason,
        "metric": config.metric,
        "score": SCORES[config.metric],
        "pca": {"dim": config.pca, "whiten": config.whiten} if config.pca else None,
        "count": len(ids),
        "dim": dim,
        "search_params": evaluation.params,
        "target_recall": config.target_recall,
        "recall_at_10": round(evaluation.recall, 4),
        "recall_queries": evaluation.queries,
        "recall_measured_at_count": len(ids),
        "queries_per_second": round(evaluation.queries_per_second, 1),
        "latency_ms": round(evaluation.latency_ms, 3),
        "tuning": evaluation.tried,
        "train_rows": len(train_positions) if plan.needs_training else 0,
        "build_seconds": {name: round(value, 2) for name, value in seconds.items()},
        "built_on": "gpu" if gpu else "cpu",
        "provenance": json.loads(data.provenance.to_json()),
        "source_fingerprint": source["fingerprint"],
        "sources": [source],
        "faiss_version": faiss.__version__,
        "package_version": __version__,
        "created_at": _now(),
        "peak_rss_bytes": peak_rss(),
    }
    write_index_dir(out, index, ids, paths, labels, manifest, data.provenance, replace=True)
    return BuildResult(
        manifest, len(ids), total - rows, duplicates, seconds, evaluation, plan, bool(gpu)
    )


def add_to_index(
    config: IndexConfig, data: EmbeddingDataset, report: Callable[[str], None] = log.info
) -> BuildResult:
    """Append the rows of `data` whose ids the index at `config.out` lacks; no retraining.

    Raises:
        ArtifactError: no valid index at `config.out`, or a damaged part file in `data`.
        OutputError: the index folder holds files fc7 did not write.
        ProvenanceMismatch: `data` was made with other features than the index.
    """
    started = time.perf_counter()
    loaded = load_index(config.out)
    check_index_out(Path(config.out), replace=True)
    loaded.provenance.require_compatible(
        data.provenance, mine=f"the index {config.out}", theirs=f"the embeddings {data.uri}"
    )
    manifest = dict(loaded.manifest)
    metric = manifest["metric"]
    index = loaded.index
    ids, paths, labels = loaded.ids, loaded.paths, loaded.labels
    known = set(ids)
    added = duplicates = 0
    for batch in data.batches(["id", "path", "label", "embedding"], config.batch_size):
        keep = []
        for row, item in enumerate(batch.column("id").to_pylist()):
            if item in known:
                duplicates += 1
            else:
                known.add(item)
                keep.append(row)
        if not keep:
            continue
        batch = batch.take(pa.array(keep, pa.int64()))
        vectors = embeddings_to_numpy(batch.column("embedding"))
        index.add(normalise(vectors) if metric == "cosine" else vectors)
        ids += batch.column("id").to_pylist()
        paths += batch.column("path").to_pylist()
        labels += batch.column("label").to_pylist()
        added += len(keep)
    skipped_errors = data.count(with_errors=True) - data.count()
    seconds = {"total": time.perf_counter() - started}
    if added:
        manifest["count"] = len(ids)
        manifest["sources"] = [
            *manifest["sources"],
            _source_entry(data, added, skipped_errors, duplicates),
        ]
        manifest["updated_at"] = _now()
        write_index_dir(
            Path(config.out), index, ids, paths, labels, manifest, loaded.provenance, replace=True
        )
    report(f"added {added:,} new rows ({duplicates:,} already indexed)")
    return BuildResult(manifest, added, skipped_errors, duplicates, seconds, None)


def _source_entry(data: EmbeddingDataset, added: int, errors: int, duplicates: int) -> dict:
    return {
        "uri": normalize_source(data.uri),  # absolute: queries may run from another folder
        "fingerprint": data.fingerprint(),
        "rows_added": added,
        "rows_skipped_errors": errors,
        "rows_skipped_duplicate_ids": duplicates,
        "added_at": _now(),
    }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# Saving and loading


def _is_index_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == INDEX_FORMAT


def check_index_out(out: Path, replace: bool) -> None:
    """Refuse an index --out that fc7 must not write or replace.

    fc7 replaces an index folder as a whole, so it only ever replaces one holding nothing but
    the files it writes there (`INDEX_FOLDER_FILES`). A new or empty folder is always fine.

    Raises:
        OutputError: `out` is not a folder; is not empty and not an fc7 index (with or without
            `replace`); is an index holding other files (listed); or is an index and not
            `replace`.

    Example:
        >>> check_index_out(Path("out/index"), replace=True)  # doctest: +SKIP
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder; choose another --out")
    fs = pafs.LocalFileSystem()
    try:
        entries = foreign_entries(fs, str(out), lambda info: False)
        if not entries:
            return
        foreign = foreign_entries(
            fs,
            str(out),
            lambda info: info.type == pafs.FileType.File and info.base_name in INDEX_FOLDER_FILES,
        )
    except OSError as err:
        raise OutputError(f"--out {out}: cannot list: {err}") from err
    if not _is_index_manifest(out / MANIFEST_FILE):
        raise OutputError(
            f"--out {out}: not empty and not an fc7 index (no valid {MANIFEST_FILE}): holds "
            f"{describe_entries(entries)}; fc7 writes an index only into a new or empty folder "
            f"or over an index it made; choose another --out"
        )
    if foreign:
        raise OutputError(
            f"--out {out}: holds files fc7 did not write ({describe_entries(foreign)}); fc7 "
            f"replaces an index folder as a whole and will not delete them: move them out of "
            f"{out}, or choose another --out"
        )
    if not replace:
        raise OutputError(
            f"--out {out}: already exists; pass --add to append new rows to the index there, "
            f"or --overwrite to replace it"
        )


def write_index_dir(
    out: Path,
    index: faiss.Index,
    ids: list[str],
    paths: list[str],
    labels: list[str | None],
    manifest: dict[str, Any],
    provenance: Provenance,
    replace: bool = False,
) -> None:
    """Write the three files into a hidden sibling folder, then move it into place.

    A reader sees the old folder or the new one, never a mix; a failure leaves the old one.
    Of the old folder, only the files fc7 wrote are deleted (see `check_index_out`).

    Raises:
        OutputError: the parent folder cannot be written, or `check_index_out` refuses `out`.
    """
    out = Path(out)
    check_index_out(out, replace)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        faiss.write_index(index, str(staging / INDEX_FILE))
        table = pa.table(
            {
                "position": pa.array(np.arange(len(ids)), pa.int64()),
                "id": pa.array(ids, pa.string()),
                "path": pa.array(paths, pa.string()),
                "label": pa.array(labels, pa.string()),
            }
        )
        meta = {"schema_version": INDEX_SCHEMA_VERSION, "count": len(ids)}
        table = table.replace_schema_metadata(
            {
                PARQUET_METADATA_KEY: provenance.to_json().encode(),
                IDS_METADATA_KEY: json.dumps(meta).encode(),
            }
        )
        pq.write_table(table, staging / IDS_FILE, compression="zstd", write_page_checksum=True)
        manifest["files"] = {
            "index": INDEX_FILE,
            "index_sha256": file_sha256(staging / INDEX_FILE),
            "ids": IDS_FILE,
            "ids_sha256": file_sha256(staging / IDS_FILE),
        }
        manifest["index_bytes"] = (staging / INDEX_FILE).stat().st_size
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
            out.rename(old)
            try:
                staging.rename(out)
            except OSError:
                old.rename(out)  # keep the previous index rather than none
                raise
            _remove_old_index(old)
        else:
            staging.rename(out)
    except OSError as err:
        raise OutputError(f"--out {out}: cannot write the index: {err}") from err
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)  # our own folder, made above


def _remove_old_index(old: Path) -> None:
    # Only our files, never rmtree: anything else that appeared since the check stays.
    for name in INDEX_FOLDER_FILES:
        try:
            (old / name).unlink(missing_ok=True)
        except OSError:
            pass
    try:
        old.rmdir()
    except OSError:
        log.warning("left %s: it holds files fc7 did not write", old)


@dataclass
class LoadedIndex:
    """An index folder read back and checked: the FAISS index, id map and manifest agree."""

    index: faiss.Index
    ids: list[str]
    paths: list[str]
    labels: list[str | None]
    manifest: dict[str, Any]
    provenance: Provenance
    folder: Path | None = None


def load_index(index_dir: str | Path) -> LoadedIndex:
    """Read an index folder written by `fc7 index` and check that its files agree.

    Raises:
        ArtifactError: a file is missing, corrupt (sha256 differs from the manifest's, a
            Parquet page checksum fails, FAISS cannot read it or it does not hold a usable
            index), from a newer fc7, or the index, id map and manifest disagree on count,
            dimension, metric or provenance. The message names the file.

    Example:
        >>> loaded = load_index("out/index")  # doctest: +SKIP
        >>> loaded.index.ntotal == len(loaded.ids) == loaded.manifest["count"]
        True
    """
    folder = Path(index_dir)
    manifest_path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such index folder (build one with fc7 index)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{manifest_path}: missing; {folder} is not an fc7 index") from None
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{manifest_path}: unreadable or not JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise ArtifactError(f"{manifest_path}: not an fc7 index manifest")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > INDEX_SCHEMA_VERSION:
        raise ArtifactError(
            f"{manifest_path}: index schema {version} is newer than this fc7 reads "
            f"({INDEX_SCHEMA_VERSION}); upgrade fc7 or rebuild the index"
        )
    try:
        provenance = Provenance.model_validate(manifest["provenance"])
        files = manifest["files"]
        count, dim, metric = int(manifest["count"]), int(manifest["dim"]), manifest["metric"]
        params = {str(name): int(value) for name, value in dict(manifest["search_params"]).items()}
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{manifest_path}: incomplete manifest ({err})") from None
    if metric not in SCORES:
        raise ArtifactError(f"{manifest_path}: unknown metric {metric!r}")
    index_path, ids_path = folder / INDEX_FILE, folder / IDS_FILE
    for path, key in ((index_path, "index_sha256"), (ids_path, "ids_sha256")):
        if not path.is_file():
            raise ArtifactError(f"{path}: missing from the index folder; rebuild the index")
        if not isinstance(files, dict) or file_sha256(path) != files.get(key):
            raise ArtifactError(
                f"{path}: corrupt (its sha256 differs from the manifest's); rebuild the index"
            )
    index = _read_faiss(index_path)
    _check_index(index, index_path, count, dim, metric)
    table = _read_ids(ids_path)
    stored = Provenance.from_json(
        (table.schema.metadata or {}).get(PARQUET_METADATA_KEY, b"null"), where=str(ids_path)
    )
    diffs = stored.differences(provenance)
    if diffs:
        raise ArtifactError(f"{ids_path}: provenance differs from the manifest: {diffs}")
    if not (index.ntotal == count == table.num_rows):
        raise ArtifactError(
            f"{folder}: the index holds {index.ntotal:,} vectors, the id map {table.num_rows:,} "
            f"rows and the manifest says {count:,}; rebuild the index"
        )
    if index.d != dim or provenance.dim != dim:
        raise ArtifactError(
            f"{folder}: dimension disagrees: index {index.d}, manifest {dim}, provenance "
            f"{provenance.dim}; rebuild the index"
        )
    positions = table.column("position").to_numpy()
    if not np.array_equal(positions, np.arange(count)):
        raise ArtifactError(f"{ids_path}: positions are not 0..{count - 1}; rebuild the index")
    ids = table.column("id").to_pylist()
    if table.column("id").null_count or len(set(ids)) != count:
        raise ArtifactError(f"{ids_path}: ids are missing or repeated; rebuild the index")
    try:
        apply_search_params(index, params)
    except ArtifactError as err:
        raise ArtifactError(f"{manifest_path}: {err}; rebuild the index") from None
    return LoadedIndex(
        index,
        ids,
        table.column("path").to_pylist(),
        table.column("label").to_pylist(),
        manifest,
        provenance,
        folder,
    )


def _read_faiss(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        raise ArtifactError(
            f"{path}: not a readable FAISS index ({_faiss_message(err)}); rebuild the index"
        ) from None
    except MemoryError:
        # A damaged size field: FAISS allocates what the file claims before reading it.
        raise ArtifactError(
            f"{path}: corrupt (it claims more data than this machine's memory); rebuild the index"
        ) from None


_METRIC_NAMES = {faiss.METRIC_L2: "L2", faiss.METRIC_INNER_PRODUCT: "inner product"}


def _check_index(index: faiss.Index, path: Path, count: int, dim: int, metric: str) -> None:
    """Refuse an index whose structure cannot be what fc7 built, before any search runs.

    The sha256 in the manifest catches damage; these checks catch a file replaced together
    with its sha256, which could otherwise crash FAISS (out-of-range ids or graph links) or
    return garbage silently.
    """
    expected = metric_type(metric)
    try:
        parts = list(walk(index))
        for part in parts:
            if part.metric_type != expected:
                found = _METRIC_NAMES.get(part.metric_type, f"metric {part.metric_type}")
                raise ArtifactError(
                    f"{path}: searches by {found} but the manifest's metric is {metric} (which "
                    f"fc7 builds with {_METRIC_NAMES[expected]}); rebuild the index"
                )
            if not part.is_trained or part.ntotal != index.ntotal:
                raise ArtifactError(f"{path}: its parts disagree; rebuild the index")
            _check_part(part, path)
    except (AttributeError, RuntimeError, TypeError, ValueError) as err:
        raise ArtifactError(
            f"{path}: not an index fc7 can use ({err}); rebuild the index"
        ) from None


def _check_part(part: faiss.Index, path: Path) -> None:
    ntotal = part.ntotal
    problem = None
    if isinstance(part, faiss.IndexFlat) and ntotal:
        vectors = faiss.rev_swig_ptr(part.get_xb(), ntotal * part.d)
        # min and max make no temporary copy; NaN propagates into both.
        if not (np.isfinite(vectors.min()) and np.isfinite(vectors.max())):
            problem = "stored vectors that are not finite"
    elif isinstance(part, faiss.IndexIVF):
        lists = part.invlists
        sizes = [lists.list_size(i) for i in range(part.nlist)]
        ids = [faiss.rev_swig_ptr(lists.get_ids(i), n) for i, n in enumerate(sizes) if n]
        if part.quantizer.ntotal != part.nlist or part.quantizer.d != part.d:
            problem = "a coarse quantizer that does not match its lists"
        elif sum(sizes) != ntotal or (ids and not _all_in(np.concatenate(ids), 0, ntotal)):
            problem = "inverted lists that do not hold each vector once"
    elif isinstance(part, faiss.IndexHNSW):
        graph = part.hnsw
        links = faiss.vector_to_array(graph.neighbors)
        offsets = faiss.vector_to_array(graph.offsets).astype(np.int64)
        levels = faiss.vector_to_array(graph.levels)
        per_level = faiss.vector_to_array(graph.cum_nneighbor_per_level)
        if not (
            len(levels) == ntotal
            and len(offsets) == ntotal + 1
            and offsets[0] == 0
            and offsets[-1] == len(links)
            and _all_in(levels, 1, len(per_level))
            and np.array_equal(np.diff(offsets), per_level[levels])
            and _all_in(links, -1, ntotal)
            and -1 <= graph.entry_point < max(ntotal, 1)
            and (ntotal == 0 or graph.max_level == levels.max() - 1)
        ):
            problem = "a graph whose links point outside the index"
    if problem:
        raise ArtifactError(f"{path}: corrupt: {problem}; rebuild the index")


def _all_in(values: np.ndarray, low: int, end: int) -> bool:
    """Whether every value is in [low, end)."""
    return not len(values) or (values.min() >= low and values.max() < end)


_ID_COLUMNS = {"position": pa.int64(), "id": pa.string(), "path": pa.string(), "label": pa.string()}


def _read_ids(path: Path) -> pa.Table:
    try:
        table = read_parquet(str(path))
    except ArtifactError as err:
        raise ArtifactError(f"{err}; rebuild the index") from None
    for name, kind in _ID_COLUMNS.items():
        if name not in table.column_names or table.schema.field(name).type != kind:
            raise ArtifactError(f"{path}: not an fc7 id map (no {name} column of {kind})")
    try:
        meta = json.loads((table.schema.metadata or {})[IDS_METADATA_KEY])
        version, rows = meta["schema_version"], meta["count"]
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(
            f"{path}: not an fc7 id map (no valid {IDS_METADATA_KEY.decode()} metadata); "
            f"rebuild the index"
        ) from None
    if not isinstance(version, int) or version > INDEX_SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: id map schema {version} is newer than this fc7 reads "
            f"({INDEX_SCHEMA_VERSION}); upgrade fc7 or rebuild the index"
        )
    if rows != table.num_rows:
        raise ArtifactError(
            f"{path}: its metadata says {rows} rows but it holds {table.num_rows:,}; rebuild the "
            f"index"
        )
    return table


def summary(config: IndexConfig, result: BuildResult) -> str:
    """The lines `fc7 index` prints at the end of a build or an --add."""
    m = result.manifest
    pca = f"PCA {m['pca']['dim']}" if m["pca"] else "no PCA"
    skipped = "already in the index" if config.add else "duplicate ids"
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items() if k != "total")
    lines = [
        f"{'added' if config.add else 'indexed'} {result.added:,} rows from {config.embeddings}"
        f" ({result.skipped_errors:,} skipped with errors, {result.skipped_duplicates:,} "
        f"{skipped}) -> {config.out} ({m['count']:,} vectors)",
        f"  kind {m['kind']} ({m['factory']}), metric {m['metric']}, dim {m['dim']}, {pca}",
        f"  time {result.seconds['total']:.1f} s"
        + (f" ({steps})" if steps else "")
        + (" on GPU" if result.on_gpu else ""),
        f"  memory: index file {_size(m['index_bytes'])}, "
        f"peak RSS {_size(peak_rss())}",
    ]
    params = ", ".join(f"{k}={v}" for k, v in m["search_params"].items()) or "exact"
    note = (
        ""
        if config.add
        else (
            ""
            if result.evaluation.reached_target
            else f"  (target {m['target_recall']} NOT reached)"
        )
    )
    lines.append(
        f"  recall@10 {m['recall_at_10']:.3f} vs exact search on {m['recall_queries']:,} "
        f"held-out queries at {params}{note}"
        + (
            f" (measured at {m['recall_measured_at_count']:,} vectors, before --add)"
            if config.add
            else ""
        )
    )
    lines.append(
        f"  latency: {m['queries_per_second']:,.0f} queries/s batched, "
        f"{m['latency_ms']:.2f} ms per single query"
    )
    return "\n".join(lines)
