"""The classifier folder and the `Classifier` object: save, load (verified), predict.

A classifier folder holds:

- `model.skops`: the fitted pipeline in skops format, loaded only with an explicit list of
  trusted types (never plain pickle), after its sha256 is checked against the manifest;
- `manifest.json`: classes, the embeddings' provenance, the training data fingerprint, library
  versions, the schema version;
- `metrics.json`, `report.md`, `confusion_matrix.png`: the evaluation (`report.py`);
- `int8-<sha256>.onnx`, for a classifier of int8 embeddings only: the int8 model that made
  them (named in the manifest's `int8_model`), so that `predict_images` embeds with the same
  model wherever the folder is moved, with an empty cache.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from sklearn.pipeline import Pipeline

from pipeline import __version__
from pipeline.classify.estimators import class_scores, score_kind, top_k
from pipeline.errors import ArtifactError, ConfigError, OutputError
from pipeline.fs import resolve
from pipeline.provenance import (
    INT8_MODEL_NAME,
    Provenance,
    check_schema_version,
    file_sha256,
    int8_model_name,
)
from pipeline.store import describe_entries, foreign_entries

SCHEMA_VERSION = 1
MODEL_FILE = "model.skops"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
CONFUSION_FILE = "confusion_matrix.png"
# Everything fc7 writes in a classifier folder; --overwrite replaces these and nothing else,
# but for the int8 model of int8 embeddings (`int8-<sha256>.onnx`, see `is_classifier_file`).
CLASSIFIER_FILES = (MODEL_FILE, MANIFEST_FILE, METRICS_FILE, REPORT_FILE, CONFUSION_FILE)
CLASSIFIER_KIND = "fc7-classifier"
RETRAIN = "retrain it with fc7 train"
# skops refuses any type outside its defaults (numpy, scikit-learn estimators) unless listed
# here. The list is fixed in code, never read from the model folder, so a tampered folder
# cannot widen it.
TRUSTED_TYPES = [
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
]


def library_versions() -> dict[str, str]:
    """Versions of the libraries a saved classifier depends on."""
    import sklearn
    import skops

    return {
        "fc7": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "skops": skops.__version__,
        "pyarrow": pa.__version__,
    }


@dataclass(eq=False)
class Classifier:
    """A fitted classifier with the provenance of the embeddings it was trained on.

    Prediction only reads the fitted pipeline, so one instance serves concurrent threads; the
    embedder for `predict_images` is built once, under a lock, on first use.

    Example:
        >>> model = Classifier.load("out/clf")                 # doctest: +SKIP
        >>> model.predict_proba_top(vectors, k=3)[0]           # doctest: +SKIP
        [('dog', 0.91), ('cat', 0.06), ('fox', 0.01)]
    """

    model: Pipeline
    classes: list[str]
    provenance: Provenance
    manifest: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    # The classifier folder (set by `save` and `load`): where `predict_images` also looks for
    # the int8 model of int8 embeddings.
    folder: Path | None = None
    _embedder: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def score_kind(self) -> str:
        """What `score` values are: "probability" or "decision_function"."""
        return score_kind(self.model)

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.provenance.dim:
            raise ConfigError(
                f"vectors of shape {vectors.shape}: this classifier expects (rows, "
                f"{self.provenance.dim}) {self.provenance.layer} embeddings"
            )
        return vectors

    def predict_vectors(self, vectors: np.ndarray, k: int = 5) -> dict[str, Any]:
        """Labels, the predicted label's score, and the top-k labels and scores per row.

        Args:
            vectors: (rows, dim) embeddings from the same model, weights and layer.
            k: how many best labels to return per row.

        Returns:
            {"prediction": list[str], "score": (rows,) array, "top_labels": list[list[str]],
             "top_scores": (rows, k) array}.

        Raises:
            ConfigError: `vectors` does not have the classifier's width.
        """
        vectors = self._check(vectors)
        if len(vectors) == 0:
            empty = np.zeros((0, min(k, len(self.classes))), np.float32)
            return {
                "prediction": [],
                "score": np.zeros(0, np.float32),
                "top_labels": [],
                "top_scores": empty,
            }
        predicted = np.asarray(self.model.predict(vectors), dtype=int)
        scores, _ = class_scores(self.model, vectors, len(self.classes))
        order, best = top_k(scores, k)
        names = np.asarray(self.classes, dtype=object)
        return {
            "prediction": names[predicted].tolist(),
            "score": scores[np.arange(len(vectors)), predicted].astype(np.float32),
            "top_labels": names[order].tolist(),
            "top_scores": best.astype(np.float32),
        }

    def predict_proba_top(self, vectors: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """For each vector, the top-k (label, probability or decision score), best first.

        Example:
            >>> model.predict_proba_top(np.zeros((1, 4096)), k=2)  # doctest: +SKIP
            [[('cat', 0.7), ('dog', 0.2)]]
        """
        result = self.predict_vectors(vectors, k)
        return [
            [(label, float(score)) for label, score in zip(labels, scores, strict=True)]
            for labels, scores in zip(result["top_labels"], result["top_scores"], strict=True)
        ]

    def predict_images(
        self, images: list[bytes], k: int = 5, device: str = "auto"
    ) -> tuple[list[list[tuple[str, float]] | None], list[str | None]]:
        """Embed encoded images with the recorded model and classify them.

        Args:
            images: encoded image files.
            k: how many best labels to return per image.
            device: auto, cpu or cuda, for the embedder (built on the first call).

        Returns:
            (per image its top-k (label, score) or None when it failed, per image None or the
            reason it could not be decoded).

        Raises:
            WeightsError, ProvenanceMismatch: the recorded weights are not available here.
            ArtifactError: int8 embeddings whose model is neither in the cache nor in the
                classifier folder.
        """
        from pipeline.model import Embedder

        with self._lock:
            if self._embedder is None:
                model_dirs = (str(self.folder),) if self.folder is not None else ()
                self._embedder = Embedder.matching(
                    self.provenance, device=device, model_dirs=model_dirs
                )
        vectors, errors = self._embedder.embed_bytes(images)
        ok = [i for i, error in enumerate(errors) if error is None]
        tops = self.predict_proba_top(vectors[ok], k) if ok else []
        results: list[list[tuple[str, float]] | None] = [None] * len(images)
        for i, top in zip(ok, tops, strict=True):
            results[i] = top
        return results, errors

    def save(
        self, model_dir: str | Path, training: dict[str, Any], int8_model: bytes | None = None
    ) -> None:
        """Write `model.skops` and `manifest.json` into `model_dir`, replacing those files,
        and, for int8 embeddings, their int8 model; an int8 model of an earlier classifier there
        is deleted.

        Args:
            model_dir: the classifier folder.
            training: what it was trained on, recorded as the manifest's `training`.
            int8_model: the model that made int8 embeddings (`provenance.int8_model_sha256`);
                required for them, ignored otherwise.

        Raises:
            OutputError: `model_dir` is not empty and not a classifier folder, or cannot be
                written.
            ArtifactError: int8 embeddings without their model, or a model of another sha256.
        """
        import skops.io as sio

        folder = Path(model_dir)
        check_classifier_out(folder, overwrite=True)
        int8_name = None
        if self.provenance.precision == "int8":
            int8_name = int8_model_name(self.provenance.int8_model_sha256)
            if int8_model is None or (
                hashlib.sha256(int8_model).hexdigest() != self.provenance.int8_model_sha256
            ):
                raise ArtifactError(
                    f"--out {folder}: a classifier of int8 embeddings needs their int8 model "
                    f"{int8_name} beside it"
                )
        try:
            folder.mkdir(parents=True, exist_ok=True)
            temporary = folder / f".{MODEL_FILE}.tmp"
            sio.dump(self.model, temporary)
            os.replace(temporary, folder / MODEL_FILE)
            if int8_name is not None:
                temporary = folder / f".{int8_name}.tmp"
                temporary.write_bytes(int8_model)
                os.replace(temporary, folder / int8_name)
        except OSError as err:
            raise OutputError(f"--out {folder}: cannot write the classifier: {err}") from err
        self.manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": CLASSIFIER_KIND,
            "classifier": training.get("classifier"),
            "classes": self.classes,
            "score_kind": self.score_kind,
            "provenance": json.loads(self.provenance.to_json()),
            "training": training,
            "model_file": MODEL_FILE,
            "model_sha256": file_sha256(folder / MODEL_FILE),
            "int8_model": int8_name,
            "trusted_types": TRUSTED_TYPES,
            "versions": library_versions(),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(folder / MANIFEST_FILE, self.manifest)
        self.folder = folder
        _remove_stale_int8_models(folder, keep=int8_name)

    @classmethod
    def load(cls, model_dir: str | Path) -> Classifier:
        """Load a classifier folder, verifying its manifest, checksum and stored types.

        Raises:
            ArtifactError: missing or invalid manifest, newer schema, a model file whose sha256
                differs from the manifest's (tampered or corrupt), or one holding types outside
                the trusted list; nothing from such a file is executed.
        """
        folder = Path(model_dir)
        manifest, manifest_path = _read_manifest(folder)
        try:
            classes = [str(name) for name in manifest["classes"]]
            provenance = Provenance.from_json(
                json.dumps(manifest["provenance"]), str(manifest_path)
            )
            expected_sha = str(manifest["model_sha256"])
        except (KeyError, TypeError) as err:
            raise ArtifactError(f"{manifest_path}: manifest lacks {err}") from err
        model = _load_model(folder / MODEL_FILE, expected_sha)
        if not isinstance(model, Pipeline) or len(getattr(model, "classes_", [])) != len(classes):
            raise ArtifactError(
                f"{folder / MODEL_FILE}: does not match the classes in {manifest_path}"
            )
        metrics = None
        if (folder / METRICS_FILE).is_file():
            try:
                metrics = json.loads((folder / METRICS_FILE).read_text())
            except (OSError, ValueError) as err:
                raise ArtifactError(f"{folder / METRICS_FILE}: unreadable ({err})") from err
        return cls(
            model=model, classes=classes, provenance=provenance, manifest=manifest,
            metrics=metrics, folder=folder,
        )


def _remove_stale_int8_models(folder: Path, keep: str | None) -> None:
    """Delete the int8 models of earlier classifiers in `folder` (all but `keep`), and those
    a killed run left half-written."""
    for path in [*folder.glob("int8-*.onnx"), *folder.glob(".int8-*.onnx.tmp")]:
        if path.name == keep or path.is_dir():
            continue
        if not (INT8_MODEL_NAME.fullmatch(path.name) or _is_leftover(path.name)):
            continue
        try:
            path.unlink()
        except OSError:
            pass  # a stale copy is harmless: the manifest names the model in use


def _read_manifest(folder: Path) -> tuple[dict[str, Any], Path]:
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(
            f"{folder}: not a classifier folder (no {MANIFEST_FILE}); make one with fc7 train"
        ) from None
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path}: unreadable manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("kind") != CLASSIFIER_KIND:
        raise ArtifactError(f"{path}: not an fc7 classifier manifest")
    check_schema_version(manifest.get("schema_version"), SCHEMA_VERSION, str(path), RETRAIN)
    return manifest, path


def _load_model(path: Path, expected_sha: str) -> Any:
    """The pipeline in a skops file, after its checksum and stored types are checked."""
    import skops.io as sio

    if not path.is_file():
        raise ArtifactError(f"{path}: missing model file")
    found_sha = file_sha256(path)
    if found_sha != expected_sha:
        raise ArtifactError(
            f"{path}: sha256 {found_sha[:12]}... differs from the manifest's "
            f"{expected_sha[:12]}...: the file was modified or corrupted; not loading it "
            f"(retrain, or restore the folder as fc7 train wrote it)"
        )
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as err:  # skops raises many kinds for a non-skops file
        raise ArtifactError(f"{path}: not a skops file ({err})") from err
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        raise ArtifactError(
            f"{path}: holds types outside the trusted list ({', '.join(refused)}); "
            f"refusing to load it"
        )
    try:
        return sio.load(path, trusted=TRUSTED_TYPES)
    except Exception as err:  # same: any failure means the file is not ours
        raise ArtifactError(f"{path}: cannot load the model ({err})") from err


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON into `path`, atomically (see `write_text`)."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write `text` beside `path` and move it into place.

    Raises:
        OutputError: the folder cannot be written.
    """
    # Moved into place: a symlink the user put there is replaced, never followed to overwrite
    # what it points to.
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as err:
        raise OutputError(f"--out {path.parent}: cannot write {path.name}: {err}") from err


def is_classifier_file(name: str) -> bool:
    """Whether fc7 writes a file of this name in a classifier folder (`CLASSIFIER_FILES`, or
    an int8 model `int8-<sha256>.onnx`)."""
    return name in CLASSIFIER_FILES or bool(INT8_MODEL_NAME.fullmatch(name))


def _is_leftover(name: str) -> bool:
    """A temporary file of fc7's, left in a classifier folder by a killed run."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    return is_classifier_file(name[1 : -len(".tmp")])


def _is_classifier_folder(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == CLASSIFIER_KIND


def check_classifier_out(out: Path, overwrite: bool) -> None:
    """Refuse a classifier --out that fc7 must not write into.

    fc7 writes into a new or empty folder, or, with `overwrite`, over a classifier it made,
    replacing only `CLASSIFIER_FILES` and int8 models (`int8-<sha256>.onnx`) there; anything
    else in the folder is left alone.

    Raises:
        OutputError: `out` is not a folder; is not empty and not a classifier folder (with or
            without `overwrite`; the message lists what it holds); holds a classifier and not
            `overwrite`; or holds a folder under one of fc7's file names.

    Example:
        >>> check_classifier_out(Path("out/clf"), overwrite=True)  # doctest: +SKIP
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder; choose another --out")
    try:
        fs, folder = resolve(str(out))
        entries = foreign_entries(fs, folder, lambda info: _is_leftover(info.base_name))
    except OSError as err:
        raise OutputError(f"--out {out}: cannot list: {err}") from err
    if not entries:
        return
    if not _is_classifier_folder(out):
        raise OutputError(
            f"--out {out}: not empty and not an fc7 classifier folder (no valid "
            f"{MANIFEST_FILE}): holds {describe_entries(entries)}; fc7 writes a classifier "
            f"only into a new or empty folder or over one it made; choose another --out"
        )
    if not overwrite:
        raise OutputError(
            f"--out {out}: already holds a classifier; pass --overwrite to replace it (only "
            f"fc7's own files there are replaced)"
        )
    blocked = [name for name in CLASSIFIER_FILES if (out / name).is_dir()] + [
        name.rstrip("/") for name in entries
        if name.endswith("/") and INT8_MODEL_NAME.fullmatch(name.rstrip("/"))
    ]
    if blocked:
        raise OutputError(
            f"--out {out}: {describe_entries(blocked)} is a folder, not a file fc7 wrote; "
            f"move it away or choose another --out"
        )
