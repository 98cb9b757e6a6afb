"""Which rows an index holds, and filling a trained index with them, a range of shards at a time.

`write_id_map` reads the ids (not the vectors) of every shard once: it decides which rows are
indexed (the first row of each id; later rows with that id, or with an id already in the index
for `--add`, are skipped and counted) and writes the id map while doing so. Its `RowLayout`
then tells any process which rows of a shard to add, and at which positions.

`encode_range` adds the rows of a contiguous range of shards to a copy of the trained index and
feeds them to the exact oracle. A single-process build encodes one range, all shards; the Ray
build (`distributed`) encodes ranges in parallel and `merge_into` appends their inverted lists
in shard order. Both read every shard as the same batches, so a vector is encoded the same way
in both, and the merged index is byte-identical to the single-process one.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.index.faiss_env import faiss, normalize
from pipeline.index.idmap import IdMap, IdMapWriter, duplicate_hashes, id_hashes
from pipeline.index.tune import ExactSearch
from pipeline.store import EmbeddingDataset, embeddings_to_numpy


@dataclass
class RowLayout:
    """Where each shard's rows go in the index.

    Rows are counted among rows without errors, in shard order; `skipped` are the rows not
    indexed because their id came before. Row r (not skipped) is at position
    `offset + r - (skipped rows before r)`.
    """

    files: list[str]
    first_rows: np.ndarray  # len(files) + 1 cumulative row counts
    skipped: np.ndarray  # sorted row numbers
    offset: int = 0  # positions already taken (by the index --add appends to)

    @property
    def rows(self) -> int:
        return int(self.first_rows[-1])

    @property
    def count(self) -> int:
        """Rows indexed."""
        return self.rows - len(self.skipped)

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """The index position of each row; -1 for a skipped row."""
        rows = np.asarray(rows, dtype=np.int64)
        before = np.searchsorted(self.skipped, rows, side="left")
        hit = before < len(self.skipped)
        hit[hit] = self.skipped[before[hit]] == rows[hit]
        return np.where(hit, -1, self.offset + rows - before)

    def kept(self, first_row: int, n: int) -> np.ndarray | None:
        """Mask of the rows first_row..first_row+n-1 to index; None when all are."""
        lo, hi = np.searchsorted(self.skipped, [first_row, first_row + n])
        if lo == hi:
            return None
        mask = np.ones(n, dtype=bool)
        mask[self.skipped[lo:hi] - first_row] = False
        return mask

    def ranges(self, parts: int) -> list[tuple[int, int]]:
        """About `parts` contiguous ranges of shards with similar row counts."""
        bounds = np.searchsorted(
            self.first_rows, np.linspace(0, self.rows, parts + 1)[1:-1], side="left"
        )
        cuts = sorted({0, *bounds.tolist(), len(self.files)})
        return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def write_id_map(
    data: EmbeddingDataset,
    writer: IdMapWriter,
    batch_size: int,
    existing: IdMap | None = None,
) -> RowLayout:
    """Append the indexed rows of `data` to `writer` (after `existing`'s, copied first for
    `--add`) and return where every row goes.

    Bounded memory: repeated ids are found by their hashes first (`duplicate_hashes`), and
    only rows whose hash repeats are compared by id, in a dict of those ids alone.

    Raises:
        ArtifactError: a damaged part file (from `EmbeddingDataset.batches`).
    """
    files = data.files
    with tempfile.TemporaryDirectory(prefix="fc7-dup-", dir=writer.folder) as spill:
        repeated = duplicate_hashes(
            (batch.column("id") for batch in data.batches(["id"], batch_size)), Path(spill)
        )
    if existing is not None:
        for batch in existing.batches():
            writer.add(batch.column("id"), batch.column("path"), batch.column("label"))
    offset = writer.count
    first_rows, skipped, seen = [0], [], set()
    row = 0
    for file in files:
        for batch in data.batches(["id", "path", "label"], batch_size, files=[file]):
            ids = batch.column("id")
            keep = np.ones(batch.num_rows, dtype=bool)
            suspects = np.flatnonzero(np.isin(id_hashes(ids), repeated))
            for i in suspects:
                item = ids[int(i)].as_py()
                keep[i] = item not in seen
                seen.add(item)
            if existing is not None:
                keep &= existing.positions(ids.to_pylist()) < 0
            if not keep.all():
                skipped.append(row + np.flatnonzero(~keep))
                batch = batch.filter(pa.array(keep))
            writer.add(batch.column("id"), batch.column("path"), batch.column("label"))
            row += len(keep)
        first_rows.append(row)
    skipped_rows = np.concatenate(skipped) if skipped else np.zeros(0, np.int64)
    return RowLayout(files, np.array(first_rows, np.int64), skipped_rows, offset)


def encode_range(
    index: faiss.Index,
    data: EmbeddingDataset,
    layout: RowLayout,
    shards: tuple[int, int],
    metric: str,
    batch_size: int,
    oracle: ExactSearch | None = None,
) -> None:
    """Add the indexed rows of shards `shards[0]`..`shards[1]-1` to `index` (local ids from
    0), feeding the same vectors to `oracle` at their global positions.

    Raises:
        ArtifactError: a damaged part file.
    """
    first, last = shards
    row = int(layout.first_rows[first])
    position = layout.offset + row - int(np.searchsorted(layout.skipped, row))
    for file in layout.files[first:last]:
        for batch in data.batches(["embedding"], batch_size, files=[file]):
            keep = layout.kept(row, batch.num_rows)
            row += batch.num_rows
            if keep is not None:
                batch = batch.filter(pa.array(keep))
            if not batch.num_rows:
                continue
            vectors = embeddings_to_numpy(batch.column("embedding"))
            if metric == "cosine":
                vectors = normalize(vectors)
            index.add(vectors)
            if oracle is not None:
                oracle.add(vectors, position)
            position += len(vectors)


def merge_into(target: faiss.Index, part: faiss.Index) -> None:
    """Append `part`'s vectors to `target` (same trained parameters), ids shifted past
    `target`'s: the result is the index that adding both in order would have made.

    IVF lists are merged with `merge_from`, except fast-scan ones: FAISS 1.15 corrupts memory
    merging their block-packed lists, so those are unpacked and packed again here with the
    lists' own `CodePacker`. Flat code stores (a `Refine` stage) use `merge_from`.

    Raises:
        ValueError: an index kind that cannot be merged (HNSW, for one).
    """
    added = part.ntotal
    offset = target.ntotal
    target_ivf, target_flats = _codec_parts(target)
    part_ivf, part_flats = _codec_parts(part)
    if target_ivf is not None:
        lists = faiss.downcast_InvertedLists(part_ivf.invlists)
        if isinstance(lists, faiss.BlockInvertedLists):
            _merge_blocks(faiss.downcast_InvertedLists(target_ivf.invlists), lists, offset,
                          part_ivf.code_size)
        else:
            target_ivf.merge_from(part_ivf, offset)
    for mine, theirs in zip(target_flats, part_flats, strict=True):
        mine.merge_from(theirs, 0)
    _set_ntotal(target, offset + added)


def reserve(index: faiss.Index, ntotal: int) -> None:
    """Allocate, once, the flat code stores of an empty `index` for `ntotal` vectors, so that
    merging parts into it never reallocates them: a growing std::vector copies itself to a
    buffer twice its size, which briefly holds 1.5x the final codes (3 GB more at 1M rows of
    4096-d 8-bit codes). There is no `reserve` in FAISS's Python API: growing the vector to
    the final size and shrinking it back to empty keeps the capacity."""
    for store in _codec_parts(index)[1]:
        store.codes.resize(ntotal * store.code_size)
        store.codes.resize(0)


def _codec_parts(index: faiss.Index) -> tuple[faiss.IndexIVF | None, list[faiss.Index]]:
    """The IVF part of `index` and its flat code stores, in a fixed order."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return _codec_parts(index.index)
    if isinstance(index, faiss.IndexRefine):
        base_ivf, base_flats = _codec_parts(index.base_index)
        refine_ivf, refine_flats = _codec_parts(index.refine_index)
        return base_ivf or refine_ivf, base_flats + refine_flats
    if isinstance(index, faiss.IndexIVF):
        return index, []
    if isinstance(index, faiss.IndexFlatCodes):
        return None, [index]
    raise ValueError(f"{type(index).__name__} indexes cannot be merged")


def _set_ntotal(index: faiss.Index, ntotal: int) -> None:
    index = faiss.downcast_index(index)
    index.ntotal = ntotal
    for attr in ("index", "base_index", "refine_index"):
        inner = getattr(index, attr, None)
        if isinstance(inner, faiss.Index):
            _set_ntotal(inner, ntotal)


def _merge_blocks(
    target: faiss.BlockInvertedLists, part: faiss.BlockInvertedLists, offset: int, code_size: int
) -> None:
    packer = part.packer
    per_block, block_bytes = packer.nvec, packer.block_size
    for number in range(part.nlist):
        n = part.list_size(number)
        if not n:
            continue
        new = _unpack(packer, part.get_codes(number), 0, n, code_size)
        old = target.list_size(number)
        first_block, head = divmod(old, per_block)
        if head:  # the last block is partly filled: pack its codes again with the new ones
            tail = _unpack(packer, target.get_codes(number), first_block, head, code_size)
            new = np.concatenate([tail, new])
        target.resize(number, old + n)
        ids = faiss.rev_swig_ptr(target.get_ids(number), old + n)
        ids[old:] = faiss.rev_swig_ptr(part.get_ids(number), n) + offset
        blocks = -(-len(new) // per_block)
        padded = np.zeros((blocks * per_block, code_size), np.uint8)
        padded[: len(new)] = new
        out = faiss.rev_swig_ptr(target.get_codes(number), (first_block + blocks) * block_bytes)
        for b in range(blocks):
            packer.pack_all(
                faiss.swig_ptr(padded[b * per_block :]),
                faiss.swig_ptr(out[(first_block + b) * block_bytes :]),
            )


def _unpack(packer, codes_ptr, first_block: int, n: int, code_size: int) -> np.ndarray:
    """`n` codes of a block-packed list, from block `first_block` on, one row per code."""
    per_block, block_bytes = packer.nvec, packer.block_size
    blocks = -(-n // per_block)
    packed = faiss.rev_swig_ptr(codes_ptr, (first_block + blocks) * block_bytes)
    flat = np.zeros((blocks * per_block, code_size), np.uint8)
    for b in range(blocks):
        packer.unpack_all(
            faiss.swig_ptr(packed[(first_block + b) * block_bytes :]),
            faiss.swig_ptr(flat[b * per_block :]),
        )
    return flat[:n]
