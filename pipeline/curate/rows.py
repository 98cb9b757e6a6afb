"""A collection's rows as the curation jobs number them, and its vectors read back.

Every row of the embeddings, error rows included, gets a number: its place in the dataset's
scan order (files in order, rows in file order). Rows with an embedding are also numbered
among themselves ("vector rows"), in the same order, which is the order of the vectors that
`read_vectors` returns and of an index built from the same embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ConfigError
from pipeline.index.faiss_env import normalize
from pipeline.resources import available_memory
from pipeline.search import SimilarityIndex
from pipeline.store import EmbeddingDataset, embeddings_to_numpy

ROW_COLUMNS = ["id", "path", "label", "sha256", "width", "height", "error"]
# Share of the available memory the vectors may take; the search needs about as much again.
MEMORY_SHARE = 0.5


@dataclass
class Collection:
    """All rows of an embeddings dataset (without their vectors), in scan order.

    `rows` has the columns of `ROW_COLUMNS`; `vector_rows` are the row numbers of the rows
    with an embedding, ascending.
    """

    rows: pa.Table
    vector_rows: np.ndarray

    def __len__(self) -> int:
        return self.rows.num_rows


def read_collection(
    data: EmbeddingDataset, batch_size: int, label_column: str = "label"
) -> Collection:
    """Read every row's id, path, label, sha256, size and error (not the embeddings).

    Args:
        label_column: the column read as `label` (cast to string).

    Raises:
        ConfigError: `label_column` is not "label" and the dataset has no such column.
        ArtifactError: a part file is damaged (named).
    """
    if label_column != "label" and label_column not in data.columns:
        raise ConfigError(
            f"--label-column {label_column}: {data.uri} has no such column (it has "
            f"{', '.join(data.columns)})"
        )
    wanted = [label_column if name == "label" else name for name in ROW_COLUMNS]
    columns = [name for name in wanted if name in data.columns]
    batches = list(data.batches(columns, batch_size=batch_size, with_errors=True))
    schema = pa.schema([data.dataset.schema.field(name) for name in columns])
    table = pa.Table.from_batches(batches, schema=schema)
    if label_column != "label":
        table = table.drop_columns([c for c in ["label"] if c in table.column_names])
        names = ["label" if name == label_column else name for name in table.column_names]
        table = table.rename_columns(names)
    if "label" in table.column_names and table.schema.field("label").type != pa.string():
        index = table.column_names.index("label")
        table = table.set_column(index, "label", pc.cast(table["label"], pa.string()))
    for name in ROW_COLUMNS:
        if name not in table.column_names:  # older outputs: no sizes; label is optional
            kind = pa.int32() if name in ("width", "height") else pa.string()
            table = table.append_column(name, pa.nulls(table.num_rows, kind))
    table = table.select(ROW_COLUMNS)
    has_vector = pc.is_null(table["error"]).to_numpy(zero_copy_only=False)
    return Collection(rows=table, vector_rows=np.flatnonzero(has_vector))


def index_positions(index: SimilarityIndex, ids: pa.Array) -> np.ndarray:
    """For each position of `index`, the place of its id in `ids` (-1: not there), joined on
    id a record batch of the index's id map at a time."""
    ours = pa.table({"id": ids, "row": pa.array(np.arange(len(ids)))})
    mapping = np.full(len(index), -1, dtype=np.int64)
    for batch in index.id_map.batches():
        joined = pa.table({"position": batch["position"], "id": batch["id"]}).join(
            ours, "id", join_type="inner"
        )
        mapping[joined["position"].to_numpy()] = joined["row"].to_numpy()
    return mapping


def open_cosine_index(index_dir: str, data: EmbeddingDataset) -> SimilarityIndex:
    """Open --index for a curation job: a cosine index of the same features as `data`.

    Raises:
        ConfigError: not a cosine index.
        ArtifactError, ProvenanceMismatch: a damaged index, or other features than `data`.
    """
    index = SimilarityIndex.open(index_dir, device="cpu")
    if index.metric != "cosine":
        raise ConfigError(
            f"--index {index_dir}: a {index.metric} index; the curation jobs compare images by "
            f"cosine similarity: build one with fc7 index --metric cosine"
        )
    index.provenance.require_compatible(data.provenance, f"--index {index_dir}", data.uri)
    return index


def check_fits(rows: int, dim: int, where: str, way_out: str) -> None:
    """Refuse to hold rows x dim float32 vectors when they exceed half the available memory.

    Raises:
        ConfigError: the figures, and `way_out`.
    """
    available = available_memory()
    needed = rows * dim * 4
    if needed > MEMORY_SHARE * available:
        raise ConfigError(
            f"{where}: {rows:,} vectors x {dim:,} dims x 4 bytes = {needed / 2**30:.1f} GiB do "
            f"not fit in memory ({available / 2**30:.1f} GiB available). {way_out}"
        )


def read_vectors(data: EmbeddingDataset, batch_size: int, way_out: str) -> np.ndarray:
    """All embeddings as one (vector rows, dim) float32 array, rows scaled to unit length.

    Raises:
        ConfigError: they do not fit in memory (`way_out` says what to do instead).
        ArtifactError: a damaged part file or an impossible vector (named).
    """
    rows, dim = data.count(), data.provenance.dim
    check_fits(rows, dim, data.uri, way_out)
    vectors = np.empty((rows, dim), dtype=np.float32)
    filled = 0
    for batch in vector_batches(data, batch_size):
        vectors[filled : filled + len(batch)] = batch
        filled += len(batch)
    return vectors[:filled]


def vector_batches(data: EmbeddingDataset, batch_size: int) -> Iterator[np.ndarray]:
    """The embeddings in vector-row order, a batch at a time, rows scaled to unit length."""
    for batch in data.batches(["embedding"], batch_size=batch_size):
        yield normalize(embeddings_to_numpy(batch["embedding"]))
