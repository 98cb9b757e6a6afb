"""Applying a classifier: label an extraction output into Parquet, or label image files.

Predictions are Parquet parts (`part-NNNNN.parquet`), one per batch read, each carrying the
embeddings' provenance and the classifier (schema version, folder, model sha256, classes, score
kind) in its schema metadata.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.classify.artifact import SCHEMA_VERSION, Classifier
from pipeline.errors import OutputError, SourceError
from pipeline.fs import resolve
from pipeline.provenance import PARQUET_METADATA_KEY, Provenance, check_schema_version
from pipeline.sources import read_image_bytes
from pipeline.store import (
    TEMPORARY_NAME,
    EmbeddingDataset,
    describe_entries,
    embeddings_to_numpy,
    foreign_entries,
    write_table_atomically,
)

PREDICTIONS_METADATA_KEY = b"fc7.classifier"
# The names of prediction parts (write order, 5 digits or more).
PREDICTION_PART = re.compile(r"part-\d{5,}\.parquet")


def predictions_schema(provenance: Provenance, classifier: Classifier, model_dir: str) -> pa.Schema:
    """The Parquet schema of `fc7 predict` output, provenance and classifier in its metadata."""
    about = {
        "schema_version": SCHEMA_VERSION,
        "model_dir": str(model_dir),
        "model_sha256": classifier.manifest.get("model_sha256"),
        "classes": classifier.classes,
        "score_kind": classifier.score_kind,
    }
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("prediction", pa.string()),
            pa.field("score", pa.float32()),
            pa.field("top_labels", pa.list_(pa.string())),
            pa.field("top_scores", pa.list_(pa.float32())),
            pa.field("error", pa.string()),
        ],
        metadata={
            PARQUET_METADATA_KEY: provenance.to_json().encode(),
            PREDICTIONS_METADATA_KEY: json.dumps(about).encode(),
        },
    )


def predict_dataset(
    classifier: Classifier,
    data: EmbeddingDataset,
    out: str,
    model_dir: str,
    k: int = 5,
    batch_size: int = 8192,
    overwrite: bool = False,
) -> dict[str, int]:
    """Label every row of `data` into Parquet parts in `out`; rows with an error stay rows.

    Returns:
        {"rows": ..., "predicted": ..., "errors": ..., "parts": ...}.

    Raises:
        ProvenanceMismatch: `data` was made with other features than the classifier's.
        OutputError: `out` already holds predictions (pass `overwrite`, which deletes them and
            nothing else), or holds anything else (listed): files other than fc7 prediction
            parts (`part-NNNNN.parquet` with predictions metadata) or folders.
        ArtifactError: a damaged part file in `data`, a vector no AlexNet layer produces, or
            predictions in `out` written by a newer fc7.

    Example:
        >>> predict_dataset(Classifier.load("out/clf"), EmbeddingDataset.open("out/emb"),
        ...                 "out/pred", "out/clf")  # doctest: +SKIP
        {'rows': 12, 'predicted': 12, 'errors': 0, 'parts': 1}
    """
    classifier.provenance.require_compatible(
        data.provenance, mine=f"classifier {model_dir}", theirs=f"embeddings {data.uri}"
    )
    fs, base = resolve(out)
    base = base.rstrip("/")
    _clear_output(fs, base, out, overwrite)
    schema = predictions_schema(data.provenance, classifier, model_dir)
    counts = {"rows": 0, "predicted": 0, "errors": 0, "parts": 0}
    columns = ["id", "path", "embedding", "error"]
    for part, batch in enumerate(data.batches(columns, batch_size, with_errors=True)):
        ok = pc.is_null(batch["error"]).to_numpy(zero_copy_only=False)
        ok &= np.asarray(pc.is_valid(batch["embedding"]).to_numpy(zero_copy_only=False))
        rows = batch.num_rows
        prediction: list[str | None] = [None] * rows
        score: list[float | None] = [None] * rows
        labels: list[list[str] | None] = [None] * rows
        values: list[list[float] | None] = [None] * rows
        where = np.flatnonzero(ok)
        if len(where):
            result = classifier.predict_vectors(
                embeddings_to_numpy(batch["embedding"].take(pa.array(where))), k
            )
            for j, i in enumerate(where):
                prediction[i] = result["prediction"][j]
                score[i] = float(result["score"][j])
                labels[i] = result["top_labels"][j]
                values[i] = result["top_scores"][j].tolist()
        table = pa.Table.from_arrays(
            [
                batch["id"],
                batch["path"],
                pa.array(prediction, pa.string()),
                pa.array(score, pa.float32()),
                pa.array(labels, pa.list_(pa.string())),
                pa.array(values, pa.list_(pa.float32())),
                batch["error"],
            ],
            schema=schema,
        )
        write_table_atomically(table, fs, f"{base}/part-{part:05d}.parquet")
        counts["rows"] += rows
        counts["predicted"] += len(where)
        counts["errors"] += rows - len(where)
        counts["parts"] += 1
    return counts


def _clear_output(fs: pafs.FileSystem, base: str, out: str, overwrite: bool) -> None:
    """Make `out` ready for new predictions: create it, or delete the predictions fc7 wrote
    there (with `overwrite`); refuse a folder holding anything else."""
    try:
        fs.create_dir(base, recursive=True)
        listing = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        mine = {info.path for info in listing if _is_ours(fs, info)}
        foreign = foreign_entries(fs, base, lambda info: info.path in mine)
    except OSError as err:
        raise OutputError(f"--out {out}: cannot create or list: {err}") from err
    if foreign:
        # Never delete what is not ours, such as the embeddings themselves or a user's notes.
        raise OutputError(
            f"--out {out}: holds what fc7 predict did not write ({describe_entries(foreign)}); "
            f"fc7 writes predictions only into a new or empty folder or over its own "
            f"predictions; choose another --out"
        )
    if not overwrite and any(PREDICTION_PART.fullmatch(path.rsplit("/", 1)[-1]) for path in mine):
        raise OutputError(f"--out {out}: already holds predictions; pass --overwrite")
    try:
        for path in sorted(mine):
            fs.delete_file(path)
    except OSError as err:
        raise OutputError(f"--out {out}: cannot replace the old predictions: {err}") from err


def _is_ours(fs: pafs.FileSystem, info: pafs.FileInfo) -> bool:
    """A predictions part fc7 wrote, or the temporary file of one left by a killed run.

    Raises:
        ArtifactError: a predictions part whose schema version this fc7 does not read.
    """
    if info.type != pafs.FileType.File:
        return False
    temporary = TEMPORARY_NAME.fullmatch(info.base_name)
    if temporary:
        return bool(PREDICTION_PART.fullmatch(temporary["name"]))
    if not PREDICTION_PART.fullmatch(info.base_name):
        return False
    try:
        metadata = pq.read_schema(info.path, filesystem=fs).metadata or {}
    except (OSError, pa.ArrowException):
        return False  # unreadable: not provably ours, so not ours to delete
    if PREDICTIONS_METADATA_KEY not in metadata:
        return False
    try:
        about = json.loads(metadata[PREDICTIONS_METADATA_KEY])
    except ValueError:
        return False  # a key we did not write: not provably ours
    found = about.get("schema_version") if isinstance(about, dict) else None
    check_schema_version(
        found, SCHEMA_VERSION, info.path, "choose another --out for these predictions"
    )
    return True


@dataclass
class ImagePrediction:
    """The labels of one image file: its top-k (label, score), or why it has none."""

    path: str
    top: list[tuple[str, float]] | None
    error: str | None


def predict_image_files(
    classifier: Classifier, paths: list[str], k: int = 5, device: str = "auto"
) -> list[ImagePrediction]:
    """Read, embed (with the recorded model) and label image files, one result per path.

    A file that cannot be read or decoded is a result with an `error`, unless it is the only
    one given.

    Raises:
        SourceError: the only path given cannot be read.
        WeightsError, ProvenanceMismatch: the recorded weights are not available here.

    Example:
        >>> predict_image_files(Classifier.load("out/clf"), ["cat.jpg"], k=2)  # doctest: +SKIP
        [ImagePrediction(path='cat.jpg', top=[('cat', 0.9), ('dog', 0.1)], error=None)]
    """
    images, unreadable = [], {}
    for path in paths:
        try:
            images.append(read_image_bytes(path))
        except (OSError, ValueError) as err:
            reason = getattr(err, "strerror", None) or err
            if len(paths) == 1:
                raise SourceError(f"--image {path}: cannot read: {reason}") from err
            images.append(b"")  # reported as unreadable, not as an empty file
            unreadable[path] = f"cannot read: {reason}"
    tops, errors = classifier.predict_images(images, k, device)
    return [
        ImagePrediction(path, top, None if top is not None else unreadable.get(path, error))
        for path, top, error in zip(paths, tops, errors, strict=True)
    ]
