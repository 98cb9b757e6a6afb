"""Building an index folder from embeddings, and `--add`ing new rows to one.

A build reads the embeddings in three passes and never holds more than the index, the
training sample and a batch (per worker) in memory:
1. ids only (`encode.write_id_map`): which rows are indexed (the first row of each id) and the
   id map, written to the staging folder as it goes;
2. the training sample and the evaluation queries, at random positions across all shards;
3. after training, the vectors: one process adds every shard (`--runner local`), or Ray tasks
   add ranges of shards and the driver merges them in order (`--runner ray`, IVF kinds; see
   `distributed`); both give the same index, byte for byte. The exact oracle
   (`tune.ExactSearch`) ranks the same batches for the evaluation queries.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import __version__
from pipeline.errors import ArtifactError, ConfigError
from pipeline.fs import normalize_source
from pipeline.index.config import IndexConfig
from pipeline.index.encode import RowLayout, encode_range, reserve, write_id_map
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
    remove_staging,
    staging_folder,
    write_index_dir,
)
from pipeline.index.idmap import IdMapWriter
from pipeline.index.plan import IndexPlan, human_size, plan_index
from pipeline.index.tune import RECALL_K, Evaluation, ExactSearch, evaluate
from pipeline.provenance import Provenance
from pipeline.resources import peak_rss
from pipeline.store import EmbeddingDataset, embeddings_to_numpy

log = logging.getLogger(__name__)

# `--runner auto` builds on Ray when a cluster is given (RAY_ADDRESS) and there are this many
# rows: below it, starting tasks and shipping the parts costs more than it saves.
RAY_MIN_ROWS = 1_000_000
# The object store of the local Ray a `--runner ray` build starts: a few parts at a time.
OBJECT_STORE_MEMORY = 1_000_000_000
# What a build holds besides the index, the sample and the batches: Python, FAISS, Arrow,
# pandas, and the copies of a batch on its way (float16 -> float32 -> normalised).
BASE_MEMORY = 500_000_000


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
    runner: str = "local"


def build_index(
    config: IndexConfig, data: EmbeddingDataset, report: Callable[[str], None] = log.info
) -> BuildResult:
    """Build an index folder at `config.out` from `data` (written atomically).

    Args:
        config: the job's options (kind, metric, pca, memory budget, sample sizes, runner...).
        data: the embeddings, opened with `EmbeddingDataset.open`.
        report: called with progress lines.

    Returns:
        The manifest written and the counts, timings and evaluation.

    Raises:
        OutputError: `config.out` is an index and --overwrite was not given, holds files fc7
            did not write, or is not a folder.
        ArtifactError: the embeddings hold no rows without errors, or a damaged part file.
        ConfigError: an invalid kind or PCA dimension for these embeddings, an index that
            does not fit in --max-memory, `--runner ray` for a kind Ray cannot build, or
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
    plan = _plan(config, rows, dim, train_rows)
    runner = _runner(config, plan, rows)
    report(f"plan: {plan.factory} ({plan.reason}); runner {runner}")
    index = faiss.index_factory(dim, plan.factory, metric_type(config.metric))
    _prepare_for_training(index)
    # Refused before any pass over the data.
    gpu = to_gpu(index) if config.device != "cpu" else None
    if config.device == "cuda" and gpu is None:
        raise ConfigError(f"--device cuda: FAISS has no GPU here for {plan.factory}")
    staging = staging_folder(out)
    try:
        with IdMapWriter(staging, data.provenance) as writer:
            layout = write_id_map(data, writer, config.batch_size)
        seconds = {"ids": time.perf_counter() - started}
        rng = np.random.default_rng(config.seed)
        query_rows, train_rows_drawn = _sample_positions(
            rows, config.eval_queries, train_rows if plan.needs_training else 0, rng
        )
        mark = time.perf_counter()
        queries, sample = _gather(data, [query_rows, train_rows_drawn], config.batch_size)
        if config.metric == "cosine":
            queries, sample = normalize(queries), normalize(sample)
        seconds["read_sample"] = time.perf_counter() - mark

        if plan.needs_training:
            report(f"training on {len(sample):,} rows sampled across all shards")
            mark = time.perf_counter()
            (gpu[0] if gpu else index).train(sample)
            seconds["train"] = time.perf_counter() - mark
        del sample

        mark = time.perf_counter()
        oracle = ExactSearch(queries, config.metric, RECALL_K + 1)
        if runner == "ray":
            index = _encode_on_ray(config, data, layout, index, gpu, oracle, report, plan)
            gpu = None
        else:
            working = gpu[0] if gpu else index
            if not gpu and "IVF" in plan.factory:
                reserve(index, layout.count)
            encode_range(working, data, layout, (0, len(layout.files)), config.metric,
                         config.batch_size, oracle)
            if gpu:
                index = faiss.index_gpu_to_cpu(working)
        seconds["add"] = time.perf_counter() - mark
        count = layout.count
        report(
            f"added {count:,} rows; tuning search parameters to recall@10 "
            f">= {config.target_recall} on {len(queries):,} held-out queries"
        )
        mark = time.perf_counter()
        self_positions = layout.positions(query_rows)
        evaluation = evaluate(
            index, queries, oracle.positions(), self_positions, config.target_recall
        )
        seconds["evaluate"] = time.perf_counter() - mark
        seconds["total"] = time.perf_counter() - started
        duplicates = len(layout.skipped)
        source = _source_entry(data, count, total - rows, duplicates)
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
            # Exact search over the same rows for the same queries, timed while the index was
            # filled; None on Ray, where it ran in pieces on the workers.
            "exact_queries_per_second": (
                round(len(queries) / oracle.seconds, 2)
                if runner == "local" and oracle.seconds
                else None
            ),
            "tuning": evaluation.tried,
            "train_rows": len(train_rows_drawn) if plan.needs_training else 0,
            "build_seconds": {name: round(value, 2) for name, value in seconds.items()},
            # "gpu", not "cuda": the stored value of manifests written before --device cuda.
            "built_on": "gpu" if gpu else "cpu",
            "runner": runner,
            "max_memory": int(config.max_memory) if config.max_memory else None,
            "provenance": json.loads(data.provenance.to_json()),
            "source_fingerprint": source["fingerprint"],
            "sources": [source],
            "faiss_version": faiss.__version__,
            "package_version": __version__,
            "created_at": _now(),
            "peak_rss_bytes": peak_rss(),
        }
        write_index_dir(
            out, staging, index, manifest, data.provenance, replace=True,
            int8_model=_int8_model(data.provenance, data.uri, of_embeddings=True),
        )
    finally:
        remove_staging(staging)
    return BuildResult(
        manifest, count, total - rows, duplicates, seconds, evaluation, plan, bool(gpu), runner
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
    before = index.ntotal
    staging = staging_folder(Path(config.out))
    try:
        with IdMapWriter(staging, loaded.provenance) as writer:
            layout = write_id_map(data, writer, config.batch_size, existing=loaded.id_map)
        encode_range(index, data, layout, (0, len(layout.files)), manifest["metric"],
                     config.batch_size)
        added = index.ntotal - before
        duplicates = len(layout.skipped)
        skipped_errors = data.count(with_errors=True) - data.count()
        seconds = {"total": time.perf_counter() - started}
        if added:
            manifest["count"] = index.ntotal
            manifest["sources"] = [
                *manifest["sources"],
                _source_entry(data, added, skipped_errors, duplicates),
            ]
            manifest["updated_at"] = _now()
            write_index_dir(
                Path(config.out), staging, index, manifest, loaded.provenance, replace=True,
                int8_model=_int8_model(loaded.provenance, str(loaded.folder), of_embeddings=False),
            )
    finally:
        remove_staging(staging)
    report(f"added {added:,} new rows ({duplicates:,} already indexed)")
    return BuildResult(manifest, added, skipped_errors, duplicates, seconds, None)


def _plan(config: IndexConfig, rows: int, dim: int, train_rows: int) -> IndexPlan:
    """The plan, with the index's share of --max-memory: what the sample, queries and batches
    leave. Refused when the index it names cannot fit."""
    budget = int(config.max_memory) if config.max_memory else None
    working = BASE_MEMORY + 4 * dim * (train_rows + config.eval_queries + 4 * config.batch_size)
    if budget is not None and budget <= working:
        raise ConfigError(
            f"--max-memory {human_size(budget)}: the build needs {human_size(working)} besides "
            f"the index (training sample {train_rows:,} x {dim}, batches of "
            f"{config.batch_size:,}); lower --train-sample or --batch-size, or raise it"
        )
    plan = plan_index(
        config.kind, rows, dim, config.metric, config.pca, config.whiten,
        budget - working if budget else None, train_rows,
    )
    if budget is not None and plan.index_bytes is not None and plan.index_bytes + working > budget:
        raise ConfigError(
            f"--max-memory {human_size(budget)}: {plan.factory} over {rows:,} rows takes about "
            f"{human_size(plan.index_bytes)}, plus {human_size(working)} for the build; use "
            f"--kind auto, --pca, or a larger --max-memory"
        )
    return plan


def _runner(config: IndexConfig, plan: IndexPlan, rows: int) -> str:
    """`local` or `ray` for `--runner`: auto is Ray for an IVF index of at least
    `RAY_MIN_ROWS` rows when a cluster is given (RAY_ADDRESS)."""
    ivf = "IVF" in plan.factory
    if config.runner == "ray" and not ivf:
        raise ConfigError(
            f"--runner ray: only IVF indexes are built on Ray (their lists merge); "
            f"{plan.factory} is built in one process: drop --runner or choose an IVF kind"
        )
    if config.runner == "auto":
        cluster = bool(os.environ.get("RAY_ADDRESS"))
        return "ray" if cluster and ivf and rows >= RAY_MIN_ROWS else "local"
    return config.runner


def _encode_on_ray(
    config: IndexConfig,
    data: EmbeddingDataset,
    layout: RowLayout,
    index: faiss.Index,
    gpu: tuple | None,
    oracle: ExactSearch,
    report: Callable[[str], None],
    plan: IndexPlan,
) -> faiss.Index:
    from pipeline.extract.runner import start_ray, stop_ray
    from pipeline.index.distributed import encode_on_ray

    if gpu:  # trained on the GPU; the tasks encode on their nodes' CPUs
        index = faiss.index_gpu_to_cpu(gpu[0])
    # The parts pass through the object store, whose pages the driver maps as it reads them:
    # a local Ray's store is kept small (parts beyond it spill to disk) so that they count
    # little against --max-memory.
    started = start_ray(object_store_memory=OBJECT_STORE_MEMORY)
    try:
        return encode_on_ray(
            index, data, layout, config.metric, config.batch_size, oracle,
            config.cpus_per_task, report, plan.index_bytes,
        )
    finally:
        if started:
            stop_ray()


def _int8_model(provenance: Provenance, folder: str, of_embeddings: bool) -> bytes | None:
    """The int8 model an index of int8 embeddings carries, found in the embeddings' plan
    folder or in the index folder; None for float embeddings.

    Imported here: `quantize` and `extract` import torch (680 MB resident), which a build of
    float embeddings never needs and --max-memory would otherwise pay for.
    """
    if provenance.precision != "int8":
        return None
    from pipeline.extract.plan import plan_folder
    from pipeline.quantize import int8_model_for

    return int8_model_for(provenance, (plan_folder(folder) if of_embeddings else folder,))


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


def _source_entry(data: EmbeddingDataset, added: int, errors: int, duplicates: int) -> dict:
    return {
        "uri": normalize_source(data.uri),  # absolute: queries may run from another folder
        "fingerprint": data.fingerprint(),
        "rows_added": added,
        "rows_skipped_errors": errors,
        "rows_skipped_duplicate_ids": duplicates,
        **({"keep_ids_sha256": data.only_digest} if data.only is not None else {}),
        "added_at": _now(),
    }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
