"""Measuring and tuning an index: the exact oracle, recall@10, and the search parameters.

The oracle (`ExactSearch`) is FAISS's own exact search (`faiss.knn`, batch by batch, into a
`faiss.ResultHeap`), fed the same batches that fill the index, so the embeddings are read
once. Tuning tries fc7's grid of `nprobe` / `efSearch` / `k_factor` values, cheapest first,
and stops at the first that reaches the target recall; parameters are set through
`faiss.ParameterSpace`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.index.faiss_env import faiss, set_search_params, tunable_parameters

RECALL_K = 10
# Re-ranking more candidates is cheap next to probing more lists: two values are enough.
REFINE_K_FACTORS = (8, 32)
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024, 2048)


class ExactSearch:
    """The exact `k` nearest rows to each query, over rows given a batch at a time.

    Each batch is searched exhaustively (`faiss.knn`) and the results kept in a
    `faiss.ResultHeap`; batches may come from several processes (`merge`). Cosine and inner
    product rank by inner product (cosine vectors are unit length), L2 by distance, as the
    index's own scores do. The time spent searching is kept, as exact search's speed.

    Example:
        >>> base = np.array([[0.0], [1.0], [3.0]], dtype=np.float32)
        >>> oracle = ExactSearch(np.array([[2.5]], dtype=np.float32), "l2", 2)
        >>> oracle.add(base[:2], 0); oracle.add(base[2:], 2)
        >>> oracle.positions()
        array([[2, 1]])
    """

    def __init__(self, queries: np.ndarray, metric: str, k: int):
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        self.k = k
        self.keep_max = metric != "l2"
        self.heap = faiss.ResultHeap(len(queries), k, keep_max=self.keep_max)
        self.seconds = 0.0

    def add(self, vectors: np.ndarray, first_position: int) -> None:
        """Rank `vectors`, which sit at positions first_position, first_position + 1, ..."""
        started = time.perf_counter()
        distances, found = faiss.knn(self.queries, vectors, min(self.k, len(vectors)),
                                     metric=self.metric)
        self.merge(distances, np.where(found >= 0, found + first_position, -1))
        self.seconds += time.perf_counter() - started

    def merge(self, distances: np.ndarray, positions: np.ndarray) -> None:
        """Fold in another process's results (`results()` of an `ExactSearch` of its rows)."""
        if distances.shape[1] < self.k:  # fewer rows than k: pad with FAISS's empty slots
            pad = self.k - distances.shape[1]
            empty = -np.inf if self.keep_max else np.inf
            distances = np.pad(distances, ((0, 0), (0, pad)), constant_values=empty)
            positions = np.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
        self.heap.add_result(np.ascontiguousarray(distances, dtype=np.float32),
                             np.ascontiguousarray(positions, dtype=np.int64))

    def results(self) -> tuple[np.ndarray, np.ndarray]:
        """(distances, positions) so far, best first (a copy: the heap stays usable)."""
        self.heap.finalize()
        distances, positions = self.heap.D.copy(), self.heap.I.copy()
        self.heap = faiss.ResultHeap(len(self.queries), self.k, keep_max=self.keep_max)
        self.heap.add_result(distances, positions)
        return distances, positions

    def positions(self) -> np.ndarray:
        """Positions of the exact `k` nearest rows of each query, nearest first; -1 where
        there were fewer than `k` rows."""
        return self.results()[1]


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


def search_settings(index: faiss.Index) -> list[dict[str, int]]:
    """The search parameter values to try, cheapest first (nprobe or efSearch, k_factor).

    Example:
        >>> search_settings(faiss.index_factory(8, "IVF4,Flat"))
        [{'nprobe': 1}, {'nprobe': 2}, {'nprobe': 4}]
    """
    tunable = tunable_parameters(index)
    settings: list[dict[str, int]] = [{}]
    ivf = faiss.try_extract_index_ivf(index) if "nprobe" in tunable else None
    if ivf is not None:
        nlist = ivf.nlist
        probes = [2**i for i in range(int(math.log2(nlist)) + 1)]
        settings = [{"nprobe": p} for p in probes + ([nlist] if nlist & (nlist - 1) else [])]
    elif "efSearch" in tunable:
        settings = [{"efSearch": ef} for ef in EF_SEARCH]
    if "k_factor" in tunable:
        settings = [{**s, "k_factor": f} for s in settings for f in REFINE_K_FACTORS]
    return settings


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
    """Tune the search parameters to the cheapest setting reaching `target_recall`; measure
    speed there. The index is left at that setting.

    Recall@10 counts how many of each query's exact 10 nearest neighbours (itself left out)
    the index returns in its first 10. When no setting reaches the target, the best is kept and
    `reached_target` is False.

    Args:
        index: a filled index (on the CPU).
        queries: (n, dim) rows of the index, normalised as the index's vectors are.
        exact_ids: `ExactSearch.positions()` of `queries`, at least `RECALL_K + 1` per query.
        self_positions: each query's own position in the index (-1: none).
        target_recall: the recall@10 to reach.
    """
    k = min(RECALL_K, index.ntotal - 1)
    tried = []
    best = None
    for params in search_settings(index):
        set_search_params(index, params)
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
    set_search_params(index, params)
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
