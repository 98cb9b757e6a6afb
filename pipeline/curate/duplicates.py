"""`fc7 duplicates`: exact and near-duplicate images, grouped, one kept per group.

Two images are duplicates when their bytes are the same (the `sha256` extraction stored,
found even for rows whose decode failed) or when the cosine similarity of their embeddings is
at or above the threshold. Near-duplicate pairs come from a k-nearest-neighbour search, exact
in memory (`pipeline.neighbours`) or through an index built by `fc7 index` for collections
larger than memory, streamed a batch of rows at a time: only the pairs at or above the
threshold are kept. Groups are the connected components of all those pairs
(`scipy.sparse.csgraph.connected_components`), so a chain of near copies is one group.

Memory: a few integers per row (the component labels), the pairs found, and the vectors
when searched in memory; with `--index`, the index as `fc7 query` holds it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse
from scipy.sparse.csgraph import connected_components

from pipeline.curate.config import MAX_NEIGHBOURS, DuplicatesConfig
from pipeline.curate.output import check_out, staged_folder, write_manifest, write_results
from pipeline.curate.rows import (
    Collection,
    index_positions,
    open_cosine_index,
    read_collection,
    read_vectors,
    vector_batches,
)
from pipeline.neighbours import cosine_knn, drop_self
from pipeline.store import EmbeddingDataset

KIND = "fc7-duplicates"
# Vectors searched at once (the neighbours of this many rows are in memory together).
SEARCH_BATCH = 4096

Search = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class Pairs:
    """Pairs of row numbers found to be duplicates, and what the search saw."""

    first: np.ndarray
    second: np.ndarray
    saturated: int = 0  # rows whose MAX_NEIGHBOURS neighbours were all above the threshold


def exact_pairs(sha256: pa.ChunkedArray) -> Pairs:
    """Rows with the same sha256 as an earlier row, paired with the first such row."""
    codes, _ = pd.factorize(sha256.to_numpy(zero_copy_only=False), use_na_sentinel=True)
    rows = np.flatnonzero(codes >= 0)
    codes = codes[rows]
    _, first_index = np.unique(codes, return_index=True)
    first_row = np.empty(codes.max() + 1 if len(codes) else 0, dtype=np.int64)
    first_row[codes[first_index]] = rows[first_index]
    repeats = rows != first_row[codes]
    return Pairs(first=first_row[codes[repeats]], second=rows[repeats])


def near_pairs(
    search: Search,
    batches: Iterator[np.ndarray],
    threshold: float,
    k: int,
) -> Pairs:
    """Pairs of vector rows with cosine similarity at or above `threshold`.

    Args:
        search: (vectors, their vector rows, k) -> (similarities, vector rows) of each row's
            k nearest other rows, most similar first, -1 where there are fewer.
        batches: the vectors, unit length, in vector-row order.
        threshold: inclusive; compared in float32, as FAISS computes the similarities.
        k: neighbours searched first; rows whose k-th is still at or above the threshold
            are searched again with 4 times as many, up to `MAX_NEIGHBOURS`.
    """
    limit = np.float32(threshold)
    firsts, seconds, saturated, start = [], [], 0, 0
    for vectors in batches:
        rows = np.arange(start, start + len(vectors))
        start += len(vectors)
        wanted = k
        while len(rows):
            similarities, found = search(vectors, rows, wanted)
            close = (similarities >= limit) & (found >= 0)
            full = close.all(axis=1) & (found.shape[1] == wanted)
            done = ~full if wanted < MAX_NEIGHBOURS else np.ones(len(rows), dtype=bool)
            saturated += int((full & done).sum())
            hit_rows, hit_columns = np.nonzero(close & done[:, None])
            firsts.append(rows[hit_rows])
            seconds.append(found[hit_rows, hit_columns])
            rows, vectors = rows[~done], vectors[~done]
            wanted = min(wanted * 4, MAX_NEIGHBOURS)
    first = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
    second = np.concatenate(seconds) if seconds else np.zeros(0, np.int64)
    return Pairs(first=first, second=second, saturated=saturated)


def groups_of(pairs: list[Pairs], rows: int) -> np.ndarray:
    """Group number of every row (-1: in no group), groups numbered by their first row."""
    first = np.concatenate([p.first for p in pairs]).astype(np.int64)
    second = np.concatenate([p.second for p in pairs]).astype(np.int64)
    graph = scipy.sparse.coo_matrix(
        (np.ones(len(first), dtype=np.int8), (first, second)), shape=(rows, rows)
    ).tocsr()
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    grouped = sizes[component] >= 2
    # Components come numbered by their lowest row already; renumber those with 2+ rows.
    numbers = np.full(len(sizes), -1, dtype=np.int64)
    kept = np.flatnonzero(sizes >= 2)
    numbers[kept] = np.arange(len(kept))
    return np.where(grouped, numbers[component], -1)


def representatives(groups: np.ndarray, collection: Collection, keep: str) -> np.ndarray:
    """The row kept of each group: the first (in collection order) with an embedding, or for
    `largest` the one with the most pixels (ties: the first); rows without an embedding are
    kept only when the group has no other."""
    members = np.flatnonzero(groups >= 0)
    if not len(members):
        return members
    has_vector = np.zeros(len(collection), dtype=bool)
    has_vector[collection.vector_rows] = True
    pixels = np.zeros(len(members), dtype=np.float64)
    if keep == "largest":
        width = collection.rows["width"].to_numpy(zero_copy_only=False)[members]
        height = collection.rows["height"].to_numpy(zero_copy_only=False)[members]
        pixels = np.nan_to_num(width.astype(np.float64) * height.astype(np.float64))
    # Sort members by group, then best first: has a vector, most pixels, earliest row.
    order = np.lexsort((members, -pixels, ~has_vector[members], groups[members]))
    ordered = members[order]
    starts = np.flatnonzero(np.r_[True, np.diff(groups[ordered]) != 0])
    return ordered[starts]


def similarity_to_representative(
    data: EmbeddingDataset,
    collection: Collection,
    groups: np.ndarray,
    kept: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """Cosine similarity of every grouped row to its group's kept row (NaN: no embedding).

    Two passes over the vectors: the kept rows' first, then every member's against its own.
    """
    vector_row_of = np.full(len(collection), -1, dtype=np.int64)
    vector_row_of[collection.vector_rows] = np.arange(len(collection.vector_rows))
    kept_vector_rows = vector_row_of[kept]
    dim = data.provenance.dim
    kept_vectors = np.zeros((len(kept), dim), dtype=np.float32)
    member_rows = np.flatnonzero(groups >= 0)
    member_vector_rows = vector_row_of[member_rows]
    result = np.full(len(collection), np.nan, dtype=np.float32)

    def scan(visit: Callable[[np.ndarray, np.ndarray], None]) -> None:
        start = 0
        for vectors in vector_batches(data, batch_size):
            visit(vectors, np.arange(start, start + len(vectors)))
            start += len(vectors)

    def take_kept(vectors: np.ndarray, rows: np.ndarray) -> None:
        hit = np.isin(kept_vector_rows, rows)
        kept_vectors[hit] = vectors[kept_vector_rows[hit] - rows[0]]

    def compare(vectors: np.ndarray, rows: np.ndarray) -> None:
        hit = np.isin(member_vector_rows, rows)
        members = member_rows[hit]
        own = vectors[member_vector_rows[hit] - rows[0]]
        has_kept = kept_vector_rows[groups[members]] >= 0
        sims = np.einsum("ij,ij->i", own, kept_vectors[groups[members]])
        result[members] = np.where(has_kept, sims, np.nan)

    scan(take_kept)
    scan(compare)
    # The kept row is its group's reference: exactly 1 (when it has a vector).
    result[kept] = np.where(kept_vector_rows >= 0, 1.0, np.nan)
    return result


def find_duplicates(
    config: DuplicatesConfig, data: EmbeddingDataset, report: Callable[[str], None]
) -> dict[str, Any]:
    """Run `fc7 duplicates`: find the groups, write duplicates.parquet, keep.parquet and
    manifest.json to `config.out`, and return the manifest.

    Raises:
        ConfigError: the vectors do not fit in memory (without --index), or the index is not
            a cosine index of these embeddings.
        OutputError: --out holds something else, or results without --overwrite.
        ArtifactError, ProvenanceMismatch: damaged or mismatched inputs (named).
    """
    check_out(Path(config.out), KIND, config.overwrite)  # before the work, not after
    started = time.perf_counter()
    collection = read_collection(data, config.batch_size)
    report(f"{len(collection):,} rows, {len(collection.vector_rows):,} with an embedding")
    search, batches, searched_with = _searcher(config, data, collection)
    searching = time.perf_counter()
    near = near_pairs(search, batches, config.threshold, config.neighbours)
    search_seconds = time.perf_counter() - searching
    near_rows = Pairs(collection.vector_rows[near.first], collection.vector_rows[near.second])
    exact = exact_pairs(collection.rows["sha256"])
    groups = groups_of([exact, near_rows], len(collection))
    kept = representatives(groups, collection, config.keep)
    similarity = similarity_to_representative(data, collection, groups, kept, config.batch_size)
    table = _results(collection, groups, kept, similarity)
    counts = {
        "rows": len(collection),
        "groups": int(len(kept)),
        "grouped_rows": table.num_rows,
        "dropped_rows": table.num_rows - int(len(kept)),
        "exact_pairs": int(len(exact.first)),
        "near_pairs": int(len(near.first)),
        "exact_rows": int(pc.sum(pc.equal(table["kind"], "exact")).as_py() or 0),
        "near_rows": int(pc.sum(pc.equal(table["kind"], "near")).as_py() or 0),
        "saturated_rows": near.saturated,
        "largest_group": int(np.bincount(groups[groups >= 0]).max()) if len(kept) else 0,
    }
    with staged_folder(Path(config.out), KIND, config.overwrite) as folder:
        write_results(folder, "duplicates.parquet", table, data.provenance)
        write_results(folder, "keep.parquet", _keep(collection, groups, kept), data.provenance)
        manifest = write_manifest(folder, KIND, data, {
            "threshold": config.threshold,
            "neighbours": config.neighbours,
            "keep": config.keep,
            "searched_with": searched_with,
            **counts,
            "seconds": {"search": round(search_seconds, 3),
                        "total": round(time.perf_counter() - started, 3)},
        })
    return manifest


def _searcher(
    config: DuplicatesConfig, data: EmbeddingDataset, collection: Collection
) -> tuple[Search, Iterator[np.ndarray], str]:
    """The k-NN search over the collection's vectors: exact in memory, or through --index."""
    if config.index is None:
        vectors = read_vectors(
            data, config.batch_size,
            "Build a cosine index with `fc7 index` and pass it with --index",
        )

        def exact(queries: np.ndarray, rows: np.ndarray, k: int):
            return cosine_knn(queries, vectors, k, own=rows)

        batches = (vectors[i : i + SEARCH_BATCH] for i in range(0, len(vectors), SEARCH_BATCH))
        return exact, batches, "exact (in memory)"
    index = open_cosine_index(config.index, data)
    ids = collection.rows["id"].take(pa.array(collection.vector_rows))
    vector_row_of_position = index_positions(index, ids)

    def indexed(queries: np.ndarray, rows: np.ndarray, k: int):
        similarities, positions = index.search_raw(queries, k + 1)
        found = np.where(positions >= 0, vector_row_of_position[positions], -1)
        similarities = np.where(found >= 0, similarities, -np.inf).astype(np.float32)
        # Most similar first again (unmapped positions sank to the end).
        order = np.argsort(-similarities, axis=1, kind="stable")
        similarities = np.take_along_axis(similarities, order, axis=1)
        found = np.take_along_axis(found, order, axis=1)
        return drop_self(similarities, found, rows)

    factory = index.manifest.get("factory", "?")
    return indexed, vector_batches(data, SEARCH_BATCH), f"index {config.index} ({factory})"


def _results(
    collection: Collection, groups: np.ndarray, kept: np.ndarray, similarity: np.ndarray
) -> pa.Table:
    """One row per grouped image: group, kept row first, then the collection's order."""
    members = np.flatnonzero(groups >= 0)
    is_kept = np.zeros(len(collection), dtype=bool)
    is_kept[kept] = True
    order = np.lexsort((members, ~is_kept[members], groups[members]))
    members = members[order]
    rows = collection.rows.take(pa.array(members))
    sha = pd.Series(collection.rows["sha256"].to_numpy(zero_copy_only=False)[members])
    # "exact": another image of the group has the same bytes (whichever image is kept).
    copies = sha.groupby([groups[members], sha]).transform("size")
    kind = np.where(sha.notna() & (copies.reindex(sha.index).fillna(0) >= 2), "exact", "near")
    values = similarity[members]
    return pa.table({
        "group": pa.array(groups[members], pa.int64()),
        "id": rows["id"],
        "path": rows["path"],
        "label": rows["label"],
        "similarity": pa.array(values, pa.float32(), mask=np.isnan(values)),
        "representative": pa.array(is_kept[members]),
        "kind": pa.array(kind, pa.string()),
    })


def _keep(collection: Collection, groups: np.ndarray, kept: np.ndarray) -> pa.Table:
    """The images left after dropping duplicates: a manifest fc7 extract and fc7 index read."""
    keep = groups < 0
    keep[kept] = True
    rows = collection.rows.filter(pa.array(keep))
    return pa.table({"path": rows["path"], "label": rows["label"], "id": rows["id"]})


def summary(manifest: dict[str, Any], out: str) -> str:
    """What `fc7 duplicates` prints when done."""
    warning = ""
    if manifest["largest_group"] > max(10, manifest["rows"] // 20):
        warning = (
            f"\nwarning: the largest group holds {manifest['largest_group']:,} images: "
            f"--threshold {manifest['threshold']} is probably too low for these features "
            f"(bench/curate.py measures it on planted copies)"
        )
    return (
        f"{manifest['groups']:,} groups of duplicates: {manifest['grouped_rows']:,} of "
        f"{manifest['rows']:,} images ({manifest['exact_rows']:,} exact copies, "
        f"{manifest['near_rows']:,} near; cosine >= {manifest['threshold']}); "
        f"{manifest['dropped_rows']:,} can go.\n"
        f"  {out}/duplicates.parquet  the groups (kept image first)\n"
        f"  {out}/keep.parquet        one image per group and every other image: pass it to "
        f"fc7 index --keep or fc7 extract" + warning
    )
