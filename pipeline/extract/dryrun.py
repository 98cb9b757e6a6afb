"""`fc7 extract --dry-run`: the plan of a run, summed up without embedding anything.

    figures      images, shards, labels and bytes, read from `_plan/inputs.parquet` one row
                 group (one shard) at a time: a plan of millions of images is summed up in the
                 memory of one shard
    layout       the replicas the run would start (`layout.worker_slots`), on this machine or
                 on the cluster in RAY_ADDRESS
    calibration  a seeded sample of the plan's images read, decoded and embedded here with one
                 replica's threads: images/s, and from it an estimate of the run's time

The plan itself is written as a run writes it, so the run that follows reuses it.
"""

from __future__ import annotations

import os
import random
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.decode import DecodeBudget
from pipeline.extract.config import ExtractConfig
from pipeline.extract.layout import Node, Slot, cluster_nodes, local_nodes, worker_slots
from pipeline.extract.plan import Plan, done_shards, open_inputs, plan_folder
from pipeline.extract.runner import choose_runner, start_ray, stop_ray
from pipeline.extract.worker import decode_row, read_row
from pipeline.fs import is_uri
from pipeline.model import Embedder, Weights, resolve_device

CALIBRATION_IMAGES = 32
TOP_LABELS = 5
# Per-shard label counts are merged in Arrow every so many shards: memory grows with the
# distinct labels, never with the rows.
_MERGE_EVERY = 64
_SHOWN_NODES = 8


@dataclass(frozen=True)
class PlanFigures:
    """What a plan holds, counted from `_plan/inputs.parquet` one row group at a time.

    Sizes are known for local paths (from `stat`); object-store paths are counted in `remote`,
    their sizes unknown: the plan keeps no sizes, and asking the store for each would be a
    pass over the whole collection.
    """

    images: int
    shards: int
    done_shards: int  # part files already in --out (an earlier run's)
    pending_images: int
    labelled: int
    labels: int  # distinct labels
    top_labels: tuple[tuple[str, int], ...]
    bytes: int  # of the local regular files found
    sized: int  # local regular files found
    missing: int  # local paths that do not exist or cannot be stat'ed
    not_regular: int  # local paths that are folders, devices, FIFOs...
    remote: int  # object-store paths, sizes unknown


@dataclass(frozen=True)
class RunLayout:
    """The replicas a run of this plan would start, and on which machines."""

    runner: str  # "local" (this process) or "ray"
    where: str  # in words, for the summary
    nodes: tuple[Node, ...]
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class Calibration:
    """A sample of the plan read, decoded and embedded here, as one replica would."""

    sampled: int
    embedded: int
    seconds: float  # read + decode, then the model: wall-clock, after a warm-up batch
    threads: int
    device: str
    precision: str
    first_error: str | None = None

    @property
    def rate(self) -> float | None:
        """Images/s of one replica, or None when nothing of the sample could be embedded."""
        return self.embedded / self.seconds if self.embedded and self.seconds > 0 else None


@dataclass(frozen=True)
class DryRun:
    """Everything a dry run found; `describe()` is what `fc7 extract --dry-run` prints."""

    plan: Plan
    figures: PlanFigures
    layout: RunLayout
    calibration: Calibration | None
    no_estimate: str | None = None  # why there is no calibration, when there is none
    notes: tuple[str, ...] = ()

    @property
    def estimated_seconds(self) -> float | None:
        """The pending images over (one replica's rate x replicas); None without a rate."""
        rate = self.calibration.rate if self.calibration else None
        if self.figures.pending_images == 0:
            return 0.0
        if rate is None:
            return None
        return self.figures.pending_images / (rate * len(self.layout.slots))

    def describe(self) -> str:
        """The lines `fc7 extract --dry-run` prints."""
        figures, plan = self.figures, self.plan
        lines = [
            f"fc7 extract --dry-run: {plan.source} -> {plan.out} (nothing embedded)",
            f"  plan: {plan_folder(plan.out)}; "
            + ("run the same command without --dry-run to embed it (the run reuses this plan)"
               if figures.pending_images else "complete: every shard is embedded"),
            f"  images: {figures.images:,} in {_count(figures.shards, 'shard')} of up to "
            f"{plan.shard_size:,}"
            + (f" ({figures.done_shards:,} already done, {figures.pending_images:,} images "
               "to go)" if figures.done_shards else ""),
            "  labels: " + _labels_line(figures),
            "  bytes: " + _bytes_line(figures),
            "  workers: " + _layout_line(self.layout),
        ]
        lines += [f"    {line}" for line in _node_lines(self.layout)]
        lines.append("  calibration: " + _calibration_line(self.calibration, self.no_estimate))
        lines.append("  estimate: " + self._estimate_line())
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)

    def _estimate_line(self) -> str:
        seconds = self.estimated_seconds
        if self.figures.pending_images == 0:
            return "nothing to do: every shard is done"
        if seconds is None:
            return "none (no images/s measured)"
        return (
            f"{_duration(seconds)} for {self.figures.pending_images:,} images at "
            f"{self.calibration.rate:.1f} images/s x {_count(len(self.layout.slots), 'replica')}"
            "\n    (an estimate: it assumes throughput grows linearly with the replicas and "
            "every node is like this machine;\n    start-up, Ray's and a model load per "
            "replica, is not included)"
        )


def dry_run(
    config: ExtractConfig, plan: Plan, weights: Weights, sample: int = CALIBRATION_IMAGES
) -> DryRun:
    """Sum up `plan` (already written) and estimate its run, embedding only `sample` images.

    Args:
        config: the run's options.
        plan: the plan `prepare_output` returned or `write_plan` wrote.
        weights: the loaded weights (the calibration's model is built from them).
        sample: images of the plan embedded here to measure images/s (seeded, spread over
            the plan).

    Returns:
        The figures, the layout, the calibration and the estimate; `describe()` words them.

    Raises:
        ConfigError: no node can hold one replica, or --device cuda without a GPU (as the
            run would).
        PipelineError: RAY_ADDRESS names a cluster that does not answer.
        ArtifactError: the plan's inputs file fails its checksums.

    Example:
        >>> plan = prepare_output(config, provenance) or write_plan(  # doctest: +SKIP
        ...     config, provenance, iter_inputs(config.source))
        >>> print(dry_run(config, plan, weights).describe())         # doctest: +SKIP
    """
    figures = plan_figures(plan)
    layout = run_layout(config, plan.inputs)
    notes = []
    if plan.provenance.precision == "int8":
        notes.append(
            f"int8: a dry run does not build the int8 model; the run calibrates it (on "
            f"{config.int8_calibration_images} images, checked against fp32 on "
            f"{config.int8_check_images}) or takes it from the cache. The images/s above are "
            "fp32's (int8 is usually faster on the CPU)"
        )
    if figures.pending_images == 0:
        return DryRun(plan, figures, layout, None, "every shard is done", tuple(notes))
    slot = layout.slots[0]
    if slot.gpus and not torch.cuda.is_available():
        reason = "the replicas run on GPUs and this machine has none to measure one"
        return DryRun(plan, figures, layout, None, reason, tuple(notes))
    device = "cuda" if slot.gpus else "cpu"
    threads = min(slot.cpus, len(os.sched_getaffinity(0)))
    if threads < slot.cpus:
        notes.append(f"measured with {threads} threads here; each replica has {slot.cpus}")
    calibration = calibrate(config, plan, weights, sample_rows(plan, sample), threads, device)
    return DryRun(plan, figures, layout, calibration, None, tuple(notes))


def plan_figures(plan: Plan, top: int = TOP_LABELS) -> PlanFigures:
    """Images, shards, labels and bytes of `plan`, streamed one row group at a time.

    Args:
        plan: a written plan.
        top: how many of the most common labels to name.

    Returns:
        The figures; label counts are exact, the `top` most common first (ties by name).

    Raises:
        ArtifactError: the inputs file is unreadable or fails its page checksums.

    Example:
        >>> plan_figures(plan).labels  # doctest: +SKIP
        3
    """
    images = 0
    labels = _LabelCounts()
    sizes = _Sizes()
    for table in _row_groups(plan, ["path", "label"]):
        images += table.num_rows
        labels.add(table["label"])
        sizes.add(table["path"].to_pylist())
    done = done_shards(plan)
    counted = labels.result()
    top_labels = counted.sort_by([("count", "descending"), ("label", "ascending")]).slice(0, top)
    return PlanFigures(
        images=images,
        shards=plan.shards,
        done_shards=len(done),
        pending_images=sum(plan.shard_rows(s) for s in range(plan.shards) if s not in done),
        labelled=labels.labelled,
        labels=counted.num_rows,
        top_labels=tuple((row["label"], row["count"]) for row in top_labels.to_pylist()),
        bytes=sizes.bytes,
        sized=sizes.sized,
        missing=sizes.missing,
        not_regular=sizes.not_regular,
        remote=sizes.remote,
    )


def sample_rows(plan: Plan, count: int = CALIBRATION_IMAGES, seed: int = 0) -> list[dict]:
    """`count` rows of the plan drawn with `seed` from all of it, reading only their shards.

    Args:
        plan: a written plan.
        count: rows wanted (all of them when the plan has fewer).
        seed: the same seed draws the same rows.

    Returns:
        The rows (`id`, `path`, `label`) in plan order.

    Raises:
        ArtifactError: the inputs file is unreadable or fails its page checksums.

    Example:
        >>> [row["id"] for row in sample_rows(plan, 2)]  # doctest: +SKIP
        ['dalmatian/image_0003.jpg', 'airplanes/image_0001.jpg']
    """
    wanted = sorted(random.Random(seed).sample(range(plan.inputs), min(count, plan.inputs)))
    rows: list[dict] = []
    with open_inputs(plan) as parquet:
        start = 0
        for group in range(parquet.num_row_groups):
            end = start + parquet.metadata.row_group(group).num_rows
            here = [position - start for position in wanted if start <= position < end]
            if here:
                table = parquet.read_row_group(group).take(here)
                rows += table.to_pylist()
            start = end
    return rows


def calibrate(
    config: ExtractConfig,
    plan: Plan,
    weights: Weights,
    rows: list[dict],
    threads: int,
    device: str = "cpu",
) -> Calibration:
    """Read, decode and embed `rows` here as one replica of `threads` CPUs would; time it.

    Reads and decodes run first in `threads - 1` threads (a worker's decode threads), then the
    model in batches of `--batch-size` after one warm-up batch; the time is the sum of both (a
    worker overlaps them, so it can be somewhat faster). The model is built only when some
    image decoded. An int8 plan is measured in fp32: its model is not built by a dry run.

    Args:
        config: the run's options (batch size, limits, decode memory).
        plan: the plan the rows come from (its provenance says which model).
        weights: the loaded weights.
        rows: plan rows, e.g. from `sample_rows`.
        threads: CPU threads of one replica.
        device: cpu or cuda, where the replicas would run.

    Returns:
        What was embedded and how long it took; `rate` is None when nothing decoded.

    Raises:
        ConfigError: `device` is cuda and this machine has no CUDA.

    Example:
        >>> calibrate(config, plan, weights, sample_rows(plan), threads=2).rate  # doctest: +SKIP
        35.2
    """
    preprocessing = plan.provenance.preprocessing
    budget = DecodeBudget(config.decode_memory)
    precision = "fp32" if plan.provenance.precision == "int8" else plan.provenance.precision

    decoders = max(1, threads - 1)
    decode_slots = threading.BoundedSemaphore(decoders)

    def load(row: dict) -> tuple[torch.Tensor | None, str | None]:
        # What a worker does with each row: read it, hash it, decode it.
        data, read = read_row(row, config)
        if data is None:
            return None, read.error
        decoded = decode_row(data, read.sha256, preprocessing, config.max_pixels, budget,
                             decode_slots)
        return decoded.tensor, decoded.error

    started = time.perf_counter()
    with ThreadPoolExecutor(decoders, thread_name_prefix="fc7-dry-run") as pool:
        loaded = list(pool.map(load, rows))
    decode_seconds = time.perf_counter() - started
    tensors = [tensor for tensor, _ in loaded if tensor is not None]
    first_error = next((error for _, error in loaded if error is not None), None)
    if not tensors:
        return Calibration(len(rows), 0, decode_seconds, threads, device, precision, first_error)
    embedder = Embedder(
        weights, plan.provenance.layer, device, plan.provenance.dtype, preprocessing,
        config.decode_memory, precision=precision,
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # The first call sets up the kernels (and on CUDA the allocator): once per replica in
        # a run, so left out of the rate.
        embedder(torch.stack(tensors[: config.batch_size]))
        started = time.perf_counter()
        for start in range(0, len(tensors), config.batch_size):
            embedder(torch.stack(tensors[start : start + config.batch_size]))
        model_seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    return Calibration(len(rows), len(tensors), decode_seconds + model_seconds, threads, device,
                       precision, first_error)


def run_layout(config: ExtractConfig, images: int) -> RunLayout:
    """The replicas a run of `images` images would start, as `run_shards` would lay them out.

    The local runner is one replica in this process; Ray's replicas come from
    `layout.worker_slots` on this machine (the local Ray a run would start) or, with
    RAY_ADDRESS set or Ray already started here, on that cluster's live nodes.

    Args:
        config: the run's options (--runner, --num-workers, --cpus-per-worker, --device).
        images: the plan's size (small jobs run in this process).

    Returns:
        The runner, the nodes and one slot per replica.

    Raises:
        ConfigError: no node can hold one replica, or --device cuda without a GPU.
        PipelineError: RAY_ADDRESS names a cluster that does not answer.

    Example:
        >>> run_layout(ExtractConfig(source="photos", out="emb"), 12).runner  # doctest: +SKIP
        'local'
    """
    runner = choose_runner(config, images)
    if runner == "local":
        (machine,) = local_nodes()
        threads = config.cpus_per_worker or machine.cpus
        gpus = 1.0 if resolve_device(config.device).type == "cuda" else 0.0
        return RunLayout("local", "in this process", (machine,),
                         (Slot(machine.id, 0, threads, gpus),))
    import ray

    if os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        joined = not ray.is_initialized()
        start_ray()
        try:
            nodes = cluster_nodes()
        finally:
            if joined:  # only disconnects this process from the cluster
                stop_ray()
        where = "on the Ray cluster " + (
            f"at {os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS")
            else "this process runs"
        )
    else:
        nodes = local_nodes()
        where = "on the local Ray the run would start"
    return RunLayout("ray", where, tuple(nodes), tuple(worker_slots(config, nodes)))


class _LabelCounts:
    """Exact counts per label, kept as small Arrow tables and merged every so many shards."""

    def __init__(self) -> None:
        self.parts: list[pa.Table] = []
        self.labelled = 0

    def add(self, labels: pa.ChunkedArray) -> None:
        present = labels.filter(pc.is_valid(labels))
        self.labelled += len(present)
        counts = pa.table({"label": present}).group_by("label").aggregate([([], "count_all")])
        self.parts.append(counts.rename_columns(["label", "count"]))
        if len(self.parts) >= _MERGE_EVERY:
            self.parts = [self.result()]

    def result(self) -> pa.Table:
        if not self.parts:
            return pa.table({"label": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        merged = pa.concat_tables(self.parts).group_by("label").aggregate([("count", "sum")])
        return merged.rename_columns(["label", "count"])


@dataclass
class _Sizes:
    bytes: int = 0
    sized: int = 0
    missing: int = 0
    not_regular: int = 0
    remote: int = 0

    def add(self, paths: list[str]) -> None:
        for path in paths:
            if is_uri(path):
                self.remote += 1
                continue
            try:
                status = os.stat(path)
            except OSError:
                self.missing += 1
                continue
            if stat.S_ISREG(status.st_mode):
                self.bytes += status.st_size
                self.sized += 1
            else:
                self.not_regular += 1


def _row_groups(plan: Plan, columns: list[str]) -> Iterator[pa.Table]:
    with open_inputs(plan) as parquet:
        for group in range(parquet.num_row_groups):
            yield parquet.read_row_group(group, columns=columns)


def _labels_line(figures: PlanFigures) -> str:
    if not figures.labelled:
        return "none (no image has a label)"
    top = ", ".join(f"{label} {count:,}" for label, count in figures.top_labels)
    unlabelled = figures.images - figures.labelled
    return (
        f"{figures.labels:,} distinct on {figures.labelled:,} images"
        + (f" ({unlabelled:,} without a label)" if unlabelled else "")
        + f"; most common: {top}"
    )


def _bytes_line(figures: PlanFigures) -> str:
    parts = []
    if figures.sized:
        parts.append(f"{figures.bytes:,} ({_size(figures.bytes)}) in "
                     f"{_count(figures.sized, 'local file')}")
    if figures.missing or figures.not_regular:
        parts.append(f"{figures.missing + figures.not_regular:,} local paths missing or not "
                     "regular files (they will be error rows)")
    if figures.remote:
        parts.append(f"unknown for {figures.remote:,} object-store images (the plan keeps no "
                     "sizes, and asking the store for each would be a pass over all of them)")
    return "; ".join(parts)


def _layout_line(layout: RunLayout) -> str:
    if layout.runner == "local":
        (slot,) = layout.slots
        device = f"{slot.cpus} CPU threads" + (", 1 GPU" if slot.gpus else ", no GPU")
        return f"{layout.where} (runner local): 1 replica, {device}"
    nodes = len({slot.node_id for slot in layout.slots})
    return (f"Ray (runner ray) {layout.where}: {_count(len(layout.slots), 'replica')} on "
            f"{_count(nodes, 'node')}")


def _node_lines(layout: RunLayout) -> list[str]:
    if layout.runner == "local":
        return []
    lines = []
    for node in layout.nodes[:_SHOWN_NODES]:
        slots = [slot for slot in layout.slots if slot.node_id == node.id]
        shares = sorted({(slot.cpus, slot.gpus) for slot in slots})
        each = ", ".join(f"{cpus} CPU" + (f" + {gpus:g} GPU" if gpus else "")
                         for cpus, gpus in shares)
        lines.append(f"{node}: {_count(len(slots), 'replica')}" + (f" of {each}" if slots else ""))
    if len(layout.nodes) > _SHOWN_NODES:
        lines.append(f"... and {len(layout.nodes) - _SHOWN_NODES} more nodes")
    return lines


def _calibration_line(calibration: Calibration | None, no_estimate: str | None) -> str:
    if calibration is None:
        return f"skipped: {no_estimate}"
    if calibration.rate is None:
        return (f"none of the {calibration.sampled} sampled images could be embedded (first: "
                f"{calibration.first_error}), so no images/s")
    failed = calibration.sampled - calibration.embedded
    return (
        f"{calibration.embedded} of {calibration.sampled} sampled images read, decoded and "
        f"embedded here in {calibration.seconds:.2f} s: {calibration.rate:.1f} images/s for one "
        f"replica ({calibration.threads} threads, {calibration.device}, {calibration.precision})"
        + (f"; {failed} failed (first: {calibration.first_error})" if failed else "")
    )


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _count(number: int, thing: str) -> str:
    return f"{number:,} {thing}{'s' if number != 1 else ''}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"about {minutes:.0f} min"
    hours, minutes = divmod(round(minutes), 60)
    if hours < 48:
        return f"about {hours} h {minutes:02d} min"
    return f"about {hours // 24} d {hours % 24} h"
