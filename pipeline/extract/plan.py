"""The plan of a run and the output folder it owns.

The output folder holds `part-NNNNN.parquet` (one per shard, written atomically) and `_plan/`
(the plan: `inputs.parquet`, one row group per shard, and `plan.json` with the provenance).
Resuming is therefore exact: a shard is done when its part file exists, whatever killed the
previous run; nothing is recomputed or duplicated.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import (
    ArtifactError,
    OutputError,
    SourceError,
)
from pipeline.extract.config import ExtractConfig
from pipeline.fs import resolve, uri_builder
from pipeline.provenance import INT8_MODEL_NAME, PARQUET_METADATA_KEY, Provenance
from pipeline.sources import (
    IMAGE_EXTENSIONS,
    InputImage,
)
from pipeline.store import PART_PREFIX

PLAN_FOLDER = "_plan"
PLAN_FILES = ("inputs.parquet", "plan.json")
# What fc7 writes in --out, and so all that --overwrite may delete there: the part files the
# plan names, and the hidden temporary files of parts being written.
PART_NAME = re.compile(rf"{PART_PREFIX}(\d{{5,}})\.parquet")
PART_TEMPORARY_NAME = re.compile(rf"\.{PART_PREFIX}\d{{5,}}\.parquet\.[0-9a-f]{{32}}\.tmp")
# What a Ray run records in `_plan/`: which node and worker embedded each shard (pool.py).
RUN_RECORD_NAME = re.compile(r"run-\d{8}T\d{6}Z-[0-9a-f]{6}\.json")
PLAN_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("label", pa.string())])

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


def plan_folder(out: str) -> str:
    """The plan folder of the extraction output `out` (where its int8 model is too), as a path
    or URI like `out`."""
    _, path = resolve(out)
    return uri_builder(out)(f"{path.rstrip('/')}/{PLAN_FOLDER}")


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
    if provenance.precision == plan.provenance.precision == "int8":
        # The int8 model is built after planning (see calibrate.prepare_int8); a resumed run
        # takes the one the first run built rather than calibrating again.
        provenance = provenance.model_copy(
            update={"int8_model_sha256": plan.provenance.int8_model_sha256}
        )
    plan.provenance.require_compatible(
        provenance, f"the embeddings in --out {config.out}", "this run", same_dtype=True,
        fix="pass --overwrite to replace them, or choose another --out",
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
    _write_plan_json(plan)
    return plan


def record_provenance(plan: Plan, provenance: Provenance) -> Plan:
    """Rewrite `plan.json` with `provenance` (an int8 model's, once built); returns the new plan.

    Only what the plan's embeddings are not yet made with may change: the caller checks that.
    """
    plan = dataclasses.replace(plan, provenance=provenance)
    _write_plan_json(plan)
    return plan


def _write_plan_json(plan: Plan) -> None:
    fs, out = resolve(plan.out)
    record = {
        "source": plan.source,
        "limit": plan.limit,
        "inputs": plan.inputs,
        "shards": plan.shards,
        "shard_size": plan.shard_size,
        "provenance": json.loads(plan.provenance.to_json()),
    }
    # Moved into place once whole: a half-written plan.json would need --overwrite.
    temporary = f"{out}/{PLAN_FOLDER}/.plan.json.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(temporary) as stream:
        stream.write(json.dumps(record, indent=2).encode())
    fs.move(temporary, f"{out}/{PLAN_FOLDER}/plan.json")


def run_record_name(started: str) -> str:
    """The name of the record of a run that started at `started` (ISO 8601, UTC, seconds)."""
    return f"run-{started.replace(':', '').replace('-', '')}-{uuid.uuid4().hex[:6]}.json"


@contextmanager
def open_inputs(plan: Plan) -> Iterator[pq.ParquetFile]:
    """The plan's `inputs.parquet` (one row group per shard), its page checksums verified.

    Raises:
        ArtifactError: the file cannot be read or fails its checksums.
    """
    fs, _ = resolve(plan.out)
    try:
        with fs.open_input_file(plan.inputs_file) as file:
            yield pq.ParquetFile(file, page_checksum_verification=True)
    except (OSError, pa.ArrowInvalid) as err:
        raise ArtifactError(
            f"{plan.inputs_file}: cannot read the run's plan ({err}); plan again with "
            "--overwrite, or choose another --out"
        ) from err


def done_shards(plan: Plan) -> set[int]:
    """Shards whose part file is in the output; deletes nothing."""
    fs, out = resolve(plan.out)
    return {
        int(match.group(1))
        for info in _list(fs, out)
        if info.type == pafs.FileType.File and (match := PART_NAME.fullmatch(info.base_name))
        and int(match.group(1)) < plan.shards
    }


def pending_shards(plan: Plan) -> list[int]:
    """Shards whose part file is not there yet; also removes temporary files of killed runs."""
    remove_temporary_parts(plan)
    done = done_shards(plan)
    return [shard for shard in range(plan.shards) if shard not in done]


def remove_temporary_parts(plan: Plan) -> None:
    """Delete the hidden temporary part files that killed workers left in the output."""
    fs, out = resolve(plan.out)
    for info in _list(fs, out):
        if info.type == pafs.FileType.File and PART_TEMPORARY_NAME.fullmatch(info.base_name):
            try:
                fs.delete_file(info.path)
            except FileNotFoundError:  # its worker, still alive, moved it into place
                pass


def remove_output(fs: pafs.FileSystem, out: str, plan: Plan | None) -> None:
    """Delete what fc7 wrote in `out`, and nothing else.

    That is the part files the plan names, temporary part files, and the plan's own files (its
    int8 model and run records among them; its folder too once empty). With an unreadable
    plan, part files are fc7's when their name is `part-NNNNN.parquet` and their schema
    carries fc7 provenance. Sub-folders are never entered, other files never touched.
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
            info.base_name in PLAN_FILES
            or info.base_name.startswith(".plan.json.")
            or RUN_RECORD_NAME.fullmatch(info.base_name)
            or INT8_MODEL_NAME.fullmatch(info.base_name)
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
