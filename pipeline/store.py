"""The embeddings Parquet dataset: its schema, atomic part files, and reading it back.

One row per input image. `embedding` is a plain Arrow `fixed_size_list<float>` (not a tensor
extension type) so that pandas, polars and DuckDB read it as is. Provenance lives in the schema
metadata of every part file; `EmbeddingDataset` refuses a folder whose parts disagree.

Every Parquet file fc7 writes carries page checksums (CRC32) and every read verifies them, so
bit rot is an `ArtifactError` naming the file rather than wrong numbers. `EmbeddingDataset.batches`
also refuses vectors no layer of the model can produce (NaN, infinite, negative, above `MAX_VALUE`):
files written before checksums existed, or damaged before they were written, are caught there.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import ArtifactError
from pipeline.fs import resolve
from pipeline.provenance import PARQUET_METADATA_KEY, Provenance, is_nonnegative

PART_PREFIX = "part-"
# The name `write_table_atomically` writes under before moving a file into place.
TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{32}\.tmp")
# Far beyond any AlexNet activation (random:0 weights give at most 0.12 on generated images,
# trained ones tens to hundreds), yet a flipped high exponent bit gives 1e19..1e38. Squares of
# values up to here cannot overflow float32 in a norm or a distance over 9216 dimensions.
MAX_VALUE = 1e6
# Files re-read one by one to find the one a failed multi-file scan tripped on (the scanner
# reads ahead a few files; the failure is in the file being read or one just after it).
_DIAGNOSE_FILES = 16
_REQUIRED_COLUMNS = ("id", "path", "embedding", "error")


def embedding_schema(provenance: Provenance) -> pa.Schema:
    """The Arrow schema of an extraction output, provenance in its metadata."""
    value_type = pa.float16() if provenance.dtype == "float16" else pa.float32()
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("label", pa.string()),
            # "element": the name Parquet gives list items, so a table read back has this schema.
            pa.field("embedding", pa.list_(pa.field("element", value_type), provenance.dim)),
            pa.field("error", pa.string()),
            pa.field("sha256", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
        ],
        metadata={PARQUET_METADATA_KEY: provenance.to_json().encode()},
    )


def write_table_atomically(table: pa.Table, fs: pafs.FileSystem, path: str) -> None:
    """Write `table` to `path` so that no reader ever sees a half-written file.

    The file is written under a hidden temporary name (readers skip names starting with '.')
    and moved into place; on object stores the upload itself is atomic. Pages carry CRC32
    checksums, which every fc7 reader verifies.
    """
    parent, _, name = path.rpartition("/")
    temporary = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(
            table, temporary, filesystem=fs, compression="zstd", write_page_checksum=True
        )
        fs.move(temporary, path)
    except BaseException:
        try:
            fs.delete_file(temporary)
        except OSError:
            pass
        raise


def embeddings_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An `embedding` column of non-null rows as a (rows, dim) float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError("embeddings_to_numpy needs rows without errors (embedding is null)")
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), dim).astype(np.float32, copy=False)


def reextract_hint(path: str) -> str:
    """What to do about a damaged part file of an extraction output."""
    return (
        f"delete {path.rsplit('/', 1)[-1]} and run the same fc7 extract command again: it "
        f"resumes and re-embeds only the missing shard"
    )


def read_parquet(path: str, fs: pafs.FileSystem | None = None, **options) -> pa.Table:
    """`pq.read_table` of one file with its page checksums verified.

    Raises:
        ArtifactError: the file is missing, damaged (a checksum differs) or not Parquet.
    """
    try:
        return pq.read_table(path, filesystem=fs, page_checksum_verification=True, **options)
    except (OSError, pa.ArrowException) as err:
        raise ArtifactError(f"{path}: damaged or not a readable Parquet file ({err})") from None


@dataclass(frozen=True)
class EmbeddingDataset:
    """An extraction output folder opened for reading; read it with `batches`.

    Every read verifies the files' page checksums and the vectors' values, and names the
    damaged file (and row) when one fails.

    Example:
        >>> data = EmbeddingDataset.open("out/")          # doctest: +SKIP
        >>> for batch in data.batches(["id", "embedding"]):  # only rows without errors
        ...     vectors = embeddings_to_numpy(batch["embedding"])
    """

    uri: str
    dataset: pads.Dataset
    provenance: Provenance
    # Rows read at all (`keeping`): e.g. the ids `fc7 duplicates` kept; None: every row.
    only: pc.Expression | None = None
    only_digest: str = ""

    @classmethod
    def open(cls, uri: str) -> EmbeddingDataset:
        """Open an extraction output and check that all its part files share provenance.

        Raises:
            ArtifactError: no part files, unreadable, or not an fc7 extraction output.
            ProvenanceMismatch: part files were made with different features.
        """
        fs, path = resolve(uri)
        try:
            info = fs.get_file_info(path)
        except OSError as err:
            raise ArtifactError(f"{uri}: cannot read embeddings: {err}") from err
        if info.type == pafs.FileType.NotFound:
            raise ArtifactError(f"{uri}: no such embeddings folder or file")
        parquet = pads.ParquetFileFormat(
            default_fragment_scan_options=pads.ParquetFragmentScanOptions(
                page_checksum_verification=True
            )
        )
        try:
            dataset = pads.dataset(path, filesystem=fs, format=parquet)
        except (OSError, pa.ArrowInvalid) as err:
            raise ArtifactError(f"{uri}: not a readable Parquet dataset: {err}") from err
        files = dataset.files
        if not files:
            raise ArtifactError(f"{uri}: holds no Parquet part files (did the extraction run?)")
        provenance = None
        for file in files:
            try:
                schema = pq.read_schema(file, filesystem=fs)
            except (OSError, pa.ArrowInvalid) as err:
                raise ArtifactError(
                    f"{file}: not a readable Parquet file ({err}); if fc7 extract wrote it, "
                    f"{reextract_hint(file)}"
                ) from err
            metadata = schema.metadata or {}
            if PARQUET_METADATA_KEY not in metadata:
                raise ArtifactError(f"{file}: not an fc7 embeddings file (no provenance metadata)")
            found = Provenance.from_json(metadata[PARQUET_METADATA_KEY], where=file)
            _check_columns(schema, found, file)
            if provenance is None:
                provenance, first = found, file
            else:
                provenance.require_compatible(
                    found, first, f"{uri}: part file {file}", same_dtype=True
                )
        return cls(uri=uri, dataset=dataset, provenance=provenance)

    def keeping(self, ids: pa.Array) -> EmbeddingDataset:
        """This dataset seen through a list of ids: rows with other ids are never read.

        Example:
            >>> kept = read_parquet("out/duplicates/keep.parquet")["id"]  # doctest: +SKIP
            >>> data = EmbeddingDataset.open("out/emb").keeping(kept)     # doctest: +SKIP
        """
        digest = hashlib.sha256()
        for chunk in ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]:
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(buffer)
        return replace(self, only=pads.field("id").isin(ids), only_digest=digest.hexdigest())

    @property
    def files(self) -> list[str]:
        return list(self.dataset.files)

    @property
    def columns(self) -> list[str]:
        """The columns of the part files (all share the embeddings schema plus any extras)."""
        return list(self.dataset.schema.names)

    def count(self, with_errors: bool = False) -> int:
        """Rows in the dataset; by default only rows with an embedding.

        Raises:
            ArtifactError: a part file is damaged; the message names it.
        """
        if with_errors and self.only is None:
            return self.dataset.count_rows()
        row_filter = self.only if with_errors else pads.field("error").is_null()
        if not with_errors and self.only is not None:
            row_filter = row_filter & self.only
        try:
            return self.dataset.count_rows(filter=row_filter)
        except (OSError, pa.ArrowException) as err:
            raise self._unreadable(self.dataset, ["error"], row_filter, None, err) from None

    def batches(
        self,
        columns: list[str],
        batch_size: int = 8192,
        with_errors: bool = False,
        where: pc.Expression | None = None,
        files: list[str] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Stream record batches, every `embedding` value checked on the way.

        Args:
            columns: the columns to read.
            batch_size: rows per batch at most.
            with_errors: keep rows with an `error` (their `embedding` is null).
            where: a further row filter, e.g. `pads.field("id").isin(ids)`.
            files: read only these part files, in this order (default: all, in order).

        Raises:
            ArtifactError: a part file is damaged (a page checksum differs, a page does not
                decode) or holds a vector no layer of the model produces (NaN, infinite, negative,
                above `MAX_VALUE`); the message names the file, and the row and its id.

        Example:
            >>> wanted = pads.field("id").isin(["cats/1.jpg"])
            >>> batch = next(data.batches(["id", "embedding"], where=wanted))  # doctest: +SKIP
        """
        row_filter = None if with_errors else pads.field("error").is_null()
        if self.only is not None:
            row_filter = self.only if row_filter is None else row_filter & self.only
        if where is not None:
            row_filter = where if row_filter is None else row_filter & where
        dataset = self.dataset if files is None else self._subset(files)
        check = "embedding" in columns
        # The id names a bad row in the error message.
        scan = [*columns, "id"] if check and "id" not in columns else list(columns)
        scanner = dataset.scanner(columns=scan, filter=row_filter, batch_size=batch_size)
        tagged = iter(scanner.scan_batches())
        path = None
        while True:
            # Only the scan is guarded: errors raised by the consumer at `yield` pass through.
            try:
                item = next(tagged)
            except StopIteration:
                return
            except (OSError, pa.ArrowException) as err:
                raise self._unreadable(dataset, scan, row_filter, path, err) from None
            batch, path = item.record_batch, item.fragment.path
            if not batch.num_rows:
                continue
            if check:
                self._check_vectors(batch, path, nullable=with_errors)
            yield batch.select(columns) if len(scan) > len(columns) else batch

    def fingerprint(self) -> str:
        """sha256 over the part files' names, sizes and row counts: changes when the data does."""
        digest = hashlib.sha256()
        for fragment in sorted(self.dataset.get_fragments(), key=lambda f: f.path):
            size = self.dataset.filesystem.get_file_info(fragment.path).size
            rows = fragment.metadata.num_rows
            digest.update(f"{fragment.path.rsplit('/', 1)[-1]}:{size}:{rows}\n".encode())
        if self.only is not None:
            digest.update(f"only:{self.only_digest}".encode())
        return digest.hexdigest()

    # -- internals -------------------------------------------------------------------------

    def _subset(self, files: list[str]) -> pads.FileSystemDataset:
        by_path = {fragment.path: fragment for fragment in self.dataset.get_fragments()}
        return pads.FileSystemDataset(
            [by_path[file] for file in files],
            self.dataset.schema,
            self.dataset.format,
            self.dataset.filesystem,
        )

    def _unreadable(
        self,
        dataset: pads.Dataset,
        columns: list[str],
        row_filter: pc.Expression | None,
        after: str | None,
        err: Exception,
    ) -> ArtifactError:
        """The error naming the damaged file behind `err`, a failed scan of several files."""
        fragments = list(dataset.get_fragments())
        paths = [fragment.path for fragment in fragments]
        start = paths.index(after) if after in paths else 0
        for fragment in fragments[start : start + _DIAGNOSE_FILES]:
            try:
                for _ in fragment.to_batches(columns=columns, filter=row_filter):
                    pass
            except (OSError, pa.ArrowException) as found:
                return ArtifactError(
                    f"{fragment.path}: damaged ({found}); {reextract_hint(fragment.path)}"
                )
        return ArtifactError(f"{self.uri}: cannot be read ({err})")

    def _check_vectors(self, batch: pa.RecordBatch, path: str, nullable: bool) -> None:
        column = batch.column("embedding")
        if column.null_count and not nullable:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise self._bad_row(batch, row, path, "has neither an embedding nor an error")
        values = column.flatten().to_numpy(zero_copy_only=False)  # non-null rows only
        if not len(values):
            return
        # after a ReLU a negative value can only come from damage
        # float32 bounds: compared with float16 values, a Python 1e6 would overflow to inf.
        nonnegative = is_nonnegative(self.provenance.model, self.provenance.layer)
        floor = np.float32(0.0 if nonnegative else -MAX_VALUE)
        ceiling = np.float32(MAX_VALUE)
        # One pass each, no temporaries; NaN fails both comparisons.
        if values.min() >= floor and values.max() <= ceiling:
            return
        valid = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
        rows = values.reshape(len(valid), -1)
        ok = (rows >= floor) & (rows <= ceiling)
        first = int(np.flatnonzero(~ok.all(axis=1))[0])
        value = float(rows[first][~ok[first]][0])
        what = f"holds {value:.4g} in its embedding"
        if value < 0:
            what += f", impossible for {self.provenance.layer} (a ReLU output)"
        elif np.isfinite(value):
            what += f", far above any activation (at most {MAX_VALUE:.0e} is accepted)"
        raise self._bad_row(batch, int(valid[first]), path, what)

    def _bad_row(self, batch: pa.RecordBatch, row: int, path: str, what: str) -> ArtifactError:
        item = batch.column("id")[row].as_py()
        where = f"id {item!r}"
        try:
            ids = read_parquet(path, self.dataset.filesystem, columns=["id"]).column("id")
            where = f"row {ids.to_pylist().index(item)} (id {item!r}, counting rows from 0)"
        except (ArtifactError, ValueError):
            pass  # the id alone still names the row
        return ArtifactError(
            f"{path}: {where} {what}: the file is damaged or was not written by fc7 extract; "
            f"{reextract_hint(path)}"
        )


def _check_columns(schema: pa.Schema, provenance: Provenance, file: str) -> None:
    missing = [name for name in _REQUIRED_COLUMNS if name not in schema.names]
    if missing:
        raise ArtifactError(f"{file}: not an fc7 embeddings file (no {', '.join(missing)} column)")
    found = schema.field("embedding").type
    expected = embedding_schema(provenance).field("embedding").type
    # Compared without the item's name: older files call it "item", newer ones "element".
    if (
        not pa.types.is_fixed_size_list(found)
        or found.list_size != expected.list_size
        or found.value_type != expected.value_type
    ):
        raise ArtifactError(
            f"{file}: its embedding column is {found}, but its provenance says "
            f"{provenance.dim} {provenance.dtype} values"
        )


def foreign_entries(
    fs: pafs.FileSystem, folder: str, ours: Callable[[pafs.FileInfo], bool]
) -> list[str]:
    """Names of the entries directly in `folder` that `ours` does not claim, sorted.

    Sub-folders are listed with a trailing '/' and never entered. An output folder holding any
    of these is not fc7's to replace: a job refuses it, naming them (see `describe_entries`).

    Raises:
        OSError: the folder cannot be listed.

    Example:
        >>> fs, ours = pafs.LocalFileSystem(), lambda info: info.base_name == "manifest.json"
        >>> foreign_entries(fs, "out/index", ours)  # doctest: +SKIP
        ['notes.md', 'part-x/']
    """
    selector = pafs.FileSelector(folder, allow_not_found=True, recursive=False)
    return sorted(
        info.base_name + ("/" if info.type == pafs.FileType.Directory else "")
        for info in fs.get_file_info(selector)
        if not ours(info)
    )


def read_id_list(path: str) -> pa.Array:
    """The `id` column of a Parquet or CSV file (e.g. `fc7 duplicates`' keep.parquet).

    Raises:
        ArtifactError: the file cannot be read, or has no `id` column.
    """
    fs, local = resolve(path)
    try:
        if path.endswith(".csv"):
            import pyarrow.csv as pacsv

            with fs.open_input_stream(local) as stream:
                table = pacsv.read_csv(stream)
        else:
            table = read_parquet(local, fs)
    except (OSError, pa.ArrowException) as err:
        raise ArtifactError(f"{path}: cannot read the list of ids ({err})") from None
    if "id" not in table.column_names:
        raise ArtifactError(
            f"{path}: no id column (columns: {', '.join(table.column_names)})"
        )
    return pc.cast(table["id"], pa.string()).combine_chunks()


def describe_entries(names: list[str], limit: int = 5) -> str:
    """`names` for an error message: the first `limit`, then how many more."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def build_table(
    provenance: Provenance,
    ids: list[str],
    paths: list[str],
    labels: list[str | None],
    embeddings: np.ndarray,
    errors: list[str | None],
    sha256s: list[str | None] | None = None,
    widths: list[int | None] | None = None,
    heights: list[int | None] | None = None,
) -> pa.Table:
    """Rows in the embeddings schema; `embeddings` rows whose `errors` entry is set become null.

    Example:
        >>> table = build_table(prov, ["a.jpg"], ["/img/a.jpg"], [None], np.zeros((1, prov.dim)),
        ...                     [None])  # doctest: +SKIP
    """
    schema = embedding_schema(provenance)
    rows = len(ids)
    value_type = schema.field("embedding").type.value_type
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=value_type.to_pandas_dtype()).ravel())
    valid = pa.array([error is None for error in errors], type=pa.bool_())
    embedding = pa.FixedSizeListArray.from_arrays(
        flat, type=schema.field("embedding").type, mask=pc.invert(valid)
    )
    missing = [None] * rows
    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array(paths, pa.string()),
            pa.array(labels, pa.string()),
            embedding,
            pa.array(errors, pa.string()),
            pa.array(sha256s or missing, pa.string()),
            pa.array(widths or missing, pa.int32()),
            pa.array(heights or missing, pa.int32()),
        ],
        schema=schema,
    )
