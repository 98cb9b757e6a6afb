"""What a matching sha256 cannot vouch for: that a FAISS index file is one fc7 could have built.

A file replaced together with its sha256 in the manifest could otherwise crash FAISS
(out-of-range ids or graph links) or return garbage silently, so every part of the index is
checked before any search runs: its metric, its count, and its lists, graph or vectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import ArtifactError
from pipeline.index.faiss_env import faiss, faiss_message, metric_type, parts

REBUILD = "rebuild the index"


def read_checked_index(path: Path, metric: str, mmap: bool = False) -> faiss.Index:
    """Read a FAISS index file and refuse one whose structure fc7 cannot have built.

    Count and dimension are compared with the id map and manifest by `format.load_index`.

    Args:
        path: the `index.faiss` file.
        metric: the manifest's metric (`cosine`, `l2` or `ip`).
        mmap: map the file's lists and codes instead of reading them (FAISS's
            `IO_FLAG_MMAP_IFC`). Then the ids in the lists and the flat vectors are not read for
            the check, which would page in the whole file; search still refuses a position
            beyond the id map (`SimilarityIndex._search`).

    Raises:
        ArtifactError: FAISS cannot read it, or a part of it searches by another metric,
            disagrees with the others, or holds out-of-range ids, links or non-finite vectors.
    """
    index = _read(path, mmap)
    _check_index(index, path, metric, mmap)
    return index


def _read(path: Path, mmap: bool) -> faiss.Index:
    try:
        return faiss.read_index(
            str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
        )
    except RuntimeError as err:
        raise ArtifactError(
            f"{path}: not a readable FAISS index ({faiss_message(err)}); {REBUILD}"
        ) from None
    except MemoryError:
        # A damaged size field: FAISS allocates what the file claims before reading it.
        raise ArtifactError(
            f"{path}: corrupt (it claims more data than this machine's memory); {REBUILD}"
        ) from None


_METRIC_NAMES = {faiss.METRIC_L2: "L2", faiss.METRIC_INNER_PRODUCT: "inner product"}


def _check_index(index: faiss.Index, path: Path, metric: str, mmap: bool) -> None:
    expected = metric_type(metric)
    try:
        for part in parts(index):
            if part.metric_type != expected:
                found = _METRIC_NAMES.get(part.metric_type, f"metric {part.metric_type}")
                raise ArtifactError(
                    f"{path}: searches by {found} but the manifest's metric is {metric} (which "
                    f"fc7 builds with {_METRIC_NAMES[expected]}); {REBUILD}"
                )
            if not part.is_trained or part.ntotal != index.ntotal:
                raise ArtifactError(f"{path}: its parts disagree; {REBUILD}")
            _check_part(part, path, mmap)
    except (AttributeError, RuntimeError, TypeError, ValueError) as err:
        raise ArtifactError(f"{path}: not an index fc7 can use ({err}); {REBUILD}") from None


def _check_part(part: faiss.Index, path: Path, mmap: bool) -> None:
    ntotal = part.ntotal
    problem = None
    if isinstance(part, faiss.IndexFlat) and ntotal and not mmap:
        vectors = faiss.rev_swig_ptr(part.get_xb(), ntotal * part.d)
        # min and max make no temporary copy; NaN propagates into both.
        if not (np.isfinite(vectors.min()) and np.isfinite(vectors.max())):
            problem = "stored vectors that are not finite"
    elif isinstance(part, faiss.IndexIVF):
        lists = part.invlists
        sizes = [lists.list_size(i) for i in range(part.nlist)]
        if part.quantizer.ntotal != part.nlist or part.quantizer.d != part.d:
            problem = "a coarse quantizer that does not match its lists"
        elif sum(sizes) != ntotal or not (mmap or _ids_in_range(lists, sizes, ntotal)):
            problem = "inverted lists that do not hold each vector once"
    elif isinstance(part, faiss.IndexHNSW):
        graph = part.hnsw
        links = faiss.vector_to_array(graph.neighbors)
        offsets = faiss.vector_to_array(graph.offsets).astype(np.int64)
        levels = faiss.vector_to_array(graph.levels)
        per_level = faiss.vector_to_array(graph.cum_nneighbor_per_level)
        if not (
            len(levels) == ntotal
            and len(offsets) == ntotal + 1
            and offsets[0] == 0
            and offsets[-1] == len(links)
            and _all_in(levels, 1, len(per_level))
            and np.array_equal(np.diff(offsets), per_level[levels])
            and _all_in(links, -1, ntotal)
            and -1 <= graph.entry_point < max(ntotal, 1)
            and (ntotal == 0 or graph.max_level == levels.max() - 1)
        ):
            problem = "a graph whose links point outside the index"
    if problem:
        raise ArtifactError(f"{path}: corrupt: {problem}; {REBUILD}")


def _ids_in_range(lists: faiss.InvertedLists, sizes: list[int], ntotal: int) -> bool:
    """Whether every id in the lists is in [0, ntotal), one list at a time."""
    return all(
        _all_in(faiss.rev_swig_ptr(lists.get_ids(i), n), 0, ntotal)
        for i, n in enumerate(sizes)
        if n
    )


def _all_in(values: np.ndarray, low: int, end: int) -> bool:
    """Whether every value is in [low, end)."""
    return not len(values) or (values.min() >= low and values.max() < end)
