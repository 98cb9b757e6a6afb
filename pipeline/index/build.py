"""Building an index folder from embeddings, and `--add`ing new rows to one.

Building reads the embeddings twice: pass 1 draws the training sample and the evaluation
queries at random positions across all shards; pass 2 adds every row to the index while the
exact oracle (`tune.exact_neighbours`) ranks the same batches for the evaluation queries. It
never holds more than the index, the training sample and a batch (twice: the oracle searches a
copy) in memory.

Build and `--add` share one rule for ids (`new_rows`): the first row of an id is indexed, later
rows with that id are skipped and counted.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import __version__
from pipeline.errors import ArtifactError, ConfigError
from pipeline.extract.plan import plan_folder
from pipeline.fs import normalize_source
from pipeline.index.config import IndexConfig
from pipeline.index.faiss_env import (
    SCORES,
    faiss,
    metric_type,
    normalize,
    parts,
    to_gpu,
)
from pipeline.index.format import (
    INDEX_FORMAT,
    INDEX_SCHEMA_VERSION,
    check_index_out,
    load_index,
    write_index_dir,
)
from pipeline.index.plan import IndexPlan, plan_index
from pipeline.index.tune import RECALL_K, Evaluation, evaluate, exact_neighbours
from pipeline.quantize import int8_model_for
from pipeline.resources import peak_rss
from pipeline.store import EmbeddingDataset, embeddings_to_numpy

log = logging.getLogger(__name__)


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


@dataclass
class IdMap:
    """Index position -> id, path and label, as `ids.parquet` stores them, and the rows
    skipped because their id was already in the map."""

    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    duplicates: int = 0

    def __post_init__(self) -> None:
        self._known = set(self.ids)

    def claim(self, item: str) -> bool:
        """Whether `item` is new (it is then known); a repeated id is counted."""
        if item in self._known:
            self.duplicates += 1
            return False
        self._known.add(item)
        return True


@dataclass(frozen=True)
class NewRows:
    """Rows of one batch whose ids were new, as the index receives them."""

    vectors: np.ndarray  # L2-normalised when the metric is cosine
    first_position: int  # index position of vectors[0]
    batch_start: int  # position of the batch's first row among the rows without errors
    kept: list[int]  # the rows of the batch kept, in order


def new_rows(
    data: EmbeddingDataset, id_map: IdMap, metric: str, batch_size: int
) -> Iterator[NewRows]:
    """The rows of `data` whose ids `id_map` lacks, batch by batch, appended to `id_map`.

    The one duplicate-id rule of build and --add: the first row of an id wins; later rows with
    an id already in `id_map` are counted in `id_map.duplicates`. Rows with errors are skipped
    by `data.batches`.

    Raises:
        ArtifactError: a damaged part file (from `EmbeddingDataset.batches`).
    """
    batch_start = 0
    for batch in data.batches(["id", "path", "label", "embedding"], batch_size):
        batch_ids = batch.column("id").to_pylist()
        kept = [row for row, item in enumerate(batch_ids) if id_map.claim(item)]
        start, batch_start = batch_start, batch_start + batch.num_rows
        if not kept:
            continue
        if len(kept) < batch.num_rows:
            batch = batch.take(pa.array(kept, pa.int64()))
        vectors = embeddings_to_numpy(batch.column("embedding"))
        first = len(id_map.ids)
        id_map.ids += batch.column("id").to_pylist()
        id_map.paths += batch.column("path").to_pylist()
        id_map.labels += batch.column("label").to_pylist()
        yield NewRows(normalize(vectors) if metric == "cosine" else vectors, first, start, kept)


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
        ConfigError: an invalid kind or PCA dimension for these embeddings, or
            `--device cuda` where FAISS has no GPU.

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
    train_rows = min(config.train_sample, rows)
    budget = int(config.max_memory) if config.max_memory else None
    plan = plan_index(
        config.kind, rows, dim, config.metric, config.pca, config.whiten, budget, train_rows
    )
    report(f"plan: {plan.factory} ({plan.reason})")
    index = faiss.index_factory(dim, plan.factory, metric_type(config.metric))
    _prepare_for_training(index)
    rng = np.random.default_rng(config.seed)
    query_positions, train_positions = _sample_positions(
        rows, config.eval_queries, train_rows if plan.needs_training else 0, rng
    )
    queries, sample = _gather(data, [query_positions, train_positions], config.batch_size)
    if config.metric == "cosine":
        queries, sample = normalize(queries), normalize(sample)
    seconds = {"read_sample": time.perf_counter() - started}

    gpu = to_gpu(index) if config.device != "cpu" else None
    if config.device == "cuda" and gpu is None:
        raise ConfigError(f"--device cuda: FAISS has no GPU here for {plan.factory}")
    working = gpu[0] if gpu else index
    if plan.needs_training:
        report(f"training on {len(sample):,} rows sampled across all shards")
        mark = time.perf_counter()
        working.train(sample)
        seconds["train"] = time.perf_counter() - mark
    del sample

    mark = time.perf_counter()
    id_map = IdMap()
    self_positions = np.full(len(query_positions), -1, dtype=np.int64)

    def fill() -> Iterator[np.ndarray]:
        for batch in new_rows(data, id_map, config.metric, config.batch_size):
            _record_own_positions(self_positions, query_positions, batch)
            working.add(batch.vectors)
            yield batch.vectors

    exact = exact_neighbours(queries, fill(), config.metric, RECALL_K + 1)
    seconds["add"] = time.perf_counter() - mark
    if gpu:
        index = faiss.index_gpu_to_cpu(working)
    count = len(id_map.ids)
    report(
        f"added {count:,} rows; tuning search parameters to recall@10 "
        f">= {config.target_recall} on {len(queries):,} held-out queries"
    )

    mark = time.perf_counter()
    evaluation = evaluate(index, queries, exact, self_positions, config.target_recall)
    seconds["evaluate"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started
    source = _source_entry(data, count, total - rows, id_map.duplicates)
    manifest = {
        "format": INDEX_FORMAT,
        "schema_version": INDEX_SCHEMA_VERSION,
        "kind": plan.kind,
        "factory": plan.factory,
        "reason": plan.reason,
        "metric": config.metric,
        "score": SCORES[config.metric],
        "pca": {"dim": config.pca, "whiten": config.whiten} if config.pca else None,
        "count": count,
        "dim": dim,
        "search_params": evaluation.params,
        "target_recall": config.target_recall,
        "recall_at_10": round(evaluation.recall, 4),
        "recall_queries": evaluation.queries,
        "recall_measured_at_count": count,
        "queries_per_second": round(evaluation.queries_per_second, 1),
        "latency_ms": round(evaluation.latency_ms, 3),
        "tuning": evaluation.tried,
        "train_rows": len(train_positions) if plan.needs_training else 0,
        "build_seconds": {name: round(value, 2) for name, value in seconds.items()},
        # "gpu", not "cuda": the stored value of manifests written before --device cuda.
        "built_on": "gpu" if gpu else "cpu",
        "provenance": json.loads(data.provenance.to_json()),
        "source_fingerprint": source["fingerprint"],
        "sources": [source],
        "faiss_version": faiss.__version__,
        "package_version": __version__,
        "created_at": _now(),
        "peak_rss_bytes": peak_rss(),
    }
    write_index_dir(
        out, index, id_map.ids, id_map.paths, id_map.labels, manifest, data.provenance,
        replace=True, int8_model=int8_model_for(data.provenance, (plan_folder(data.uri),)),
    )
    return BuildResult(
        manifest, count, total - rows, id_map.duplicates, seconds, evaluation, plan, bool(gpu)
    )


def add_to_index(
    config: IndexConfig, data: EmbeddingDataset, report: Callable[[str], None] = log.info
) -> BuildResult:
    """Append the rows of `data` whose ids the index at `config.out` lacks; no retraining.

    Args:
        config: the job's options (`out` names the index; its own settings are kept).
        data: the new embeddings.
        report: called with progress lines.

    Returns:
        The manifest (rewritten only when rows were added) and the counts.

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
    index = loaded.index
    id_map = IdMap(loaded.ids, loaded.paths, loaded.labels)
    before = index.ntotal
    for batch in new_rows(data, id_map, manifest["metric"], config.batch_size):
        index.add(batch.vectors)
    added = index.ntotal - before
    skipped_errors = data.count(with_errors=True) - data.count()
    seconds = {"total": time.perf_counter() - started}
    if added:
        manifest["count"] = len(id_map.ids)
        manifest["sources"] = [
            *manifest["sources"],
            _source_entry(data, added, skipped_errors, id_map.duplicates),
        ]
        manifest["updated_at"] = _now()
        write_index_dir(
            Path(config.out), index, id_map.ids, id_map.paths, id_map.labels, manifest,
            loaded.provenance, replace=True,
            int8_model=int8_model_for(loaded.provenance, (str(loaded.folder),)),
        )
    report(f"added {added:,} new rows ({id_map.duplicates:,} already indexed)")
    return BuildResult(manifest, added, skipped_errors, id_map.duplicates, seconds, None)


def _prepare_for_training(index: faiss.Index) -> None:
    """Turn off polysemous training (minutes of work for a feature we do not use)."""
    for part in parts(index):
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False


def _sample_positions(
    rows: int, queries: int, train: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions of the evaluation queries and of the training sample."""
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


def _record_own_positions(
    self_positions: np.ndarray, query_positions: np.ndarray, batch: NewRows
) -> None:
    """Where the queries drawn from this batch landed in the index (-1: a repeated id)."""
    landed = {row: batch.first_position + i for i, row in enumerate(batch.kept)}
    lo, hi = np.searchsorted(
        query_positions, [batch.batch_start, batch.batch_start + batch.kept[-1] + 1]
    )
    for q in range(lo, hi):
        self_positions[q] = landed.get(int(query_positions[q]) - batch.batch_start, -1)


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
