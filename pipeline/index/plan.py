"""Choosing the index: a FAISS factory string for a kind, a size, a dimension and a budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.index.config import KINDS
from pipeline.index.faiss_env import faiss, faiss_message, metric_type
from pipeline.resources import available_memory

# Below this many rows exact search answers in milliseconds: no approximation needed.
EXACT_MAX_ROWS = 20_000
HNSW_M = 32


@dataclass(frozen=True)
class IndexPlan:
    """What to build: a FAISS factory string and why it was chosen."""

    kind: str
    factory: str
    reason: str
    needs_training: bool
    index_bytes: int | None = None  # estimated size in memory; None for factory strings


def default_budget() -> int:
    """The memory `--kind auto` may give the index when `--max-memory` is not set: half of
    the memory available now."""
    return available_memory() // 2


def plan_index(
    kind: str,
    rows: int,
    dim: int,
    metric: str,
    pca: int | None = None,
    whiten: bool = False,
    budget: int | None = None,
    train_rows: int | None = None,
) -> IndexPlan:
    """The FAISS factory string for `kind` at this size, dimension and memory budget.

    `auto` picks exact search for small collections, HNSW while full vectors fit in the budget,
    IVF-PQ with 8-bit re-ranking while those fit, then IVF-PQ (after a random-rotation PCA to at
    most 256 dimensions) sized to the budget. Any other string is used as a factory string.

    Args:
        kind: one of `KINDS` or a FAISS factory string.
        rows, dim: the size of the collection.
        metric: `cosine`, `l2` or `ip`.
        pca, whiten: reduce to `pca` dimensions first (whitened).
        budget: bytes the index may take (default: `default_budget()`).
        train_rows: rows the index will be trained on (default: `rows`).

    Raises:
        ConfigError: `--pca` larger than the dimension, or a factory string FAISS rejects.

    Example:
        >>> plan_index("ivf-flat", rows=100_000, dim=256, metric="cosine").factory
        'IVF1024,Flat'
    """
    if pca is not None and pca > dim:
        raise ConfigError(f"--pca {pca}: larger than the embeddings' dimension {dim}")
    train_rows = rows if train_rows is None else train_rows
    budget = budget or default_budget()
    width = pca or dim
    prefix = ""
    if pca:
        prefix = f"{'PCAW' if whiten else 'PCA'}{pca},"
    if pca and whiten and metric == "cosine":
        # Whitening rescales axes, so distances there no longer map to cosines; normalising
        # again makes scores the cosine similarity in the whitened space.
        prefix += "L2norm,"
    reason = f"--kind {kind}"
    if kind == "auto":
        flat_bytes = rows * width * 4
        if rows <= EXACT_MAX_ROWS and flat_bytes <= budget:
            kind, reason = "flat", f"auto: {rows:,} rows is small enough for exact search"
        elif rows * (width * 4 + 8 * HNSW_M + 64) <= budget:
            kind, reason = "hnsw", f"auto: full vectors and graph fit in {human_size(budget)}"
        elif rows * (dim + _refined_pq_m(width) // 2 + 8) <= budget:
            kind = "ivf-pq"
            reason = f"auto: 8-bit vectors for re-ranking fit in {human_size(budget)}"
        else:
            if not pca and dim > 256:
                width, prefix = 256, "PCAR256,"
            m = _divisor_at_most(width, max(1, min(width // 4, 2 * budget // max(rows, 1))))
            nlist = _nlist(rows, train_rows)
            factory = f"{prefix}IVF{nlist},PQ{m}x4fs"
            reason = f"auto: only {m // 2}-byte PQ codes fit in {human_size(budget)}"
            return IndexPlan("ivf-pq", factory, reason, True, rows * (m // 2 + 8))
    size = None
    if kind == "flat":
        factory, size = f"{prefix}Flat", rows * width * 4
    elif kind == "hnsw":
        factory, size = f"{prefix}HNSW{HNSW_M}", rows * (width * 4 + 8 * HNSW_M + 64)
    elif kind == "ivf-flat":
        factory, size = f"{prefix}IVF{_nlist(rows, train_rows)},Flat", rows * (width * 4 + 8)
    elif kind == "ivf-pq":
        m = _refined_pq_m(width)
        factory = f"{prefix}IVF{_nlist(rows, train_rows)},PQ{m}x4fs,Refine(SQ8)"
        # The 8-bit re-ranking codes are of the full vectors, before any PCA.
        size = rows * (m // 2 + 8 + dim)
    else:
        factory = kind
        try:
            faiss.index_factory(dim, factory, metric_type(metric))
        except RuntimeError as err:
            raise ConfigError(
                f"--kind {kind}: not one of {', '.join(KINDS)} nor a FAISS index factory string "
                f"for dimension {dim} ({faiss_message(err)})"
            ) from None
        kind = "factory"
    needs_training = not faiss.index_factory(dim, factory, metric_type(metric)).is_trained
    return IndexPlan(kind, factory, reason, needs_training, size)


def human_size(nbytes: float) -> str:
    """Bytes in decimal units, three significant digits: `1.5 GB`."""
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} TB"


def _nlist(rows: int, train_rows: int) -> int:
    # About 4 sqrt(n) lists, a power of two, with at least 39 training points per centroid
    # (below that FAISS warns and the clustering is poor).
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(rows))))
    return int(max(1, min(target, train_rows // 39, 65536)))


def _refined_pq_m(width: int) -> int:
    """PQ sub-quantizers in front of an 8-bit re-ranking stage: that stage gives the precision,
    the PQ codes only the shortlist, and a scan reads every code of the lists it probes. Up to
    256 dimensions, width / 4 (64 at most); above, width / 32: at 4096 dimensions, 64-byte
    codes searched 2.7x as fast as 512-byte ones at the same recall (200,000 of
    bench/index.py's clustered vectors, nprobe 2, k_factor 32: recall was bound by the lists
    probed, not by the codes)."""
    return _divisor_at_most(width, max(1, width // 32, min(width // 4, 64)))


def _divisor_at_most(width: int, limit: int) -> int:
    return max(m for m in range(1, min(width, limit) + 1) if width % m == 0)
