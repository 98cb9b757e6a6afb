"""The embeddings Parquet dataset: its schema, atomic part files, and reading it back.

One row per input image. `embedding` is a plain Arrow `fixed_size_list<float>` (not a tensor
extension type) so that pandas, polars and DuckDB read it as is. Provenance lives in the schema
metadata of every part file; `EmbeddingDataset` refuses a folder whose parts disagree.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import ArtifactError, ProvenanceMismatch
from pipeline.provenance import PARQUET_METADATA_KEY, Provenance

PART_PREFIX = "part-"


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


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow file system and path for a local path or a URI (s3://, gs://, file://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(uri)


def write_table_atomically(table: pa.Table, fs: pafs.FileSystem, path: str) -> None:
    """Write `table` to `path` so that no reader ever sees a half-written file.

    The file is written under a hidden temporary name (readers skip names starting with '.')
    and moved into place; on object stores the upload itself is atomic.
    """
    parent, _, name = path.rpartition("/")
    temporary = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, temporary, filesystem=fs, compression="zstd")
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


@dataclass(frozen=True)
class EmbeddingDataset:
    """An extraction output folder opened for reading.

    Example:
        >>> data = EmbeddingDataset.open("out/")          # doctest: +SKIP
        >>> for batch in data.batches(["id", "embedding"]):  # only rows without errors
        ...     vectors = embeddings_to_numpy(batch["embedding"])
    """

    uri: str
    dataset: pads.Dataset
    provenance: Provenance

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
        try:
            dataset = pads.dataset(path, filesystem=fs, format="parquet")
        except (OSError, pa.ArrowInvalid) as err:
            raise ArtifactError(f"{uri}: not a readable Parquet dataset: {err}") from err
        files = dataset.files
        if not files:
            raise ArtifactError(f"{uri}: holds no Parquet part files (did the extraction run?)")
        provenance = None
        for file in files:
            try:
                metadata = pq.read_schema(file, filesystem=fs).metadata or {}
            except (OSError, pa.ArrowInvalid) as err:
                raise ArtifactError(f"{file}: not a readable Parquet file: {err}") from err
            if PARQUET_METADATA_KEY not in metadata:
                raise ArtifactError(f"{file}: not an fc7 embeddings file (no provenance metadata)")
            found = Provenance.from_json(metadata[PARQUET_METADATA_KEY], where=file)
            if provenance is None:
                provenance, first = found, file
            elif found.differences(provenance) or found.dtype != provenance.dtype:
                raise ProvenanceMismatch(
                    f"{uri}: part files disagree: {file} vs {first}: "
                    + "; ".join(found.differences(provenance) or ["dtype differs"])
                )
        return cls(uri=uri, dataset=dataset, provenance=provenance)

    @property
    def files(self) -> list[str]:
        return list(self.dataset.files)

    def count(self, with_errors: bool = False) -> int:
        """Rows in the dataset; by default only rows with an embedding."""
        if with_errors:
            return self.dataset.count_rows()
        return self.dataset.count_rows(filter=pads.field("error").is_null())

    def batches(
        self, columns: list[str], batch_size: int = 8192, with_errors: bool = False
    ) -> Iterator[pa.RecordBatch]:
        """Stream record batches; rows with an `error` are left out unless `with_errors`."""
        row_filter = None if with_errors else pads.field("error").is_null()
        scanner = self.dataset.scanner(columns=columns, filter=row_filter, batch_size=batch_size)
        for batch in scanner.to_batches():
            if batch.num_rows:
                yield batch

    def fingerprint(self) -> str:
        """sha256 over the part files' names, sizes and row counts: changes when the data does."""
        digest = hashlib.sha256()
        for fragment in sorted(self.dataset.get_fragments(), key=lambda f: f.path):
            size = self.dataset.filesystem.get_file_info(fragment.path).size
            rows = fragment.metadata.num_rows
            digest.update(f"{fragment.path.rsplit('/', 1)[-1]}:{size}:{rows}\n".encode())
        return digest.hexdigest()


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
