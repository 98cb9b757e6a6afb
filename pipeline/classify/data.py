"""Labelled rows for training and evaluation: the one pass both training paths share.

`training_rows` reads the labels (and, in memory, the vectors) of an extraction output, leaves
out rows with an error or no label and classes too small for the evaluation protocol, encodes
the class names with scikit-learn's `LabelEncoder`, and counts every row it leaves out. The
in-memory path keeps the vectors it read; `sgd` keeps only ids and class codes and streams the
vectors later with `encoded_batches`.

Embeddings are read only through `EmbeddingDataset`, which checks every page and vector.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.preprocessing import LabelEncoder

from pipeline.errors import ArtifactError, ConfigError
from pipeline.resources import available_memory
from pipeline.store import EmbeddingDataset, embeddings_to_numpy

# In-memory training holds the float32 matrix plus copies (normalised, PCA, solver); refuse
# when the matrix alone needs more than this share of the available memory.
MEMORY_SHARE = 0.5
# Small classes named in messages; the rest are counted.
_LISTED_CLASSES = 10


def check_fits_in_memory(rows: int, dim: int, where: str, available: int | None = None) -> None:
    """Refuse in-memory training when rows x dim x 4 bytes exceeds half the available memory.

    Raises:
        ConfigError: the data will not fit; the message gives the numbers and the way out.

    Example:
        >>> check_fits_in_memory(8677, 4096, "caltech")   # 142 MB: fine  # doctest: +SKIP
    """
    available = available_memory() if available is None else available
    needed = rows * dim * 4
    if needed > MEMORY_SHARE * available:
        raise ConfigError(
            f"{where}: {rows:,} rows x {dim:,} dims x 4 bytes = {needed / 2**30:.1f} GiB does "
            f"not fit in memory ({available / 2**30:.1f} GiB available; in-memory training "
            f"needs about twice the matrix). Use --classifier sgd, which streams the Parquet "
            f"with partial_fit, or train on a sample"
        )


def require_label_column(data: EmbeddingDataset, column: str) -> None:
    """Raises `ConfigError` naming the columns there are when `data` has no `column`."""
    names = data.columns
    if column not in names:
        raise ConfigError(
            f"--label-column {column}: {data.uri} has no such column (it has {', '.join(names)})"
        )


def label_mask(labels: pa.Array) -> np.ndarray:
    """True where a row has a usable label (not null, not blank)."""
    if labels.type != pa.string():
        labels = pc.cast(labels, pa.string())
    blank = pc.equal(pc.utf8_trim_whitespace(labels), "")
    return np.asarray(pc.fill_null(pc.invert(blank), False).to_numpy(zero_copy_only=False))


@dataclass
class LabelledRows:
    """The rows of an extraction output with an embedding and a label, in file order;
    `skipped_*` count the rows left out and why."""

    ids: np.ndarray
    labels: np.ndarray
    vectors: np.ndarray | None
    rows: int
    skipped_errors: int = 0
    skipped_unlabelled: int = 0


def read_labelled(
    data: EmbeddingDataset, label_column: str, batch_size: int, with_vectors: bool = True
) -> LabelledRows:
    """Read the ids, labels and (`with_vectors`) embeddings of the labelled rows of `data`.

    Rows with an `error` or an empty label are skipped and counted, never silently dropped.

    Raises:
        ConfigError: no such label column, or (`with_vectors`) the rows would not fit in memory.
        ArtifactError: a damaged part file or an impossible vector (named).

    Example:
        >>> rows = read_labelled(EmbeddingDataset.open("out/emb"), "label", 8192)  # doctest: +SKIP
        >>> rows.vectors.shape, rows.labels[:2]                                     # doctest: +SKIP
        ((8677, 4096), array(['accordion', 'accordion'], dtype=object))
    """
    require_label_column(data, label_column)
    total, good = data.count(with_errors=True), data.count()
    columns = ["id", label_column]
    if with_vectors:
        check_fits_in_memory(good, data.provenance.dim, data.uri)
        columns.append("embedding")
    vectors, labels, ids = [], [], []
    for batch in data.batches(columns, batch_size):
        keep = label_mask(batch[label_column])
        if not keep.any():
            continue
        batch = batch.filter(pa.array(keep))
        if with_vectors:
            vectors.append(embeddings_to_numpy(batch["embedding"]))
        labels.extend(str(label) for label in batch[label_column].to_pylist())
        ids.extend(batch["id"].to_pylist())
    matrix = None
    if with_vectors:
        dim = data.provenance.dim
        matrix = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    return LabelledRows(
        ids=np.array(ids, dtype=object),
        labels=np.array(labels, dtype=object),
        vectors=matrix,
        rows=total,
        skipped_errors=total - good,
        skipped_unlabelled=good - len(ids),
    )


def rows_needed_per_class(protocol: dict[str, Any]) -> tuple[int, str]:
    """The rows a class needs to take part under an evaluation `protocol`, and what for."""
    if protocol["kind"] == "separate-test-set":
        return 1, "training"
    if protocol["kind"] == "stratified-kfold":
        return protocol["folds"], f"{protocol['folds']}-fold cross-validation"
    return 2, "a stratified train/test split"


def describe_small_classes(small: dict[str, int], protocol: dict[str, Any]) -> tuple[str, str]:
    """What is wrong with the classes in `small` ({name: rows}) and the first of them listed.

    Example:
        >>> problem, listed = describe_small_classes({"owl": 1}, {"kind": "stratified-kfold",
        ...                                                      "folds": 5})
        >>> problem
        '1 class(es) have fewer than 5 labelled rows, needed for 5-fold cross-validation'
        >>> listed
        'owl (1)'
    """
    minimum, why = rows_needed_per_class(protocol)
    listed = ", ".join(f"{name} ({n})" for name, n in list(small.items())[:_LISTED_CLASSES])
    if len(small) > _LISTED_CLASSES:
        listed += f" and {len(small) - _LISTED_CLASSES} more"
    problem = f"{len(small)} class(es) have fewer than {minimum} labelled rows, needed for {why}"
    return problem, listed


@dataclass
class TrainingRows:
    """The rows a classifier trains (and, without --test, evaluates) on.

    Attributes:
        ids: the ids of the rows kept, in file order.
        y: their class codes, indices into `classes`.
        vectors: their embeddings, or None when read without (streaming).
        encoder: the fitted `LabelEncoder` (class name <-> code).
        counts: rows read and left out, by reason, for `metrics.json`.
    """

    ids: np.ndarray
    y: np.ndarray
    vectors: np.ndarray | None
    encoder: LabelEncoder
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return [str(name) for name in self.encoder.classes_]


def training_rows(
    data: EmbeddingDataset,
    label_column: str,
    batch_size: int,
    protocol: dict[str, Any],
    with_vectors: bool = True,
) -> TrainingRows:
    """The labelled rows of `data` in classes large enough for `protocol`, labels encoded.

    Args:
        data: the training embeddings.
        label_column: the column holding class names.
        batch_size: rows per Parquet batch read.
        protocol: the evaluation protocol (see `rows_needed_per_class`).
        with_vectors: read the embeddings too (in-memory training).

    Returns:
        `TrainingRows`; its `counts` hold rows, skipped_error, skipped_no_label,
        skipped_small_class, small_classes ({name: rows}), labelled and classes.

    Raises:
        ArtifactError: `data` holds no rows.
        ConfigError: every row has an error, no row has a label, fewer than 2 classes are left,
            no such label column, or (`with_vectors`) the rows would not fit in memory.
    """
    rows = read_labelled(data, label_column, batch_size, with_vectors)
    _require_rows(data, rows, label_column)
    sizes = Counter(rows.labels.tolist())
    minimum, _ = rows_needed_per_class(protocol)
    small = {name: n for name, n in sorted(sizes.items()) if n < minimum}
    keep = np.array([name not in small for name in rows.labels.tolist()], dtype=bool)
    labels = rows.labels[keep]
    encoder = LabelEncoder().fit(labels)
    classes = encoder.classes_.tolist()
    if len(classes) < 2:
        found = f"only '{classes[0]}'" if classes else "none"
        if small:
            found += " ({}: {})".format(*describe_small_classes(small, protocol))
        raise ConfigError(
            f"{data.uri}: a classifier needs at least 2 classes with enough rows; found {found}"
        )
    counts = {
        "rows": rows.rows,
        "skipped_error": rows.skipped_errors,
        "skipped_no_label": rows.skipped_unlabelled,
        "skipped_small_class": int((~keep).sum()),
        "small_classes": small,
        "labelled": len(rows.ids),
        "classes": len(classes),
    }
    return TrainingRows(
        ids=rows.ids[keep],
        y=encoder.transform(labels).astype(np.int64),
        vectors=rows.vectors[keep] if rows.vectors is not None else None,
        encoder=encoder,
        counts=counts,
    )


def _require_rows(data: EmbeddingDataset, rows: LabelledRows, label_column: str) -> None:
    if rows.rows == 0:
        raise ArtifactError(f"{data.uri}: holds no rows: nothing to train on")
    if len(rows.ids) == 0:
        if rows.skipped_errors == rows.rows:
            raise ConfigError(
                f"{data.uri}: all {rows.skipped_errors} rows have an error (no embedding): "
                f"nothing to train on; fix the extraction first"
            )
        raise ConfigError(
            f"{data.uri}: no row has a '{label_column}': nothing to train on. Extract from a "
            f"folder of class folders (the folder name is the label), a manifest with a label "
            f"column, or pass --label-column"
        )


def known_classes(encoder: LabelEncoder, names: np.ndarray) -> np.ndarray:
    """True where a class name is one the encoder was fitted on."""
    return np.isin(names, encoder.classes_)


@dataclass
class HeldOutRows:
    """The rows of a separate --test set in known classes, encoded, and the rows left out."""

    vectors: np.ndarray
    y: np.ndarray
    counts: dict[str, int]


def read_test_set(
    data: EmbeddingDataset, label_column: str, batch_size: int, encoder: LabelEncoder
) -> HeldOutRows:
    """Read a separate test set into memory, keeping rows of classes the classifier knows.

    Returns:
        `HeldOutRows`; its `counts` hold test_skipped_error, test_skipped_no_label and
        test_skipped_unknown_class.

    Raises:
        ConfigError: no labelled row of a known class, or the rows would not fit in memory.
    """
    rows = read_labelled(data, label_column, batch_size)
    known = known_classes(encoder, rows.labels)
    counts = skipped_test_rows(rows.skipped_errors, rows.skipped_unlabelled, int((~known).sum()))
    if not known.any():
        raise ConfigError(f"--test {data.uri}: no labelled rows of a known class")
    return HeldOutRows(
        vectors=rows.vectors[known],
        y=encoder.transform(rows.labels[known]).astype(np.int64),
        counts=counts,
    )


def skipped_test_rows(errors: int, unlabelled: int, unknown: int) -> dict[str, int]:
    """The rows of a --test set left out, by reason, as `metrics.json` records them."""
    return {
        "test_skipped_error": errors,
        "test_skipped_no_label": unlabelled,
        "test_skipped_unknown_class": unknown,
    }


@dataclass
class EncodedBatch:
    """A batch of labelled rows of known classes, and the rows of the batch left out."""

    vectors: np.ndarray
    y: np.ndarray
    unlabelled: int = 0
    unknown: int = 0


def encoded_batches(
    data: EmbeddingDataset,
    label_column: str,
    encoder: LabelEncoder,
    batch_size: int,
    ids: pa.Array | None = None,
    rng: np.random.Generator | None = None,
    shuffle_buffer: int = 0,
) -> Iterator[EncodedBatch]:
    """Stream the labelled rows of `data` (or only those with `ids`), vectors and class codes.

    Args:
        data: embeddings with a label column.
        label_column: the column holding class names.
        encoder: the fitted `LabelEncoder`; rows of other classes are counted as `unknown`.
        batch_size: rows per Parquet batch read.
        ids: keep only rows with these ids (a train or held-out split).
        rng: shuffle: part files in random order, rows through a buffer of `shuffle_buffer`
            rows (extraction outputs are often sorted by class).
        shuffle_buffer: rows shuffled together.

    Raises:
        ArtifactError: a damaged part file or an impossible vector (named).
    """
    columns = ["id", label_column, "embedding"]
    if rng is None:
        batches = data.batches(columns, batch_size)
    else:
        batches = _shuffled_batches(data, columns, batch_size, rng, shuffle_buffer)
    for batch in batches:
        unlabelled = 0
        if ids is not None:
            batch = batch.filter(pc.is_in(batch["id"], value_set=ids))
        else:
            keep = label_mask(batch[label_column])
            unlabelled = int((~keep).sum())
            batch = batch.filter(pa.array(keep))
        names = np.array([str(label) for label in batch[label_column].to_pylist()], dtype=object)
        known = known_classes(encoder, names)
        vectors = embeddings_to_numpy(batch["embedding"])[known]
        y = encoder.transform(names[known]).astype(np.int64)
        yield EncodedBatch(vectors, y, unlabelled, int((~known).sum()))


def _shuffled_batches(
    data: EmbeddingDataset,
    columns: list[str],
    batch_size: int,
    rng: np.random.Generator,
    buffer_rows: int,
) -> Iterator[pa.RecordBatch]:
    """Batches of rows without errors: part files in random order, rows shuffled through a
    buffer of `buffer_rows`."""
    files = data.files
    order = [files[i] for i in rng.permutation(len(files))]
    buffer: list[pa.RecordBatch] = []
    buffered = 0
    for batch in data.batches(columns, batch_size, files=order):
        buffer.append(batch)
        buffered += batch.num_rows
        if buffered >= buffer_rows:
            yield from _shuffled(buffer, rng, batch_size)
            buffer, buffered = [], 0
    if buffered:
        yield from _shuffled(buffer, rng, batch_size)


def _shuffled(
    batches: list[pa.RecordBatch], rng: np.random.Generator, size: int
) -> Iterator[pa.RecordBatch]:
    table = pa.Table.from_batches(batches).take(rng.permutation(sum(b.num_rows for b in batches)))
    yield from table.to_batches(max_chunksize=size)
