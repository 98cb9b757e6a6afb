"""Extraction: plan the inputs into shards, embed each shard, write one atomic part per shard.

The output folder holds `part-NNNNN.parquet` (one per shard, written atomically) and `_plan/`
(the plan: `inputs.parquet`, one row group per shard, and `plan.json` with the provenance).
Resuming is therefore exact: a shard is done when its part file exists, whatever killed the
previous run; nothing is recomputed or duplicated.

Ray runs one `ShardWorker` actor per model replica (GPU actors where there are GPUs). Each
worker decodes in a thread pool while the model runs, so the per-row cost of Ray is paid once
per shard, not once per image.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from pydantic import PositiveInt, field_validator

from pipeline.config import JobConfig
from pipeline.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from pipeline.errors import (
    ArtifactError,
    OutputError,
    PipelineError,
    ProvenanceMismatch,
    SourceError,
)
from pipeline.model import Embedder, load_weights, parse_weights_spec
from pipeline.provenance import Provenance
from pipeline.sources import (
    IMAGE_EXTENSIONS,
    InputImage,
    normalize_source,
    read_image_bytes,
)
from pipeline.store import PART_PREFIX, build_table, resolve, write_table_atomically

PLAN_FOLDER = "_plan"
PLAN_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("label", pa.string())])


class ExtractConfig(JobConfig):
    """Options of `fc7 extract` (and `jobs/extract.py`)."""

    source: str
    out: str
    weights: str = "imagenet"
    layer: Literal["fc7", "fc6", "pool5"] = "fc7"
    batch_size: PositiveInt = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16"] = "float32"
    limit: PositiveInt | None = None
    num_workers: PositiveInt | None = None
    cpus_per_worker: PositiveInt | None = None
    shard_size: PositiveInt = 256
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS
    overwrite: bool = False

    @field_validator("weights")
    @classmethod
    def _normalise_weights(cls, value: str) -> str:
        return parse_weights_spec(value)

    @field_validator("source", "out")
    @classmethod
    def _normalise_location(cls, value: str) -> str:
        return normalize_source(value)


@dataclass
class ShardStats:
    """What one shard (or a whole run, once merged) did."""

    seen: int = 0
    embedded: int = 0
    failed: int = 0
    reasons: Counter = field(default_factory=Counter)
    # Wall-clock span (time.time()) in which the workers were embedding.
    started: float = float("inf")
    finished: float = 0.0

    def merge(self, other: ShardStats) -> None:
        self.seen += other.seen
        self.embedded += other.embedded
        self.failed += other.failed
        self.reasons.update(other.reasons)
        self.started = min(self.started, other.started)
        self.finished = max(self.finished, other.finished)


# --- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The inputs of a run, fixed once, split into shards of `shard_size` rows."""

    out: str  # local path or URI, as `resolve` takes it
    source: str
    limit: int | None
    inputs: int
    shard_size: int
    provenance: Provenance

    @property
    def shards(self) -> int:
        return -(-self.inputs // self.shard_size)

    @property
    def inputs_file(self) -> str:
        """Path on `resolve(self.out)[0]`, like `part_file`."""
        return f"{resolve(self.out)[1]}/{PLAN_FOLDER}/inputs.parquet"

    def shard_rows(self, shard: int) -> int:
        return min(self.shard_size, self.inputs - shard * self.shard_size)

    def part_file(self, shard: int) -> str:
        return f"{resolve(self.out)[1]}/{PART_PREFIX}{shard:05d}.parquet"


def prepare_output(config: ExtractConfig, provenance: Provenance) -> Plan | None:
    """Check that `config.out` can take this run; return the plan of an earlier run to resume.

    Raises:
        OutputError: `out` is not writable, or holds something else than an fc7 output of the
            same source (use `--overwrite` or another `--out`).
        ProvenanceMismatch: `out` was made with other weights, layer, preprocessing or dtype.
    """
    fs, out = resolve(config.out)
    plan_json = f"{out}/{PLAN_FOLDER}/plan.json"
    try:
        fs.create_dir(f"{out}/{PLAN_FOLDER}", recursive=True)
        existing = fs.get_file_info(plan_json)
    except OSError as err:
        raise OutputError(f"--out {config.out}: cannot write here: {err}") from err
    if existing.type != pafs.FileType.File:
        _require_no_parts(fs, out, config.out)
        return None
    if config.overwrite:
        remove_output(fs, out)
        fs.create_dir(f"{out}/{PLAN_FOLDER}", recursive=True)
        return None
    try:
        with fs.open_input_stream(plan_json) as stream:
            recorded = json.loads(stream.read())
        plan = Plan(
            out=config.out,
            source=recorded["source"],
            limit=recorded["limit"],
            inputs=recorded["inputs"],
            shard_size=recorded["shard_size"],
            provenance=Provenance.from_json(json.dumps(recorded["provenance"]), where=plan_json),
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ArtifactError(
            f"{plan_json}: unreadable run plan ({err!r}); pass --overwrite to start again"
        ) from err
    diffs = plan.provenance.differences(provenance)
    if plan.provenance.dtype != provenance.dtype:
        diffs.append(f"dtype: {plan.provenance.dtype} vs {provenance.dtype}")
    if diffs:
        raise ProvenanceMismatch(
            f"--out {config.out} holds embeddings made differently ({'; '.join(diffs)}); "
            f"pass --overwrite to replace them, or choose another --out"
        )
    if (plan.source, plan.limit) != (config.source, config.limit):
        raise OutputError(
            f"--out {config.out} holds a run over {plan.source} (limit {plan.limit}), not "
            f"{config.source} (limit {config.limit}); pass --overwrite or choose another --out"
        )
    return plan


def write_plan(
    config: ExtractConfig, provenance: Provenance, inputs: Iterable[InputImage]
) -> Plan:
    """Stream `inputs` into `_plan/inputs.parquet`, one row group per shard, then `plan.json`.

    `plan.json` is written last: a run killed while planning simply plans again.
    """
    fs, out = resolve(config.out)
    count = 0
    with pq.ParquetWriter(f"{out}/{PLAN_FOLDER}/inputs.parquet", PLAN_SCHEMA, filesystem=fs) as w:
        for chunk in _chunks(inputs, config.shard_size, config.limit):
            w.write_table(
                pa.Table.from_pylist([vars(item) for item in chunk], schema=PLAN_SCHEMA),
                row_group_size=config.shard_size,
            )
            count += len(chunk)
    if count == 0:
        raise SourceError(
            f"{config.source}: no images found (looked for files ending in "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    plan = Plan(
        out=config.out,
        source=config.source,
        limit=config.limit,
        inputs=count,
        shard_size=config.shard_size,
        provenance=provenance.stamped(),
    )
    record = {
        "source": plan.source,
        "limit": plan.limit,
        "inputs": plan.inputs,
        "shards": plan.shards,
        "shard_size": config.shard_size,
        "provenance": json.loads(plan.provenance.to_json()),
    }
    with fs.open_output_stream(f"{out}/{PLAN_FOLDER}/plan.json") as stream:
        stream.write(json.dumps(record, indent=2).encode())
    return plan


def pending_shards(plan: Plan) -> list[int]:
    """Shards whose part file is not there yet; also removes temporary files of killed runs."""
    fs, out = resolve(plan.out)
    done = set()
    for info in fs.get_file_info(pafs.FileSelector(out, recursive=False)):
        name = info.base_name
        if name.startswith(f".{PART_PREFIX}") and name.endswith(".tmp"):
            fs.delete_file(info.path)
        elif name.startswith(PART_PREFIX) and name.endswith(".parquet"):
            done.add(int(name[len(PART_PREFIX) : -len(".parquet")]))
    return [shard for shard in range(plan.shards) if shard not in done]


def remove_output(fs: pafs.FileSystem, out: str) -> None:
    """Delete what fc7 wrote in `out` (part files and the plan), nothing else."""
    for info in fs.get_file_info(pafs.FileSelector(out, recursive=False)):
        name = info.base_name.lstrip(".")
        if name.startswith(PART_PREFIX):
            fs.delete_file(info.path)
        elif info.base_name == PLAN_FOLDER:
            fs.delete_dir(info.path)


def _require_no_parts(fs: pafs.FileSystem, out: str, shown: str) -> None:
    for info in fs.get_file_info(pafs.FileSelector(out, recursive=False)):
        if info.base_name.startswith(PART_PREFIX):
            raise OutputError(
                f"--out {shown} holds part files but no fc7 plan ({PLAN_FOLDER}/plan.json): "
                f"not an fc7 output, or made by another tool; choose another --out"
            )


def _chunks(items: Iterable[InputImage], size: int, limit: int | None) -> Iterator[list]:
    chunk: list[InputImage] = []
    for count, item in enumerate(items):
        if limit is not None and count >= limit:
            break
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- embedding a shard -----------------------------------------------------------------------


class DecodedRow(NamedTuple):
    """One input after reading and decoding: a tensor, or the error that stopped it."""

    tensor: torch.Tensor | None
    error: str | None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None


def _load_and_decode(item: dict, embedder: Embedder, max_pixels: int) -> DecodedRow:
    try:
        data = read_image_bytes(item["path"])
    except (OSError, ValueError) as err:  # ValueError: a URI scheme pyarrow does not know
        return DecodedRow(None, f"cannot read file: {getattr(err, 'strerror', None) or err}")
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        tensor, width, height = decode_image(data, embedder.preprocessing, max_pixels)
    except ImageDecodeError as err:
        return DecodedRow(None, str(err), sha256)
    return DecodedRow(tensor, None, sha256, width, height)


class ShardEmbedder:
    """Loads the model once; `__call__(shard)` embeds one shard of the plan into its part file.

    Plain Python: Ray runs it as an actor (`run_shards`), and it runs without Ray as well.
    """

    def __init__(self, config: ExtractConfig, plan: Plan, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.config = config
        self.plan = plan
        self.embedder = Embedder(
            load_weights(config.weights), config.layer, config.device, config.dtype
        )
        if self.embedder.weights.sha256 != plan.provenance.weights_sha256:
            raise ProvenanceMismatch(
                f"weights {config.weights} on this worker differ from the driver's "
                f"({self.embedder.weights.sha256[:12]} vs {plan.provenance.weights_sha256[:12]})"
            )
        # Decoding overlaps the model; one thread per spare core, at least one.
        decode_threads = max(1, (threads or os.cpu_count() or 2) - 1)
        self.decoder = ThreadPoolExecutor(decode_threads, thread_name_prefix="fc7-decode")

    def __call__(self, shard: int) -> ShardStats:
        started = time.time()
        fs, _ = resolve(self.plan.out)
        with fs.open_input_file(self.plan.inputs_file) as file:
            rows = pq.ParquetFile(file).read_row_group(shard).to_pylist()
        # map() submits every row at once, so decoding runs ahead while the model works.
        decoded = self.decoder.map(
            lambda row: _load_and_decode(row, self.embedder, self.config.max_pixels), rows
        )
        embeddings = np.zeros((len(rows), self.plan.provenance.dim), dtype=np.float32)
        results: list[DecodedRow] = []
        batch: list[int] = []  # positions of decoded rows waiting for the model
        for position, result in enumerate(decoded):
            results.append(result)
            if result.tensor is not None:
                batch.append(position)
            if batch and (len(batch) == self.config.batch_size or position == len(rows) - 1):
                embeddings[batch] = self.embedder(torch.stack([results[i].tensor for i in batch]))
                for i in batch:  # the tensor is in `embeddings` now; free its memory
                    results[i] = results[i]._replace(tensor=None)
                batch = []
        errors = [result.error for result in results]
        table = build_table(
            self.plan.provenance,
            [row["id"] for row in rows],
            [row["path"] for row in rows],
            [row["label"] for row in rows],
            embeddings,
            errors,
            [result.sha256 for result in results],
            [result.width for result in results],
            [result.height for result in results],
        )
        write_table_atomically(table, fs, self.plan.part_file(shard))
        failures = [error for error in errors if error is not None]
        return ShardStats(
            seen=len(rows),
            embedded=len(rows) - len(failures),
            failed=len(failures),
            reasons=Counter(error.split(":", 1)[0] for error in failures),
            started=started,
            finished=time.time(),
        )


# --- the run summary ---------------------------------------------------------------------------


def summary(stats: ShardStats, plan: Plan, seconds: float, skipped_shards: int) -> str:
    """The lines printed at the end of a run."""
    lines = [
        f"fc7 extract: {plan.out}",
        f"  images in plan: {plan.inputs:,} in {plan.shards:,} shards"
        + (f" ({skipped_shards:,} already done)" if skipped_shards else ""),
        f"  this run: seen {stats.seen:,}, embedded {stats.embedded:,}, failed {stats.failed:,}",
        f"  time: {seconds:.1f} s in all, {stats.seen / max(seconds, 1e-9):.1f} images/s; "
        f"{stats.seen / max(stats.finished - stats.started, 1e-9):.1f} images/s once the "
        f"workers were up",
    ]
    for reason, count in stats.reasons.most_common(5):
        lines.append(f"  failed: {count:,} x {reason}")
    return "\n".join(lines)


# --- running on Ray ------------------------------------------------------------------------------


def start_ray() -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING")
        return
    # Local workers import `pipeline` from this checkout even when it is not installed. No
    # dashboard: on a laptop its processes take CPU from the model (about 5% on 2 cores).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    ray.init(
        runtime_env={"env_vars": {"PYTHONPATH": path}},
        include_dashboard=False,
        logging_level="WARNING",
    )


def worker_layout(config: ExtractConfig, resources: dict) -> tuple[int, int, bool]:
    """(workers, CPUs per worker, on GPU) for the cluster's resources and the config.

    One model replica per GPU; on CPU, replicas of up to 8 threads each (AlexNet's GEMMs scale
    well to about 8 threads, past that more replicas do better).
    """
    cpus = max(1, int(resources.get("CPU", 1)))
    gpus = int(resources.get("GPU", 0)) if config.device != "cpu" else 0
    on_gpu = gpus > 0
    per_worker = config.cpus_per_worker or (max(1, cpus // gpus) if on_gpu else min(cpus, 8))
    workers = config.num_workers or (gpus if on_gpu else max(1, cpus // per_worker))
    return workers, per_worker, on_gpu


def run_shards(
    config: ExtractConfig, plan: Plan, shards: list[int], on_shard_done
) -> ShardStats:
    """Embed `shards` on Ray actors; calls `on_shard_done(stats, total)` as each part lands."""
    import ray

    start_ray()
    workers, per_worker, on_gpu = worker_layout(config, ray.cluster_resources())
    actor_class = ray.remote(ShardEmbedder).options(
        num_cpus=per_worker, num_gpus=1 if on_gpu else 0, max_restarts=2, max_task_retries=2
    )
    actors = [
        actor_class.remote(config, plan, per_worker) for _ in range(min(workers, len(shards)))
    ]
    todo = iter(shards)
    in_flight: dict = {}

    def submit(actor) -> None:
        shard = next(todo, None)
        if shard is not None:
            in_flight[actor.__call__.remote(shard)] = actor

    # Two shards queued per actor, so no actor waits for the driver between shards.
    for actor in actors * 2:
        submit(actor)
    total = ShardStats()
    while in_flight:
        (ready,), _ = ray.wait(list(in_flight), num_returns=1)
        actor = in_flight.pop(ready)
        try:
            stats = ray.get(ready)
        except ray.exceptions.RayError as err:
            # Ray already retried the shard; what is done stays done for the next run.
            raise PipelineError(
                f"a worker failed on a shard, also when retried ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[-1]}); run the same command again to resume"
            ) from err
        total.merge(stats)
        on_shard_done(stats, total)
        submit(actor)
    return total
