"""Exact nearest neighbours by cosine similarity, with FAISS, over vectors held in memory.

Used where a collection fits in memory: the k-NN graph that `fc7 audit` hands to cleanlab, the
near-duplicate edges of `fc7 duplicates`, and the check that a test split does not repeat
training images (`fc7 train`, `fc7 audit --test`). Larger collections go through an index
built by `fc7 index` (`pipeline.search.SimilarityIndex.search_raw`), which answers the same
(similarities, positions) arrays.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from pipeline.index.faiss_env import faiss, normalize

# Cosine similarity at or above which two images are near-duplicates (`fc7 duplicates`,
# leaks in `fc7 audit --test` and `fc7 train`). Measured with bench/curate.py on Caltech-101
# (README, "Curate"): the best F1 between planted copies and distinct photos, with random
# weights, whose embeddings of distinct photos are close (median nearest 0.988); real weights
# spread photos further apart, so this errs towards precision with them.
NEAR_DUPLICATE_COSINE = 0.9945
# Queries searched at once: bounds the (queries x base) block of similarities FAISS computes.
QUERY_BATCH = 2048


def cosine_knn(
    queries: np.ndarray, base: np.ndarray, k: int, own: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` rows of `base` most similar to each row of `queries`, by cosine similarity.

    Args:
        queries: (n, dim) vectors, unit length (see `pipeline.index.faiss_env.normalize`).
        base: (m, dim) vectors, unit length.
        k: neighbours per query.
        own: where each query sits in `base`, to leave it out of its own neighbours (None:
            the queries are not in `base`).

    Returns:
        (similarities, positions), each (n, k), most similar first; positions index `base`,
        -1 (similarity -inf) where fewer than k exist.

    Example:
        >>> base = normalize(np.array([[1, 0], [1, 1], [0, 1]], dtype=np.float32))
        >>> cosine_knn(base, base, 1, own=np.arange(3))[1].ravel().tolist()
        [1, 0, 1]
    """
    extra = 0 if own is None else 1
    wanted = min(k + extra, len(base))
    similarities = np.full((len(queries), k), -np.inf, dtype=np.float32)
    positions = np.full((len(queries), k), -1, dtype=np.int64)
    if wanted == 0 or len(queries) == 0:
        return similarities, positions
    for start in range(0, len(queries), QUERY_BATCH):
        block = np.ascontiguousarray(queries[start : start + QUERY_BATCH], dtype=np.float32)
        found_sims, found = faiss.knn(block, base, wanted, metric=faiss.METRIC_INNER_PRODUCT)
        rows = slice(start, start + len(block))
        if own is not None:
            found_sims, found = drop_self(found_sims, found, own[rows])
        width = min(k, found.shape[1])
        similarities[rows, :width] = found_sims[:, :width]
        positions[rows, :width] = found[:, :width]
    return similarities, positions


def drop_self(
    similarities: np.ndarray, positions: np.ndarray, own: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own position from its results (searched with one neighbour extra).

    A row that ties with exact copies of itself may not find itself among the results; it
    then loses its last result instead, so every row keeps one fewer than it searched.
    """
    is_self = positions == own[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    keep = ~is_self
    width = positions.shape[1] - 1
    return (
        similarities[keep].reshape(-1, width),
        positions[keep].reshape(-1, width),
    )


def knn_graph(similarities: np.ndarray, positions: np.ndarray) -> scipy.sparse.csr_matrix:
    """Neighbour lists as the sparse k-NN graph cleanlab's `Datalab` takes (`knn_graph=`).

    Each row holds its k neighbours' cosine distances (1 - similarity, at least 0), in
    ascending order; a distance of 0 (an exact copy) is stored explicitly, as Datalab asks.

    Raises:
        ValueError: a row has fewer than k neighbours (the collection is smaller than k + 1).
    """
    rows, k = positions.shape
    if (positions < 0).any():
        raise ValueError(f"a k-NN graph needs {k} neighbours for every row; some have fewer")
    distances = np.clip(1.0 - similarities.astype(np.float64), 0.0, 2.0)
    order = np.argsort(distances, axis=1, kind="stable")
    distances = np.take_along_axis(distances, order, axis=1)
    columns = np.take_along_axis(positions, order, axis=1)
    indptr = np.arange(0, rows * k + 1, k)
    return scipy.sparse.csr_matrix(
        (distances.ravel(), columns.ravel(), indptr), shape=(rows, rows)
    )


def nearest_in(
    queries: np.ndarray, base: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's single most similar row of `base`: (similarities, positions), each (n,).

    Both arrays are normalised here; `base` empty gives similarity -inf and position -1.
    """
    similarities, positions = cosine_knn(normalize(queries), normalize(base), 1)
    return similarities[:, 0], positions[:, 0]
