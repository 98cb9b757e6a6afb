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
import re
import socket
import time
import uuid
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
from pydantic import Field, PositiveInt, field_validator

from pipeline.config import JobConfig, parse_size
from pipeline.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from pipeline.errors import (
    ArtifactError,
    OutputError,
    PipelineError,
    ProvenanceMismatch,
    SourceError,
)
from pipeline.model import Embedder, load_weights, parse_weights_spec
from pipeline.provenance import PARQUET_METADATA_KEY, Provenance
from pipeline.sources import (
    IMAGE_EXTENSIONS,
    InputImage,
    InputReadError,
    normalize_source,
    read_image_bytes,
)
from pipeline.store import PART_PREFIX, build_table, resolve, write_table_atomically

PLAN_FOLDER = "_plan"
PLAN_FILES = ("inputs.parquet", "plan.json")
# What fc7 writes in --out, and so all that --overwrite may delete there: the part files the
# plan names, and the hidden temporary files of parts being written.
PART_NAME = re.compile(rf"{PART_PREFIX}(\d{{5,}})\.parquet")
PART_TEMPORARY_NAME = re.compile(rf"\.{PART_PREFIX}\d{{5,}}\.parquet\.[0-9a-f]{{32}}\.tmp")
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
    # Sizes as a user writes them, so that --help shows "512MiB"; validated into bytes.
    max_bytes: int = Field("512MiB", validate_default=True, gt=0)
    decode_memory: int = Field("2GiB", validate_default=True, gt=0)
    overwrite: bool = False

    @field_validator("max_bytes", "decode_memory", mode="before")
    @classmethod
    def _size(cls, value: str | int) -> int:
        return parse_size(value)

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

    A new run needs an empty or missing `--out`; a folder holding anything else than an fc7
    output is refused, `--overwrite` or not, so that fc7 never deletes what it did not write.

    Raises:
        OutputError: `out` is not writable, is not empty and not an fc7 output, or holds an fc7
            output over another source (use `--overwrite` or another `--out`).
        ProvenanceMismatch: `out` was made with other weights, layer, preprocessing or dtype.
    """
    fs, out = resolve(config.out)
    plan_json = f"{out}/{PLAN_FOLDER}/plan.json"
    try:
        kind = fs.get_file_info(out).type
        has_plan = fs.get_file_info(plan_json).type == pafs.FileType.File
    except OSError as err:
        raise OutputError(f"--out {config.out}: cannot read: {err}") from err
    if kind not in (pafs.FileType.Directory, pafs.FileType.NotFound):
        raise OutputError(f"--out {config.out}: is a file, not a folder; choose a folder")
    if not has_plan:
        _require_new_output(fs, out, config.out)
        _create_plan_folder(fs, out, config.out)
        return None
    plan, problem = _read_plan(config.out)
    if config.overwrite:
        remove_output(fs, out, plan)
        _create_plan_folder(fs, out, config.out)
        return None
    if plan is None:
        raise ArtifactError(f"{plan_json}: unreadable run plan ({problem}); pass --overwrite "
                            "to start again")
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


def _read_plan(out: str) -> tuple[Plan | None, str | None]:
    """The plan recorded in `out`, or None and what is wrong with it."""
    fs, path = resolve(out)
    plan_json = f"{path}/{PLAN_FOLDER}/plan.json"
    try:
        with fs.open_input_stream(plan_json) as stream:
            recorded = json.loads(stream.read())
        plan = Plan(
            out=out,
            source=recorded["source"],
            limit=recorded["limit"],
            inputs=recorded["inputs"],
            shard_size=recorded["shard_size"],
            provenance=Provenance.from_json(json.dumps(recorded["provenance"]), where=plan_json),
        )
    except (OSError, ValueError, KeyError, TypeError, ArtifactError) as err:
        return None, repr(err)
    return plan, None


def _create_plan_folder(fs: pafs.FileSystem, out: str, shown: str) -> None:
    try:
        fs.create_dir(f"{out}/{PLAN_FOLDER}", recursive=True)
    except OSError as err:
        raise OutputError(f"--out {shown}: cannot write here: {err}") from err


def _require_new_output(fs: pafs.FileSystem, out: str, shown: str) -> None:
    """Refuse a folder with anything in it but the plan of a run killed while planning."""
    entries = _list(fs, out)
    foreign = [
        info.base_name + ("/" if info.type == pafs.FileType.Directory else "")
        for info in entries
        if not (info.base_name == PLAN_FOLDER and info.type == pafs.FileType.Directory)
    ]
    planning = next((i for i in entries if i.base_name == PLAN_FOLDER), None)
    if planning is not None and planning.type == pafs.FileType.Directory:
        foreign += [
            f"{PLAN_FOLDER}/{info.base_name}"
            for info in _list(fs, planning.path)
            if info.base_name != "inputs.parquet" and not info.base_name.startswith(".plan.json.")
        ]
    if foreign:
        shown_names = ", ".join(sorted(foreign)[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputError(
            f"--out {shown} is not empty and is not an fc7 extraction output (it holds "
            f"{shown_names}); fc7 writes only into an empty or new folder: choose another --out"
        )


def _list(fs: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError as err:
        raise OutputError(f"{folder}: cannot list: {err}") from err


def write_plan(
    config: ExtractConfig, provenance: Provenance, inputs: Iterable[InputImage]
) -> Plan:
    """Stream `inputs` into `_plan/inputs.parquet`, one row group per shard, then `plan.json`.

    `plan.json` is written last: a run killed while planning simply plans again.
    """
    fs, out = resolve(config.out)
    count = 0
    with pq.ParquetWriter(
        f"{out}/{PLAN_FOLDER}/inputs.parquet", PLAN_SCHEMA, filesystem=fs, write_page_checksum=True
    ) as writer:
        for chunk in _chunks(inputs, config.shard_size, config.limit):
            writer.write_table(
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
    # Moved into place once whole: a half-written plan.json would need --overwrite.
    temporary = f"{out}/{PLAN_FOLDER}/.plan.json.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(temporary) as stream:
        stream.write(json.dumps(record, indent=2).encode())
    fs.move(temporary, f"{out}/{PLAN_FOLDER}/plan.json")
    return plan


def pending_shards(plan: Plan) -> list[int]:
    """Shards whose part file is not there yet; also removes temporary files of killed runs."""
    fs, out = resolve(plan.out)
    done = set()
    for info in _list(fs, out):
        if info.type != pafs.FileType.File:
            continue
        if PART_TEMPORARY_NAME.fullmatch(info.base_name):
            fs.delete_file(info.path)
        elif match := PART_NAME.fullmatch(info.base_name):
            done.add(int(match.group(1)))
    return [shard for shard in range(plan.shards) if shard not in done]


def remove_output(fs: pafs.FileSystem, out: str, plan: Plan | None) -> None:
    """Delete what fc7 wrote in `out`, and nothing else.

    That is the part files the plan names, temporary part files, and the plan's own files (its
    folder too once empty). With an unreadable plan, part files are fc7's when their name is
    `part-NNNNN.parquet` and their schema carries fc7 provenance. Sub-folders are never entered,
    other files never touched.
    """
    for info in _list(fs, out):
        if info.type != pafs.FileType.File:
            continue
        name = info.base_name
        part = PART_NAME.fullmatch(name)
        if PART_TEMPORARY_NAME.fullmatch(name) or (
            part and (int(part.group(1)) < plan.shards if plan else _is_fc7_part(fs, info.path))
        ):
            fs.delete_file(info.path)
    plan_folder = f"{out}/{PLAN_FOLDER}"
    for info in _list(fs, plan_folder):
        if info.type == pafs.FileType.File and (
            info.base_name in PLAN_FILES or info.base_name.startswith(".plan.json.")
        ):
            fs.delete_file(info.path)
    if fs.get_file_info(plan_folder).type == pafs.FileType.Directory and not _list(
        fs, plan_folder
    ):
        fs.delete_dir(plan_folder)


def _is_fc7_part(fs: pafs.FileSystem, path: str) -> bool:
    try:
        metadata = pq.read_schema(path, filesystem=fs).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return False
    return PARQUET_METADATA_KEY in metadata


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


def _load_and_decode(item: dict, embedder: Embedder, config: ExtractConfig) -> DecodedRow:
    try:
        data = read_image_bytes(item["path"], config.max_bytes)
    except InputReadError as err:
        return DecodedRow(None, str(err))
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        tensor, width, height = decode_image(
            data, embedder.preprocessing, config.max_pixels, embedder.decode_budget
        )
    except ImageDecodeError as err:
        return DecodedRow(None, str(err), sha256)
    except (RuntimeError, MemoryError) as err:
        # What the decoders raise past the checks (an allocation the estimate missed): this
        # image fails, the shard and the run go on.
        return DecodedRow(None, f"cannot decode: {type(err).__name__}: {err}", sha256)
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
            load_weights(config.weights),
            config.layer,
            config.device,
            config.dtype,
            decode_memory=config.decode_memory,
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
            plan = pq.ParquetFile(file, page_checksum_verification=True)
            rows = plan.read_row_group(shard).to_pylist()
        # map() submits every row at once, so decoding runs ahead while the model works.
        decoded = self.decoder.map(
            lambda row: _load_and_decode(row, self.embedder, self.config), rows
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
        # A vector that is not finite in the stored type (NaN from the model, or a float16
        # overflow) would poison every index and classifier built on it: it is an error row.
        with np.errstate(over="ignore"):
            stored = embeddings.astype(np.dtype(self.plan.provenance.dtype))
        for position in np.flatnonzero(~np.isfinite(stored).all(axis=1)):
            if errors[position] is None:
                errors[position] = (f"non-finite embedding: the model gave NaN or inf (or a "
                                    f"value beyond the range of {self.plan.provenance.dtype})")
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


def start_ray() -> bool:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local Ray of our
    own; returns whether this call started one (then `stop_ray` stops it).

    Never joins a Ray that `ray start` left on this machine unless RAY_ADDRESS says so: that
    one runs in another Python environment, and when its head is dead `ray.init` waits forever.

    Raises:
        PipelineError: RAY_ADDRESS names a cluster that does not answer.
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _require_answering(address)
        ray.init(logging_level="WARNING")
        return False
    # Local workers import `pipeline` from this checkout even when it is not installed. No
    # dashboard: on a laptop its processes take CPU from the model (about 5% on 2 cores).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    ray.init(
        address="local",
        runtime_env={"env_vars": {"PYTHONPATH": path}},
        include_dashboard=False,
        logging_level="WARNING",
    )
    return True


def stop_ray() -> None:
    """Stop the local Ray that `start_ray` started; a second Ctrl-C meanwhile is not an error."""
    import ray

    try:
        ray.shutdown()
    except KeyboardInterrupt:
        pass


RAY_CONNECT_TIMEOUT_S = 10


def _require_answering(address: str) -> None:
    """Refuse a RAY_ADDRESS whose host does not take a connection, in seconds instead of
    `ray.init`'s endless retries."""
    if address == "auto":
        import ray._private.services as services  # how `ray.init` itself resolves "auto"

        try:
            found = services.canonicalize_bootstrap_address(address)
        except (ConnectionError, ValueError) as err:
            raise PipelineError(f"RAY_ADDRESS=auto: no running Ray cluster found ({err})") from err
        if found is None:
            raise PipelineError("RAY_ADDRESS=auto: no running Ray cluster found on this machine")
        address = found
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        return  # not host:port; let Ray say what it makes of it
    try:
        with socket.create_connection((host.strip("[]"), int(port)), RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise PipelineError(
            f"RAY_ADDRESS={address}: no Ray cluster answers there ({err.strerror or err}); "
            "start it (ray start --head), or unset RAY_ADDRESS to run on a local Ray"
        ) from None


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
    started = start_ray()
    try:
        return _run_on_actors(config, plan, shards, on_shard_done)
    finally:
        if started:
            stop_ray()


def _run_on_actors(config: ExtractConfig, plan: Plan, shards: list[int], on_shard_done):
    import ray

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
