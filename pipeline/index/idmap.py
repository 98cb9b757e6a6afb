"""The id map of an index folder: position -> id, path, label, and id -> position, on disk.

Nothing here holds a Python object per row, so an index of 100M images opens in megabytes:
- `ids.arrow`: an Arrow IPC file (uncompressed, so it is memory-mapped, not read) with one row
  per index position: `position`, `id`, `path`, `label`. Looking up the rows of 10 results
  touches the pages of those 10 rows.
- `ids.lookup.npy`: a (2, n) uint64 array, memory-mapped: row 0 the 64-bit hashes of the ids,
  sorted; row 1 the position of each. An id is found by binary search on its hash, then
  confirmed against `ids.arrow` (two ids may share a hash).

Writing is bounded too (`IdMapWriter`): rows are appended batch by batch, and their (hash,
position) pairs are spilled to 64 bucket files by the hash's top bits, each sorted alone at
the end; buckets in order are the whole array in order. `duplicate_hashes` finds the hashes
that occur more than once in a stream of ids the same way, so that the build can tell repeated
ids apart while keeping only the rows that share a hash.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.errors import ArtifactError
from pipeline.provenance import PARQUET_METADATA_KEY, Provenance, check_schema_version

IDS_FILE = "ids.arrow"
LOOKUP_FILE = "ids.lookup.npy"
IDS_METADATA_KEY = b"fc7.index"
ID_MAP_VERSION = 1
ID_SCHEMA = pa.schema(
    [("position", pa.int64()), ("id", pa.string()), ("path", pa.string()), ("label", pa.string())]
)
# Buckets by the hash's top 6 bits: 100M ids make buckets of about 25 MB of (hash, position)
# pairs each, and a build keeps 128 spill files open at most (macOS allows 256 by default).
BUCKET_BITS = 6


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of string ids (pandas' SipHash with its fixed key: the same on every run
    and machine).

    Example:
        >>> id_hashes(pa.array(["a", "b", "a"])).tolist()[0] == id_hashes(pa.array(["a"]))[0]
        True
    """
    values = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object)
    return pd.util.hash_array(values, categorize=False)


class _Buckets:
    """Spill files of fixed-width records, one per hash prefix, read back one at a time."""

    def __init__(self, folder: Path, dtype: np.dtype):
        self.dtype = dtype
        self.paths = [folder / f"bucket-{i:03d}.bin" for i in range(1 << BUCKET_BITS)]
        self.files = [path.open("wb") for path in self.paths]

    def add(self, records: np.ndarray, hashes: np.ndarray) -> None:
        prefix = (hashes >> np.uint64(64 - BUCKET_BITS)).astype(np.int64)
        order = np.argsort(prefix, kind="stable")
        bounds = np.searchsorted(prefix[order], np.arange((1 << BUCKET_BITS) + 1))
        for bucket in np.flatnonzero(np.diff(bounds)):
            self.files[bucket].write(records[order[bounds[bucket] : bounds[bucket + 1]]].tobytes())

    def __iter__(self) -> Iterator[np.ndarray]:
        for file in self.files:
            file.close()
        for path in self.paths:
            yield np.fromfile(path, dtype=self.dtype)
            path.unlink()


def duplicate_hashes(id_batches: Iterable[pa.Array], spill: Path) -> np.ndarray:
    """The sorted hashes that occur more than once among all ids of `id_batches`.

    Bounded memory: the hashes are spilled to `spill` in buckets, then each bucket is counted
    alone. Rows whose hash is not returned have an id no other row has.
    """
    buckets = _Buckets(spill, np.dtype(np.uint64))
    for ids in id_batches:
        hashes = id_hashes(ids)
        buckets.add(hashes, hashes)
    repeated = []
    for hashes in buckets:
        values, counts = np.unique(hashes, return_counts=True)
        repeated.append(values[counts > 1])
    return np.concatenate(repeated) if repeated else np.zeros(0, np.uint64)


class IdMapWriter:
    """Write `ids.arrow` and `ids.lookup.npy` into a folder, rows appended in position order.

    Example:
        >>> with IdMapWriter(folder, provenance) as writer:      # doctest: +SKIP
        ...     writer.add(pa.array(["a"]), pa.array(["/a.jpg"]), pa.array(["cat"]))
    """

    def __init__(self, folder: Path, provenance: Provenance):
        self.folder = Path(folder)
        self.count = 0
        self._spill = tempfile.TemporaryDirectory(prefix="fc7-ids-", dir=self.folder)
        self._buckets = _Buckets(Path(self._spill.name), np.dtype([("h", "u8"), ("p", "u8")]))
        metadata = {
            PARQUET_METADATA_KEY: provenance.to_json().encode(),
            IDS_METADATA_KEY: json.dumps({"id_map_version": ID_MAP_VERSION}).encode(),
        }
        self._schema = ID_SCHEMA.with_metadata(metadata)
        self._writer = pa.ipc.new_file(str(self.folder / IDS_FILE), self._schema)

    def add(self, ids: pa.Array, paths: pa.Array, labels: pa.Array) -> None:
        """Append rows; the first gets position `self.count`."""
        n = len(ids)
        positions = np.arange(self.count, self.count + n, dtype=np.int64)
        batch = pa.record_batch(
            [pa.array(positions), ids.cast(pa.string()), paths.cast(pa.string()),
             labels.cast(pa.string())],
            schema=self._schema,
        )
        self._writer.write_batch(batch)
        hashes = id_hashes(ids)
        records = np.empty(n, self._buckets.dtype)
        records["h"], records["p"] = hashes, positions
        self._buckets.add(records, hashes)
        self.count += n

    def close(self) -> None:
        """Finish both files: the Arrow footer, then the lookup sorted bucket by bucket."""
        self._writer.close()
        lookup = np.lib.format.open_memmap(
            self.folder / LOOKUP_FILE, mode="w+", dtype=np.uint64, shape=(2, self.count)
        )
        start = 0
        for records in self._buckets:
            records.sort(order=["h", "p"])
            end = start + len(records)
            lookup[0, start:end], lookup[1, start:end] = records["h"], records["p"]
            start = end
        lookup.flush()
        del lookup
        self._spill.cleanup()

    def __enter__(self) -> IdMapWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._writer.close()
            self._spill.cleanup()


class IdMap:
    """An index's id map opened for lookups; memory-mapped, so opening reads almost nothing.

    Example:
        >>> id_map = IdMap.open(Path("out/index"))       # doctest: +SKIP
        >>> id_map.position(id_map.rows([0])[0][0])
        0
    """

    def __init__(
        self,
        batches: list[pa.RecordBatch],
        lookup: np.ndarray,
        where: str,
        metadata: dict[bytes, bytes] | None = None,
    ):
        self._batches = batches
        self.metadata = metadata or {}  # the Arrow schema's: provenance and version
        # Rows are taken from one record batch at a time: `take` on a whole memory-mapped
        # table would concatenate its chunks, reading every page.
        self._starts = np.cumsum([0] + [len(batch) for batch in batches])
        self._lookup = lookup
        self.where = where
        if lookup.dtype != np.uint64 or lookup.shape != (2, len(self)):
            raise ArtifactError(f"{where}: its lookup does not match it; rebuild the index")

    @classmethod
    def open(cls, folder: Path) -> IdMap:
        """Memory-map `ids.arrow` and `ids.lookup.npy` in `folder`.

        Raises:
            ArtifactError: a file is missing or not an fc7 id map.
        """
        ids_path, lookup_path = Path(folder) / IDS_FILE, Path(folder) / LOOKUP_FILE
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(ids_path)))
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            lookup = np.load(lookup_path, mmap_mode="r")
        except (OSError, ValueError, pa.ArrowException) as err:
            raise ArtifactError(f"{folder}: unreadable id map ({err}); rebuild the index") from None
        if reader.schema.remove_metadata() != ID_SCHEMA:
            raise ArtifactError(f"{ids_path}: not an fc7 id map (columns {reader.schema.names})")
        try:
            version = json.loads((reader.schema.metadata or {})[IDS_METADATA_KEY])["id_map_version"]
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(
                f"{ids_path}: not an fc7 id map (no valid {IDS_METADATA_KEY.decode()} metadata); "
                "rebuild the index"
            ) from None
        check_schema_version(version, ID_MAP_VERSION, f"{ids_path} (id map)", "rebuild the index")
        return cls(batches, lookup, str(ids_path), reader.schema.metadata)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def rows(self, positions: Iterable[int]) -> list[tuple[str, str, str | None]]:
        """(id, path, label) at each position.

        Raises:
            IndexError: a position outside 0..len-1.
        """
        positions = np.asarray(list(positions), dtype=np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"{self.where}: positions outside 0..{len(self) - 1}")
        chunk = np.searchsorted(self._starts, positions, side="right") - 1
        out: list[tuple[str, str, str | None]] = [None] * len(positions)  # type: ignore[list-item]
        for c in np.unique(chunk):
            where = np.flatnonzero(chunk == c)
            taken = self._batches[c].take(pa.array(positions[where] - self._starts[c]))
            rows = zip(
                taken.column(1).to_pylist(),
                taken.column(2).to_pylist(),
                taken.column(3).to_pylist(),
                strict=True,
            )
            for slot, row in zip(where, rows, strict=True):
                out[slot] = row
        return out

    def positions(self, ids: list[str]) -> np.ndarray:
        """The position of each id; -1 where the index lacks it."""
        hashes = id_hashes(pa.array(ids, pa.string()))
        sorted_hashes = self._lookup[0]
        lo = np.searchsorted(sorted_hashes, hashes, side="left")
        hi = np.searchsorted(sorted_hashes, hashes, side="right")
        found = np.full(len(ids), -1, dtype=np.int64)
        candidates = [self._lookup[1, a:b].astype(np.int64) for a, b in zip(lo, hi, strict=True)]
        flat = np.concatenate(candidates) if candidates else np.zeros(0, np.int64)
        try:
            stored = iter(self.rows(flat))
        except IndexError:
            raise ArtifactError(f"{self.where}: its lookup is corrupt; rebuild the index") from None
        # More than one candidate only where different ids share a hash.
        for i, options in enumerate(candidates):
            for position in options:
                if next(stored)[0] == ids[i] and found[i] < 0:
                    found[i] = position
        return found

    def position(self, item: str) -> int:
        """The position of `item`.

        Raises:
            KeyError: `item` is not in the index.
        """
        position = int(self.positions([item])[0])
        if position < 0:
            raise KeyError(item)
        return position

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The rows in position order, a record batch at a time (`--add` copies them)."""
        yield from self._batches
