"""Classifiers on embeddings: train and evaluate scikit-learn pipelines, save, load, predict.

A classifier is a scikit-learn `Pipeline` (`Normalizer` -> optional `PCA` -> estimator) fitted
on integer-coded labels. Classifier folders hold:

- `model.skops`: the fitted pipeline in skops format, loaded only with an explicit list of
  trusted types (never plain pickle), after its sha256 is checked against the manifest;
- `manifest.json`: classes, the embeddings' provenance, the training data fingerprint, library
  versions, the schema version;
- `metrics.json`, `report.md`, `confusion_matrix.png`: the evaluation.

Every classifier except `sgd` trains on all rows in memory and refuses, with the numbers, data
that will not fit; `sgd` streams the Parquet with `partial_fit` (and `IncrementalPCA`) instead.

Example:
    >>> model = train(TrainConfig(embeddings="out/emb", out="out/clf"))  # doctest: +SKIP
    >>> Classifier.load("out/clf").predict_proba_top(vectors, k=3)       # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field, model_validator
from sklearn.base import clone
from sklearn.decomposition import PCA, IncrementalPCA
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import LinearSVC

from pipeline import __version__
from pipeline.config import JobConfig
from pipeline.errors import ArtifactError, ConfigError, OutputError
from pipeline.provenance import PARQUET_METADATA_KEY, Provenance, file_sha256
from pipeline.store import (
    TEMPORARY_NAME,
    EmbeddingDataset,
    describe_entries,
    embeddings_to_numpy,
    foreign_entries,
    resolve,
    write_table_atomically,
)

SCHEMA_VERSION = 1
CLASSIFIERS = ("logreg", "linear-svm", "knn", "sgd", "mlp")
MODEL_FILE = "model.skops"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
CONFUSION_FILE = "confusion_matrix.png"
PREDICTIONS_METADATA_KEY = b"fc7.classifier"
# Everything fc7 writes in a classifier folder; --overwrite replaces these and nothing else.
CLASSIFIER_FILES = (MODEL_FILE, MANIFEST_FILE, METRICS_FILE, REPORT_FILE, CONFUSION_FILE)
CLASSIFIER_KIND = "fc7-classifier"
# The names of prediction parts (write order, 5 digits or more).
PREDICTION_PART = re.compile(r"part-\d{5,}\.parquet")
# skops refuses any type outside its defaults (numpy, scikit-learn estimators) unless listed
# here. The list is fixed in code, never read from the model folder, so a tampered folder
# cannot widen it.
TRUSTED_TYPES = [
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
]
# Small grids for --search: the one parameter that matters most for each classifier.
SEARCH_GRIDS: dict[str, dict[str, list[Any]]] = {
    "logreg": {"C": [0.01, 0.1, 1.0, 10.0]},
    "linear-svm": {"C": [0.01, 0.1, 1.0, 10.0]},
    "knn": {"n_neighbors": [1, 3, 5, 10, 20]},
    "mlp": {"alpha": [1e-4, 1e-3, 1e-2]},
}
# In-memory training holds the float32 matrix plus copies (normalised, PCA, solver); refuse
# when the matrix alone needs more than this share of the available memory.
MEMORY_SHARE = 0.5


class TrainConfig(JobConfig):
    """Options of `fc7 train` (and `configs/train.yaml`)."""

    embeddings: str
    out: str
    classifier: Literal["logreg", "linear-svm", "knn", "sgd", "mlp"] = "logreg"
    label_column: str = "label"
    normalize: bool = True
    pca: int | None = Field(None, ge=1)
    test_size: float = Field(0.2, gt=0, lt=1)
    test: str | None = None
    cv: int | None = Field(None, ge=2)
    search: bool = False
    class_weight: Literal["balanced"] | None = None
    C: float = Field(1.0, gt=0)
    alpha: float = Field(1e-4, gt=0)
    neighbors: int = Field(10, ge=1)
    hidden: int = Field(512, ge=1)
    epochs: int = Field(5, ge=1)
    shuffle_buffer: int = Field(20_000, ge=1)
    batch_size: int = Field(8192, ge=1)
    top_k: int = Field(5, ge=1)
    seed: int = 0
    overwrite: bool = False

    @model_validator(mode="after")
    def _compatible_options(self) -> TrainConfig:
        if self.cv and self.test:
            raise ValueError("--cv and --test are two evaluation protocols: choose one")
        if self.classifier == "sgd" and (self.cv or self.search):
            raise ValueError(
                "--classifier sgd streams the data and supports neither --cv nor --search; "
                "evaluate it with --test-size or --test, or use another classifier"
            )
        if self.class_weight and self.classifier in ("knn", "mlp"):
            raise ValueError(f"--class-weight is not supported by --classifier {self.classifier}")
        return self


class PredictConfig(JobConfig):
    """Options of `fc7 predict`."""

    model_dir: str
    embeddings: str | None = None
    out: str | None = None
    image: list[str] = []
    top_k: int = Field(5, ge=1)
    batch_size: int = Field(8192, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    overwrite: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> PredictConfig:
        if bool(self.image) == bool(self.embeddings):
            raise ValueError("give either EMBEDDINGS (with --out) or --image PATH..., not both")
        if self.embeddings and not self.out:
            raise ValueError("--out PRED_DIR is required with EMBEDDINGS")
        return self


# ---------------------------------------------------------------------------- estimators


def build_pipeline(config: TrainConfig, class_weight: dict[int, float] | None = None) -> Pipeline:
    """The unfitted scikit-learn pipeline for `config`: Normalizer, PCA, estimator.

    Args:
        config: the training options (classifier, normalize, pca, C, alpha, ...).
        class_weight: explicit weights per class index; `sgd` needs them because `partial_fit`
            cannot compute "balanced" itself.

    Returns:
        A `Pipeline` made with `make_pipeline`.

    Example:
        >>> build_pipeline(TrainConfig(embeddings="e", out="o", pca=64))  # doctest: +SKIP
        Pipeline(steps=[('normalizer', Normalizer()), ('pca', PCA(...)), ...])
    """
    steps: list[Any] = []
    if config.normalize:
        steps.append(Normalizer())
    if config.pca:
        if config.classifier == "sgd":
            steps.append(IncrementalPCA(n_components=config.pca))
        else:
            steps.append(PCA(n_components=config.pca, random_state=config.seed))
    steps.append(_estimator(config, class_weight))
    return make_pipeline(*steps)


def _estimator(config: TrainConfig, class_weight: dict[int, float] | None) -> Any:
    weight = class_weight if class_weight is not None else config.class_weight
    if config.classifier == "logreg":
        return LogisticRegression(
            C=config.C, max_iter=1000, class_weight=weight, random_state=config.seed
        )
    if config.classifier == "linear-svm":
        return LinearSVC(C=config.C, class_weight=weight, random_state=config.seed)
    if config.classifier == "knn":
        # brute force: exact, best for wide vectors, and stores no tree skops would distrust
        return KNeighborsClassifier(n_neighbors=config.neighbors, algorithm="brute")
    if config.classifier == "mlp":
        return MLPClassifier(
            hidden_layer_sizes=(config.hidden,), alpha=config.alpha, random_state=config.seed
        )
    # log loss rather than hinge so that sgd gives probabilities (top-k accuracy, scores)
    return SGDClassifier(
        loss="log_loss", alpha=config.alpha, class_weight=weight, random_state=config.seed
    )


def _searched(config: TrainConfig, pipeline: Pipeline, rows_per_class: int) -> Any:
    """`pipeline` itself, or a `GridSearchCV` over its key parameter when `--search`."""
    if not config.search:
        return pipeline
    step = pipeline.steps[-1][0]
    ((name, values),) = SEARCH_GRIDS[config.classifier].items()
    folds = config.cv or 3
    if name == "n_neighbors":
        # a k-NN needs at least k training rows in every inner fold
        values = [k for k in values if k <= rows_per_class * (folds - 1)] or [1]
    return GridSearchCV(
        pipeline,
        {f"{step}__{name}": values},
        cv=StratifiedKFold(folds, shuffle=True, random_state=config.seed),
        scoring="accuracy",
    )


# ---------------------------------------------------------------------------- reading data


@dataclass
class LabelledRows:
    """Labelled embeddings read into memory; `skipped_*` count rows left out and why."""

    vectors: np.ndarray
    labels: np.ndarray
    ids: list[str]
    skipped_errors: int = 0
    skipped_unlabelled: int = 0


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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


def _label_mask(labels: pa.Array) -> np.ndarray:
    """True where a row has a usable label (not null, not blank)."""
    if labels.type != pa.string():
        labels = pc.cast(labels, pa.string())
    blank = pc.equal(pc.utf8_trim_whitespace(labels), "")
    return np.asarray(pc.fill_null(pc.invert(blank), False).to_numpy(zero_copy_only=False))


def _open(uri: str) -> EmbeddingDataset:
    return EmbeddingDataset.open(uri)


def _require_label_column(data: EmbeddingDataset, column: str) -> None:
    names = data.dataset.schema.names
    if column not in names:
        raise ConfigError(
            f"--label-column {column}: {data.uri} has no such column (it has {', '.join(names)})"
        )


def read_labelled(data: EmbeddingDataset, label_column: str, batch_size: int) -> LabelledRows:
    """Read the rows of `data` that have an embedding and a label into memory.

    Rows with an `error` or an empty label are skipped and counted, never silently dropped.

    Raises:
        ConfigError: no such label column, or the rows would not fit in memory.
    """
    _require_label_column(data, label_column)
    total = data.count(with_errors=True)
    good = data.count()
    check_fits_in_memory(good, data.provenance.dim, data.uri)
    vectors, labels, ids = [], [], []
    for batch in data.batches(["id", label_column, "embedding"], batch_size):
        keep = _label_mask(batch[label_column])
        if not keep.any():
            continue
        batch = batch.filter(pa.array(keep))
        vectors.append(embeddings_to_numpy(batch["embedding"]))
        labels.extend(batch[label_column].to_pylist())
        ids.extend(batch["id"].to_pylist())
    dim = data.provenance.dim
    return LabelledRows(
        vectors=np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
        labels=np.array([str(label) for label in labels], dtype=object),
        ids=ids,
        skipped_errors=total - good,
        skipped_unlabelled=good - len(ids),
    )


def _require_rows(data: EmbeddingDataset, rows: int, skipped_errors: int, label_column: str):
    if data.count(with_errors=True) == 0:
        raise ArtifactError(f"{data.uri}: holds no rows: nothing to train on")
    if rows == 0:
        if skipped_errors == data.count(with_errors=True):
            raise ConfigError(
                f"{data.uri}: all {skipped_errors} rows have an error (no embedding): "
                f"nothing to train on; fix the extraction first"
            )
        raise ConfigError(
            f"{data.uri}: no row has a '{label_column}': nothing to train on. Extract from a "
            f"folder of class folders (the folder name is the label), a manifest with a label "
            f"column, or pass --label-column"
        )


def _drop_small_classes(labels: np.ndarray, minimum: int, why: str) -> tuple[np.ndarray, dict]:
    """A mask of rows whose class has at least `minimum` rows, and the classes left out."""
    counts = Counter(labels.tolist())
    small = {label: n for label, n in sorted(counts.items()) if n < minimum}
    keep = np.array([label not in small for label in labels], dtype=bool)
    if small:
        listed = ", ".join(f"{label} ({n})" for label, n in list(small.items())[:10])
        more = f" and {len(small) - 10} more" if len(small) > 10 else ""
        print(
            f"note: {len(small)} class(es) have fewer than {minimum} labelled rows, needed "
            f"for {why}, and are left out of training: {listed}{more}"
        )
    return keep, small


def _require_classes(classes: list[str], where: str) -> None:
    if len(classes) < 2:
        found = f"only '{classes[0]}'" if classes else "none"
        raise ConfigError(
            f"{where}: a classifier needs at least 2 classes with enough rows; found {found}"
        )


# ---------------------------------------------------------------------------- scoring


def class_scores(model: Any, x: np.ndarray, n_classes: int) -> tuple[np.ndarray, str]:
    """Scores of every class for every row: probabilities when the model has them.

    Returns:
        (array (rows, n_classes), "probability" or "decision_function").
    """
    if hasattr(model, "predict_proba"):
        raw, kind = model.predict_proba(x), "probability"
    else:
        raw, kind = model.decision_function(x), "decision_function"
        if raw.ndim == 1:  # binary: one margin, positive for classes_[1]
            raw = np.column_stack([-raw, raw])
    scores = np.full((len(x), n_classes), -np.inf if kind != "probability" else 0.0)
    scores[:, np.asarray(model.classes_, dtype=int)] = raw
    return scores, kind


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the `k` best classes per row, best first (stable for ties)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def evaluate(
    y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray, classes: list[str], k: int = 5
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, top-k accuracy and per-class P/R/F1/support.

    Top-k accuracy is null when there are no more than k classes (it would be 1 trivially).

    Example:
        >>> evaluate(np.array([0, 1]), np.array([0, 0]), np.eye(2), ["a", "b"])["accuracy"]
        0.5
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    top = None
    if len(classes) > k:
        top = float(top_k_accuracy_score(y_true, scores, k=k, labels=labels))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        f"top{k}_accuracy": top,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


# ---------------------------------------------------------------------------- the classifier


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
    _embedder: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def score_kind(self) -> str:
        """What `score` values are: "probability" or "decision_function"."""
        return "probability" if hasattr(self.model, "predict_proba") else "decision_function"

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

        Returns:
            (per image its top-k (label, score) or None when it failed, per image None or the
            reason it could not be decoded).

        Raises:
            WeightsError, ProvenanceMismatch: the recorded weights are not available here.
        """
        from pipeline.model import Embedder

        with self._lock:
            if self._embedder is None:
                self._embedder = Embedder.matching(self.provenance, device=device)
        vectors, errors = self._embedder.embed_bytes(images)
        ok = [i for i, error in enumerate(errors) if error is None]
        tops = self.predict_proba_top(vectors[ok], k) if ok else []
        results: list[list[tuple[str, float]] | None] = [None] * len(images)
        for i, top in zip(ok, tops, strict=True):
            results[i] = top
        return results, errors

    def save(self, model_dir: str | Path, training: dict[str, Any]) -> None:
        """Write `model.skops` and `manifest.json` into `model_dir`, replacing those files.

        Raises:
            OutputError: `model_dir` is not empty and not a classifier folder, or cannot be
                written.
        """
        import skops.io as sio

        folder = Path(model_dir)
        check_classifier_out(folder, overwrite=True)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            temporary = folder / f".{MODEL_FILE}.tmp"
            sio.dump(self.model, temporary)
            os.replace(temporary, folder / MODEL_FILE)
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
            "trusted_types": TRUSTED_TYPES,
            "versions": library_versions(),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _write_json(folder / MANIFEST_FILE, self.manifest)

    @classmethod
    def load(cls, model_dir: str | Path) -> Classifier:
        """Load a classifier folder, verifying its manifest, checksum and stored types.

        Raises:
            ArtifactError: missing or invalid manifest, newer schema, a model file whose sha256
                differs from the manifest's (tampered or corrupt), or one holding types outside
                the trusted list; nothing from such a file is executed.
        """
        import skops.io as sio

        folder = Path(model_dir)
        manifest_path = folder / MANIFEST_FILE
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise ArtifactError(
                f"{folder}: not a classifier folder (no {MANIFEST_FILE}); make one with fc7 train"
            ) from None
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{manifest_path}: unreadable manifest ({err})") from err
        if not isinstance(manifest, dict) or manifest.get("kind") != CLASSIFIER_KIND:
            raise ArtifactError(f"{manifest_path}: not an fc7 classifier manifest")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            raise ArtifactError(
                f"{manifest_path}: classifier schema {version}, this fc7 reads {SCHEMA_VERSION}; "
                + ("upgrade fc7" if newer else "retrain it with fc7 train")
            )
        try:
            classes = [str(name) for name in manifest["classes"]]
            provenance = Provenance.from_json(
                json.dumps(manifest["provenance"]), str(manifest_path)
            )
            expected_sha = str(manifest["model_sha256"])
        except (KeyError, TypeError) as err:
            raise ArtifactError(f"{manifest_path}: manifest lacks {err}") from err
        model_path = folder / MODEL_FILE
        if not model_path.is_file():
            raise ArtifactError(f"{model_path}: missing model file")
        found_sha = file_sha256(model_path)
        if found_sha != expected_sha:
            raise ArtifactError(
                f"{model_path}: sha256 {found_sha[:12]}... differs from the manifest's "
                f"{expected_sha[:12]}...: the file was modified or corrupted; not loading it "
                f"(retrain, or restore the folder as fc7 train wrote it)"
            )
        try:
            untrusted = sio.get_untrusted_types(file=model_path)
        except Exception as err:  # skops raises many kinds for a non-skops file
            raise ArtifactError(f"{model_path}: not a skops file ({err})") from err
        refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
        if refused:
            raise ArtifactError(
                f"{model_path}: holds types outside the trusted list ({', '.join(refused)}); "
                f"refusing to load it"
            )
        try:
            model = sio.load(model_path, trusted=TRUSTED_TYPES)
        except Exception as err:  # same: any failure means the file is not ours
            raise ArtifactError(f"{model_path}: cannot load the model ({err})") from err
        if not isinstance(model, Pipeline) or len(getattr(model, "classes_", [])) != len(classes):
            raise ArtifactError(f"{model_path}: does not match the classes in {manifest_path}")
        metrics = None
        if (folder / METRICS_FILE).is_file():
            try:
                metrics = json.loads((folder / METRICS_FILE).read_text())
            except (OSError, ValueError) as err:
                raise ArtifactError(f"{folder / METRICS_FILE}: unreadable ({err})") from err
        return cls(
            model=model, classes=classes, provenance=provenance, manifest=manifest, metrics=metrics
        )


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _write_text(path: Path, text: str) -> None:
    # Written beside and moved into place: a symlink the user put there is replaced, never
    # followed to overwrite what it points to.
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as err:
        raise OutputError(f"--out {path.parent}: cannot write {path.name}: {err}") from err


def _is_classifier_folder(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == CLASSIFIER_KIND


def check_classifier_out(out: Path, overwrite: bool) -> None:
    """Refuse a classifier --out that fc7 must not write into.

    fc7 writes into a new or empty folder, or, with `overwrite`, over a classifier it made,
    replacing only `CLASSIFIER_FILES` there; anything else in the folder is left alone.

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
        leftovers = {f".{name}.tmp" for name in CLASSIFIER_FILES}  # from a killed run
        entries = foreign_entries(
            pafs.LocalFileSystem(), str(out), lambda info: info.base_name in leftovers
        )
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
    blocked = [name for name in CLASSIFIER_FILES if (out / name).is_dir()]
    if blocked:
        raise OutputError(
            f"--out {out}: {describe_entries(blocked)} is a folder, not a file fc7 wrote; "
            f"move it away or choose another --out"
        )


# ---------------------------------------------------------------------------- training


@dataclass
class _Evaluation:
    protocol: dict[str, Any]
    y_true: np.ndarray
    y_pred: np.ndarray
    scores: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


def train(config: TrainConfig) -> Classifier:
    """Train, evaluate and save a classifier as `config` says; the job behind `fc7 train`.

    Writes `model.skops`, `manifest.json`, `metrics.json`, `report.md` and
    `confusion_matrix.png` into `config.out`.

    Returns:
        The fitted `Classifier`, its `metrics` set.

    Raises:
        ConfigError: no labels, fewer than 2 usable classes, incompatible options, a label
            column that does not exist, or data too large for the chosen classifier.
        ArtifactError: unreadable, damaged or empty embeddings, or a vector no AlexNet layer
            produces (NaN, infinite, negative); the message names the file and row.
        ProvenanceMismatch: `--test` embeddings made with different features.
        OutputError: `config.out` already holds a classifier (pass --overwrite), or is not
            empty and not a classifier folder (see `check_classifier_out`).

    Example:
        >>> model = train(TrainConfig(embeddings="out/emb", out="out/clf", cv=5))  # doctest: +SKIP
    """
    out = Path(config.out)
    check_classifier_out(out, config.overwrite)
    data = _open(config.embeddings)
    test_data = _open(config.test) if config.test else None
    if test_data is not None:
        data.provenance.require_compatible(
            test_data.provenance, mine=f"embeddings {data.uri}", theirs=f"--test {test_data.uri}"
        )
        _require_label_column(test_data, config.label_column)
    if config.classifier == "sgd":
        model, classes, evaluation, counts = _train_streaming(config, data, test_data)
    else:
        model, classes, evaluation, counts = _train_in_memory(config, data, test_data)
    metrics = evaluate(
        evaluation.y_true, evaluation.y_pred, evaluation.scores, classes, config.top_k
    )
    metrics.update(evaluation.extra)
    metrics["protocol"] = evaluation.protocol
    metrics["counts"] = counts
    metrics["classifier"] = config.classifier
    metrics["score_kind"] = (
        "probability" if hasattr(model, "predict_proba") else "decision_function"
    )
    classifier = Classifier(
        model=model, classes=classes, provenance=data.provenance, metrics=metrics
    )
    training = {
        "classifier": config.classifier,
        "embeddings": data.uri,
        "fingerprint": data.fingerprint(),
        "label_column": config.label_column,
        "test": test_data.uri if test_data else None,
        "test_fingerprint": test_data.fingerprint() if test_data else None,
        "rows": counts["train"],
        "config": config.model_dump(),
    }
    classifier.save(out, training)
    write_report(out, metrics, classes)
    return classifier


def _holdout(config: TrainConfig, rows: np.ndarray, y: np.ndarray, classes: int) -> tuple:
    """A stratified train/test split of `rows` (vectors or ids) and `y`, and its protocol.

    Raises:
        ConfigError: some class cannot have a row on both sides.
    """
    try:
        rows_train, rows_test, y_train, y_test = train_test_split(
            rows, y, test_size=config.test_size, stratify=y, random_state=config.seed
        )
    except ValueError as err:
        raise ConfigError(_split_problem(config, len(y), classes, err)) from None
    protocol = {
        "kind": "stratified-holdout",
        "test_size": config.test_size,
        "seed": config.seed,
        "final_model": "trained on the training split",
    }
    return rows_train, rows_test, y_train, y_test, protocol


def _split_problem(config: TrainConfig, rows: int, classes: int, err: ValueError) -> str:
    return (
        f"--test-size {config.test_size}: cannot split {rows} rows of {classes} classes with "
        f"one of each class on both sides ({err}); change --test-size, add rows, or use --cv"
    )


def _class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    counts = np.bincount(y, minlength=n_classes)
    return {i: len(y) / (n_classes * n) for i, n in enumerate(counts) if n}


def _train_in_memory(
    config: TrainConfig, data: EmbeddingDataset, test_data: EmbeddingDataset | None
) -> tuple[Pipeline, list[str], _Evaluation, dict[str, Any]]:
    rows = read_labelled(data, config.label_column, config.batch_size)
    _require_rows(data, len(rows.ids), rows.skipped_errors, config.label_column)
    if test_data is not None:
        minimum, why = 1, "training"
    elif config.cv:
        minimum, why = config.cv, f"{config.cv}-fold cross-validation"
    else:
        minimum, why = 2, "a stratified train/test split"
    keep, small = _drop_small_classes(rows.labels, minimum, why)
    x, labels = rows.vectors[keep], rows.labels[keep]
    classes = sorted(set(labels.tolist()))
    _require_classes(classes, data.uri)
    y = np.searchsorted(np.asarray(classes, dtype=object), labels).astype(np.int64)
    counts: dict[str, Any] = {
        "rows": data.count(with_errors=True),
        "skipped_error": rows.skipped_errors,
        "skipped_no_label": rows.skipped_unlabelled,
        "skipped_small_class": int((~keep).sum()),
        "small_classes": small,
        "labelled": len(rows.ids),
        "classes": len(classes),
    }
    rows_per_class = int(np.bincount(y).min())
    if config.pca and config.pca > min(x.shape):
        raise ConfigError(
            f"--pca {config.pca}: must not exceed the rows ({x.shape[0]}) or dims ({x.shape[1]})"
        )
    estimator = _searched(config, build_pipeline(config), rows_per_class)

    if config.cv:
        folds = StratifiedKFold(config.cv, shuffle=True, random_state=config.seed)
        y_pred = np.empty_like(y)
        scores = np.empty((len(y), len(classes)))
        fold_accuracy = []
        for train_rows, test_rows in folds.split(x, y):
            fitted = clone(estimator).fit(x[train_rows], y[train_rows])
            y_pred[test_rows] = fitted.predict(x[test_rows])
            scores[test_rows] = class_scores(fitted, x[test_rows], len(classes))[0]
            fold_accuracy.append(float(np.mean(y_pred[test_rows] == y[test_rows])))
        model = estimator.fit(x, y)
        protocol = {
            "kind": "stratified-kfold",
            "folds": config.cv,
            "seed": config.seed,
            "final_model": "refit on all labelled rows",
        }
        extra = {
            "fold_accuracy": fold_accuracy,
            "fold_accuracy_mean": float(np.mean(fold_accuracy)),
            "fold_accuracy_std": float(np.std(fold_accuracy)),
        }
        evaluation = _Evaluation(protocol, y, y_pred, scores, extra)
        counts.update(train=len(y), test=len(y))
    else:
        if test_data is not None:
            x_train, y_train = x, y
            test_rows = read_labelled(test_data, config.label_column, config.batch_size)
            known = np.isin(test_rows.labels, np.asarray(classes, dtype=object))
            x_test = test_rows.vectors[known]
            y_test = np.searchsorted(np.asarray(classes, dtype=object), test_rows.labels[known])
            protocol = {"kind": "separate-test-set", "test": test_data.uri}
            counts.update(
                test_skipped_error=test_rows.skipped_errors,
                test_skipped_no_label=test_rows.skipped_unlabelled,
                test_skipped_unknown_class=int((~known).sum()),
            )
            if len(y_test) == 0:
                raise ConfigError(f"--test {test_data.uri}: no labelled rows of a known class")
        else:
            x_train, x_test, y_train, y_test, protocol = _holdout(config, x, y, len(classes))
        if config.classifier == "knn" and not config.search and config.neighbors > len(y_train):
            raise ConfigError(
                f"--neighbors {config.neighbors}: more than the {len(y_train)} training rows"
            )
        model = estimator.fit(x_train, y_train)
        y_pred = np.asarray(model.predict(x_test), dtype=int)
        scores = class_scores(model, x_test, len(classes))[0]
        evaluation = _Evaluation(protocol, y_test, y_pred, scores)
        counts.update(train=len(y_train), test=len(y_test))
    if config.search:
        evaluation.extra["search"] = {
            "best_params": {k.split("__", 1)[1]: v for k, v in model.best_params_.items()},
            "mean_cv_accuracy": {
                str(params): float(score)
                for params, score in zip(
                    model.cv_results_["params"], model.cv_results_["mean_test_score"], strict=True
                )
            },
        }
        model = model.best_estimator_
    return model, classes, evaluation, counts


def _stream(
    data: EmbeddingDataset,
    columns: list[str],
    batch_size: int,
    rng: np.random.Generator | None = None,
    buffer_rows: int = 0,
) -> Iterator[pa.RecordBatch]:
    """Batches of rows without errors; with `rng`, part files in random order, rows shuffled
    through a buffer of `buffer_rows` (extraction outputs are often sorted by class)."""
    if rng is None:
        yield from data.batches(columns, batch_size)
        return
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


def _train_streaming(
    config: TrainConfig, data: EmbeddingDataset, test_data: EmbeddingDataset | None
) -> tuple[Pipeline, list[str], _Evaluation, dict[str, Any]]:
    """`sgd`: one pass for the labels, one for IncrementalPCA, `epochs` for partial_fit."""
    _require_label_column(data, config.label_column)
    column = config.label_column
    # Pass 1: labels and ids only (small), to fix classes, weights and the held-out split.
    ids, labels = [], []
    for batch in data.batches(["id", column], config.batch_size):
        keep = pa.array(_label_mask(batch[column]))
        ids.extend(batch["id"].filter(keep).to_pylist())
        labels.extend(str(label) for label in batch[column].filter(keep).to_pylist())
    total, good = data.count(with_errors=True), data.count()
    _require_rows(data, len(ids), total - good, column)
    labels_array = np.array(labels, dtype=object)
    minimum = 1 if test_data is not None else 2
    keep, small = _drop_small_classes(
        labels_array, minimum, "training" if minimum == 1 else "a train/test split"
    )
    classes = sorted(set(labels_array[keep].tolist()))
    _require_classes(classes, data.uri)
    index = {name: i for i, name in enumerate(classes)}
    kept_ids = np.array(ids, dtype=object)[keep]
    y_all = np.array([index[label] for label in labels_array[keep]], dtype=np.int64)
    if test_data is None:
        train_ids, test_ids, y_train, _, protocol = _holdout(
            config, kept_ids, y_all, len(classes)
        )
        protocol.update(out_of_core=True, epochs=config.epochs)
    else:
        train_ids, test_ids, y_train = kept_ids, None, y_all
        protocol = {
            "kind": "separate-test-set",
            "test": test_data.uri,
            "out_of_core": True,
            "epochs": config.epochs,
        }
    train_set = pa.array(list(train_ids), pa.string())
    weights = _class_weights(y_train, len(classes)) if config.class_weight else None
    model = build_pipeline(config, class_weight=weights)
    steps = [step for _, step in model.steps]
    estimator = steps[-1]
    rng = np.random.default_rng(config.seed)

    def train_batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for batch in _stream(
            data, ["id", column, "embedding"], config.batch_size, rng, config.shuffle_buffer
        ):
            mask = pc.is_in(batch["id"], value_set=train_set)
            batch = batch.filter(mask)
            if batch.num_rows:
                y = np.array([index[str(label)] for label in batch[column].to_pylist()])
                yield embeddings_to_numpy(batch["embedding"]), y

    def transform(x: np.ndarray, upto: int) -> np.ndarray:
        for step in steps[:upto]:
            x = step.transform(x)
        return x

    if config.pca:
        pca_index = len(steps) - 2
        if config.pca > min(len(y_train), data.provenance.dim):
            raise ConfigError(f"--pca {config.pca}: more than the {len(y_train)} training rows")
        pending: list[np.ndarray] = []
        fitted_any = False
        for x, _ in train_batches():
            pending.append(transform(x, pca_index))
            if sum(len(p) for p in pending) >= max(config.batch_size, config.pca):
                steps[pca_index].partial_fit(np.concatenate(pending))
                pending, fitted_any = [], True
        rest = np.concatenate(pending) if pending else np.zeros((0, 1))
        # IncrementalPCA needs at least n_components rows per call; a short tail after other
        # chunks is left out of the PCA estimate (it still trains the classifier).
        if len(rest) >= config.pca or not fitted_any:
            steps[pca_index].partial_fit(rest)
    for _ in range(config.epochs):
        for x, y in train_batches():
            estimator.partial_fit(transform(x, len(steps) - 1), y, classes=np.arange(len(classes)))

    # Evaluation: stream the held-out rows (or the --test set) through the fitted pipeline.
    y_true, y_pred, scores = [], [], []
    unknown = 0
    source = test_data or data
    test_set = pa.array(list(test_ids), pa.string()) if test_ids is not None else None
    for batch in source.batches(["id", column, "embedding"], config.batch_size):
        if test_set is not None:
            batch = batch.filter(pc.is_in(batch["id"], value_set=test_set))
        else:
            batch = batch.filter(pa.array(_label_mask(batch[column])))
        names = [str(label) for label in batch[column].to_pylist()]
        known = np.array([name in index for name in names], dtype=bool)
        unknown += int((~known).sum())
        if not known.any():
            continue
        x = embeddings_to_numpy(batch["embedding"])[known]
        y_true.append(np.array([index[name] for name, k in zip(names, known, strict=True) if k]))
        y_pred.append(np.asarray(model.predict(x), dtype=int))
        scores.append(class_scores(model, x, len(classes))[0])
    if not y_true:
        raise ConfigError(f"{source.uri}: no labelled test rows of a known class")
    counts = {
        "rows": total,
        "skipped_error": total - good,
        "skipped_no_label": good - len(ids),
        "skipped_small_class": int((~keep).sum()),
        "small_classes": small,
        "labelled": len(ids),
        "classes": len(classes),
        "train": len(y_train),
        "test": int(sum(len(part) for part in y_true)),
    }
    if test_data is not None:
        counts["test_skipped_unknown_class"] = unknown
    evaluation = _Evaluation(
        protocol, np.concatenate(y_true), np.concatenate(y_pred), np.concatenate(scores)
    )
    return model, classes, evaluation, counts


# ---------------------------------------------------------------------------- reporting


def summary_text(metrics: dict[str, Any]) -> str:
    """The few lines printed at the end of `fc7 train` (and at the top of report.md)."""
    counts, protocol = metrics["counts"], metrics["protocol"]
    topk = next(
        (key for key in metrics if key.startswith("top") and key.endswith("_accuracy")), None
    )
    lines = [
        f"classifier: {metrics['classifier']} ({metrics['score_kind']} scores), "
        f"protocol: {protocol['kind']}"
        + (f" ({protocol['folds']} folds)" if "folds" in protocol else ""),
        f"rows: {counts['rows']} read, {counts['skipped_error']} with an error, "
        f"{counts['skipped_no_label']} without a label, {counts['skipped_small_class']} in "
        f"classes too small; {counts['classes']} classes, {counts['train']} train, "
        f"{counts['test']} evaluated",
        f"accuracy {metrics['accuracy']:.4f}, balanced accuracy "
        f"{metrics['balanced_accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}"
        + (
            f", {topk.split('_')[0]} accuracy {metrics[topk]:.4f}"
            if topk and metrics[topk] is not None
            else ""
        ),
    ]
    if "fold_accuracy_mean" in metrics:
        lines.append(
            f"fold accuracy {metrics['fold_accuracy_mean']:.4f} "
            f"± {metrics['fold_accuracy_std']:.4f}"
        )
    if "search" in metrics:
        lines.append(f"search: best {metrics['search']['best_params']}")
    if counts.get("small_classes"):
        lines.append(f"left out (too few rows): {', '.join(counts['small_classes'])}")
    return "\n".join(lines)


def write_report(folder: Path, metrics: dict[str, Any], classes: list[str]) -> None:
    """Write metrics.json, report.md and the confusion-matrix PNG into `folder`."""
    _write_json(folder / METRICS_FILE, metrics)
    _plot_confusion(np.asarray(metrics["confusion_matrix"]), classes, folder / CONFUSION_FILE)
    worst = sorted(metrics["per_class"].items(), key=lambda item: item[1]["f1"])[:10]
    table = "\n".join(
        f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        for name, m in worst
    )
    _write_text(
        folder / REPORT_FILE,
        "# Classifier report\n\n```\n" + summary_text(metrics) + "\n```\n\n"
        f"![confusion matrix]({CONFUSION_FILE})\n\n"
        "## Lowest F1 classes\n\n| class | precision | recall | F1 | support |\n"
        "|---|---|---|---|---|\n" + table + "\n\nAll numbers: `metrics.json`.\n",
    )


def _plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt

    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    size = min(4 + 0.25 * len(classes), 24)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
    if len(classes) <= 60:  # beyond that, names overlap into noise
        axes.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        axes.set_yticks(range(len(classes)), classes, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("confusion matrix (rows normalised)")
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp")  # see _write_text
    try:
        figure.savefig(temporary, dpi=100, format="png")
        os.replace(temporary, path)
    except OSError as err:
        raise OutputError(f"--out {path.parent}: cannot write {path.name}: {err}") from err
    finally:
        plt.close(figure)


# ---------------------------------------------------------------------------- predicting


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
        ArtifactError: a damaged part file in `data`, or a vector no AlexNet layer produces.
    """
    classifier.provenance.require_compatible(
        data.provenance, mine=f"classifier {model_dir}", theirs=f"embeddings {data.uri}"
    )
    fs, base = resolve(out)
    base = base.rstrip("/")
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


def _is_ours(fs: pafs.FileSystem, info: pafs.FileInfo) -> bool:
    """A predictions part fc7 wrote, or the temporary file of one left by a killed run."""
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
    return PREDICTIONS_METADATA_KEY in metadata
