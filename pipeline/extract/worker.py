"""Embedding one shard: read, decode in a thread pool while the model runs, write one part.

The per-row cost of the engine (Ray) is paid once per shard, not once per image.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from pipeline.decode import DecodeBudget, ImageDecodeError, decode_image
from pipeline.extract.config import ExtractConfig
from pipeline.extract.plan import Plan, open_inputs, plan_folder
from pipeline.fs import is_uri, resolve
from pipeline.gpu import GpuJpegDecoder
from pipeline.model import Embedder, Weights
from pipeline.provenance import Preprocessing
from pipeline.sources import (
    InputReadError,
    read_image_bytes,
)
from pipeline.store import build_table, write_table_atomically


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


class DecodedRow(NamedTuple):
    """One input after reading and decoding: a tensor, or the error that stopped it."""

    tensor: torch.Tensor | None
    error: str | None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None


def read_row(item: dict, config: ExtractConfig) -> tuple[bytes | None, DecodedRow]:
    """The file's bytes and its row so far (sha256, or the read error)."""
    try:
        data = read_image_bytes(item["path"], config.max_bytes)
    except InputReadError as err:
        return None, DecodedRow(None, str(err))
    return data, DecodedRow(None, None, hashlib.sha256(data).hexdigest())


def _load_and_decode(
    item: dict, embedder: Embedder, config: ExtractConfig, decode_slots: threading.Semaphore
) -> DecodedRow:
    data, row = read_row(item, config)
    if data is None:
        return row
    return decode_row(data, row.sha256, embedder.preprocessing, config.max_pixels,
                      embedder.decode_budget, decode_slots)


def decode_row(
    data: bytes,
    sha256: str | None,
    preprocessing: Preprocessing,
    max_pixels: int,
    budget: DecodeBudget,
    decode_slots: threading.Semaphore,
) -> DecodedRow:
    """One file's bytes decoded for the model, or the reason they cannot be; never raises for
    a bad file. Shared with `pipeline.raydata.FC7Embedder` and the dry run's calibration."""
    try:
        with decode_slots:
            tensor, width, height = decode_image(data, preprocessing, max_pixels, budget)
    except ImageDecodeError as err:
        return DecodedRow(None, str(err), sha256)
    except (RuntimeError, MemoryError) as err:
        # What the decoders raise past the checks (an allocation the estimate missed): this
        # image fails, the shard and the run go on.
        return DecodedRow(None, f"cannot decode: {type(err).__name__}: {err}", sha256)
    return DecodedRow(tensor, None, sha256, width, height)


def embed_rows(
    embedder: Embedder, decoded: Iterable[DecodedRow], count: int, batch_size: int, dtype: str
) -> tuple[np.ndarray, list[DecodedRow]]:
    """Run the model on decoded rows, `batch_size` images a call, as they arrive.

    Args:
        embedder: the model.
        decoded: `count` rows, each a tensor or an error (e.g. a thread pool's `map`).
        count: how many rows `decoded` yields.
        batch_size: images per model call.
        dtype: the stored type: a vector not finite in it becomes an error row.

    Returns:
        (a (count, dim) float32 array, zero where there is no embedding; the rows, their
        tensors released and `error` set for non-finite vectors).
    """
    embeddings = np.zeros((count, embedder.dim), dtype=np.float32)
    rows: list[DecodedRow] = []
    waiting: list[int] = []  # positions of decoded rows waiting for the model
    for position, row in enumerate(decoded):
        rows.append(row)
        if row.tensor is not None:
            waiting.append(position)
        if waiting and (len(waiting) == batch_size or position == count - 1):
            embeddings[waiting] = embedder(torch.stack([rows[i].tensor for i in waiting]))
            for i in waiting:  # the tensor is in `embeddings` now; free its memory
                rows[i] = rows[i]._replace(tensor=None)
            waiting = []
    # A vector that is not finite in the stored type (NaN from the model, or a float16
    # overflow) would poison every index and classifier built on it: it is an error row.
    with np.errstate(over="ignore"):
        stored = embeddings.astype(np.dtype(dtype))
    for position in np.flatnonzero(~np.isfinite(stored).all(axis=1)):
        if rows[position].error is None:
            rows[position] = rows[position]._replace(error=(
                f"non-finite embedding: the model gave NaN or inf (or a value beyond the range "
                f"of {dtype})"
            ))
    return embeddings, rows


def _crash_if_named(rows: list[dict]) -> None:
    """Tests only (tests/test_cluster.py): end this process at once, as a native crash in a
    decoder would, on an input whose id is listed in the file FC7_TEST_CRASH_FILE names."""
    marker = os.environ.get("FC7_TEST_CRASH_FILE")
    if marker and os.path.isfile(marker):
        with open(marker) as names:
            if {row["id"] for row in rows} & set(names.read().split()):
                os._exit(70)


class ShardEmbedder:
    """Loads the model once; `__call__(shard)` embeds one shard of the plan into its part file.

    Plain Python: Ray runs it as an actor, and the local runner calls it in its own process
    (`run_shards`).

    Args:
        threads: CPU threads of this replica (all of this process's when None).
        weights: already loaded weights (the local runner's); loaded here when None. Either way
            checked against the plan's provenance.
    """

    def __init__(
        self,
        config: ExtractConfig,
        plan: Plan,
        threads: int | None = None,
        weights: Weights | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.config = config
        self.plan = plan
        self.embedder = Embedder.matching(
            plan.provenance,
            config.device,
            config.decode_memory,
            weights=weights,
            model_dirs=(plan_folder(plan.out),),
        )
        # On CUDA, JPEGs are decoded on the GPU in model-sized batches (pipeline.gpu).
        self.gpu_decoder = (
            GpuJpegDecoder(
                self.embedder.preprocessing,
                self.embedder.device,
                config.max_pixels,
                self.embedder.decode_budget,
            )
            if self.embedder.device.type == "cuda"
            else None
        )
        # Decoding overlaps the model; one decode per spare core, at least one. Reads wait on
        # the disk or the network, not the CPU, so more of them run at once (on an object
        # store, many): a slow read does not leave the model without images.
        cores = threads or len(os.sched_getaffinity(0))
        self.decode_slots = threading.BoundedSemaphore(max(1, cores - 1))
        readers = 16 if is_uri(plan.source) else max(1, cores - 1) + 1
        self.loader = ThreadPoolExecutor(readers, thread_name_prefix="fc7-read")

    def close(self) -> None:
        """Stop the read and decode threads (a Ray actor's end does this for it)."""
        self.loader.shutdown(wait=True, cancel_futures=True)

    def __call__(self, shard: int) -> ShardStats:
        started = time.time()
        with open_inputs(self.plan) as inputs:
            rows = inputs.read_row_group(shard).to_pylist()
        _crash_if_named(rows)
        if self.gpu_decoder is not None:
            decoded = self._decoded_on_gpu(rows)
        else:
            # map() submits every row at once, so reading and decoding run ahead while the
            # model works; at most one file's bytes per thread are held.
            decoded = self.loader.map(
                lambda row: _load_and_decode(row, self.embedder, self.config, self.decode_slots),
                rows,
            )
        embeddings, results = embed_rows(
            self.embedder, decoded, len(rows), self.config.batch_size, self.plan.provenance.dtype
        )
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
        write_table_atomically(table, resolve(self.plan.out)[0], self.plan.part_file(shard))
        failures = [error for error in errors if error is not None]
        return ShardStats(
            seen=len(rows),
            embedded=len(rows) - len(failures),
            failed=len(failures),
            reasons=Counter(error.split(":", 1)[0] for error in failures),
            started=started,
            finished=time.time(),
        )

    def _decoded_on_gpu(self, rows: list[dict]) -> Iterator[DecodedRow]:
        """The rows decoded by the GPU, a model batch of files at a time, while the read
        threads fetch the next files."""
        reads = self.loader.map(lambda row: read_row(row, self.config), rows)
        pending: list[tuple[bytes | None, DecodedRow]] = []
        for position, read in enumerate(reads):
            pending.append(read)
            if len(pending) == self.config.batch_size or position == len(rows) - 1:
                files = [data for data, _ in pending if data is not None]
                images = iter(self.gpu_decoder.decode(files))
                for data, row in pending:
                    if data is None:
                        yield row
                    else:
                        image = next(images)
                        yield row._replace(tensor=image.tensor, error=image.error,
                                           width=image.width, height=image.height)
                pending = []
