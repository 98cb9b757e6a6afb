"""Filling a trained IVF index on Ray: each task encodes a range of shards, the driver merges.

The driver trains (as a single-process build does), then sends the trained, empty index to
Ray tasks, each of which adds the indexed rows of a contiguous range of shards
(`encode.encode_range`) and ranks them for the evaluation queries. The driver merges the parts
in shard order as they arrive (`encode.merge_into`), so the result is byte-identical to the
single-process build. A task whose worker or node is lost is run again by Ray (`max_retries`):
encoding is deterministic, so the part it gives back is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from pipeline.index.encode import RowLayout, encode_range, merge_into, reserve
from pipeline.index.faiss_env import faiss
from pipeline.index.tune import ExactSearch
from pipeline.store import EmbeddingDataset

# Ranges per CPU of the cluster: several, so that a lost task redoes little and a slow node
# does not hold the others up at the end.
RANGES_PER_CPU = 4
# And at most this many bytes of index per range: the driver holds a part twice (as sent and
# deserialised) while it merges it.
PART_BYTES = 200_000_000
TASK_RETRIES = 3


def encode_part(
    trained: bytes | np.ndarray,
    uri: str,
    only: tuple[Any, str],
    layout: RowLayout,
    shards: tuple[int, int],
    metric: str,
    batch_size: int,
    queries: np.ndarray,
    k: int,
    threads: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Ray task: the serialised part index of `shards`, and its exact top-k (distances,
    global positions) for `queries`. `only` is the driver's row restriction (`--keep`)."""
    faiss.omp_set_num_threads(threads)
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    oracle = ExactSearch(queries, metric, k)
    data = replace(EmbeddingDataset.open(uri), only=only[0], only_digest=only[1])
    encode_range(index, data, layout, shards, metric, batch_size, oracle)
    distances, positions = oracle.results()
    return faiss.serialize_index(index), distances, positions


def encode_on_ray(
    trained: faiss.Index,
    data: EmbeddingDataset,
    layout: RowLayout,
    metric: str,
    batch_size: int,
    oracle: ExactSearch,
    cpus_per_task: int,
    report: Callable[[str], None],
    index_bytes: int | None = None,
) -> faiss.Index:
    """The trained index filled with every indexed row of `data`, encoded by Ray tasks.

    `oracle` receives each task's exact results. Ray must be started (`start_ray`).
    `index_bytes`, the filled index's estimated size, sets how many ranges at least.
    """
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    by_size = -(-(index_bytes or 0) // PART_BYTES)
    ranges = layout.ranges(max(max(1, cpus // cpus_per_task) * RANGES_PER_CPU, by_size))
    task = ray.remote(encode_part).options(
        num_cpus=cpus_per_task, max_retries=TASK_RETRIES, retry_exceptions=False
    )
    empty = ray.put(faiss.serialize_index(trained))
    queries = ray.put(oracle.queries)
    pending = {
        task.remote(empty, data.uri, (data.only, data.only_digest), layout, shards, metric,
                    batch_size, queries, oracle.k, cpus_per_task): number
        for number, shards in enumerate(ranges)
    }
    report(f"encoding {len(ranges)} ranges of shards on Ray ({cpus} CPUs, "
           f"{cpus_per_task} per task)")
    merged = faiss.deserialize_index(faiss.serialize_index(trained))
    reserve(merged, layout.count)
    arrived: dict[int, tuple] = {}
    next_part = 0
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        number = pending.pop(done[0])
        # Fetched at once: a part held only in the object store of a node that is then lost
        # would have to be encoded again.
        arrived[number] = ray.get(done[0])
        while next_part in arrived:
            part_bytes, distances, positions = arrived.pop(next_part)
            part = faiss.deserialize_index(part_bytes)
            del part_bytes
            merge_into(merged, part)
            del part
            oracle.merge(distances, positions)
            next_part += 1
            report(f"merged range {next_part}/{len(ranges)} ({merged.ntotal:,} vectors)")
    return merged
