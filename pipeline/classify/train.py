"""`train`: fit, evaluate and save a classifier, in memory or (`sgd`) streaming the Parquet.

Both paths start from the same labelled rows (`data.training_rows`) and the same evaluation
protocol (`evaluation_protocol`): a stratified hold-out, stratified K-fold cross-validation, or
a separate --test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.pipeline import Pipeline

from pipeline.classify.artifact import Classifier, check_classifier_out
from pipeline.classify.config import TrainConfig
from pipeline.classify.data import (
    encoded_batches,
    read_test_set,
    require_label_column,
    skipped_test_rows,
    training_rows,
)
from pipeline.classify.estimators import (
    as_class_columns,
    balanced_class_weights,
    build_pipeline,
    class_scores,
    score_kind,
    score_method,
    search_summary,
    with_search,
)
from pipeline.classify.report import evaluate, write_report
from pipeline.errors import ConfigError
from pipeline.extract.plan import plan_folder
from pipeline.neighbours import NEAR_DUPLICATE_COSINE, nearest_in
from pipeline.quantize import int8_model_for
from pipeline.store import EmbeddingDataset


@dataclass
class Evaluation:
    """Class codes and scores of the evaluated rows, and metrics beyond `evaluate`'s."""

    y_true: np.ndarray
    y_pred: np.ndarray
    scores: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


def train(config: TrainConfig) -> Classifier:
    """Train, evaluate and save a classifier as `config` says; the job behind `fc7 train`.

    Writes `model.skops`, `manifest.json`, `metrics.json`, `report.md` and
    `confusion_matrix.png` into `config.out`, and for int8 embeddings their int8 model
    (`int8-<sha256>.onnx`, from the cache or the extraction output's `_plan/`).

    Returns:
        The fitted `Classifier`, its `metrics` set.

    Raises:
        ConfigError: no labels, fewer than 2 usable classes, incompatible options, a label
            column that does not exist, or data too large for the chosen classifier.
        ArtifactError: unreadable, damaged or empty embeddings, a vector no AlexNet layer
            produces (NaN, infinite, negative; the message names the file and row), or int8
            embeddings whose model is neither in the cache nor beside them.
        ProvenanceMismatch: `--test` embeddings made with different features.
        OutputError: `config.out` already holds a classifier (pass --overwrite), or is not
            empty and not a classifier folder (see `check_classifier_out`).

    Example:
        >>> model = train(TrainConfig(embeddings="out/emb", out="out/clf", cv=5))  # doctest: +SKIP
    """
    out = Path(config.out)
    check_classifier_out(out, config.overwrite)
    data = EmbeddingDataset.open(config.embeddings)
    test_data = EmbeddingDataset.open(config.test) if config.test else None
    if test_data is not None:
        data.provenance.require_compatible(
            test_data.provenance, mine=f"embeddings {data.uri}", theirs=f"--test {test_data.uri}"
        )
        require_label_column(test_data, config.label_column)
    # Before fitting, so that a missing model fails at once.
    int8_model = int8_model_for(data.provenance, (plan_folder(data.uri),))
    protocol = evaluation_protocol(config, test_data)
    fit = _train_streaming if config.classifier == "sgd" else _train_in_memory
    model, classes, evaluation, counts = fit(config, data, test_data, protocol)
    metrics = evaluate(
        evaluation.y_true, evaluation.y_pred, evaluation.scores, classes, config.top_k
    )
    metrics.update(evaluation.extra)
    metrics["protocol"] = protocol
    metrics["counts"] = counts
    metrics["classifier"] = config.classifier
    metrics["score_kind"] = score_kind(model)
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
    classifier.save(out, training, int8_model=int8_model)
    write_report(out, metrics, classes)
    return classifier


def evaluation_protocol(
    config: TrainConfig, test_data: EmbeddingDataset | None
) -> dict[str, Any]:
    """How `config` evaluates, as `metrics.json` records it under "protocol"."""
    if test_data is not None:
        protocol: dict[str, Any] = {"kind": "separate-test-set", "test": test_data.uri}
    elif config.cv:
        protocol = {
            "kind": "stratified-kfold",
            "folds": config.cv,
            "seed": config.seed,
            "final_model": "refit on all labelled rows",
        }
    else:
        protocol = {
            "kind": "stratified-holdout",
            "test_size": config.test_size,
            "seed": config.seed,
            "final_model": "trained on the training split",
        }
    if config.classifier == "sgd":
        protocol.update(out_of_core=True, epochs=config.epochs)
    return protocol


def holdout_split(config: TrainConfig, rows: np.ndarray, y: np.ndarray, classes: int) -> list:
    """A stratified train/test split of `rows` (vectors or ids) and `y`:
    `[rows_train, rows_test, y_train, y_test]`.

    Raises:
        ConfigError: some class cannot have a row on both sides.
    """
    try:
        return train_test_split(
            rows, y, test_size=config.test_size, stratify=y, random_state=config.seed
        )
    except ValueError as err:
        raise ConfigError(
            f"--test-size {config.test_size}: cannot split {len(y)} rows of {classes} classes "
            f"with one of each class on both sides ({err}); change --test-size, add rows, or "
            f"use --cv"
        ) from None


def _train_in_memory(
    config: TrainConfig,
    data: EmbeddingDataset,
    test_data: EmbeddingDataset | None,
    protocol: dict[str, Any],
) -> tuple[Pipeline, list[str], Evaluation, dict[str, Any]]:
    rows = training_rows(data, config.label_column, config.batch_size, protocol)
    x, y, classes, counts = rows.vectors, rows.y, rows.classes, rows.counts
    if config.pca and config.pca > min(x.shape):
        raise ConfigError(
            f"--pca {config.pca}: must not exceed the rows ({x.shape[0]}) or dims ({x.shape[1]})"
        )
    estimator = with_search(config, build_pipeline(config), int(np.bincount(y).min()))
    if config.cv:
        folds = StratifiedKFold(config.cv, shuffle=True, random_state=config.seed)
        # One fit per fold gives both: every classifier here predicts the argmax of these
        # scores (probabilities or margins), the class codes being the score columns.
        raw = cross_val_predict(estimator, x, y, cv=folds, method=score_method(estimator))
        scores = as_class_columns(raw)
        y_pred = scores.argmax(axis=1)
        fold_accuracy = [
            float(np.mean(y_pred[test] == y[test])) for _, test in folds.split(x, y)
        ]
        model = estimator.fit(x, y)
        evaluation = Evaluation(
            y,
            y_pred,
            scores,
            {
                "fold_accuracy": fold_accuracy,
                "fold_accuracy_mean": float(np.mean(fold_accuracy)),
                "fold_accuracy_std": float(np.std(fold_accuracy)),
            },
        )
        counts.update(train=len(y), test=len(y))
    else:
        if test_data is not None:
            x_train, y_train = x, y
            test = read_test_set(test_data, config.label_column, config.batch_size, rows.encoder)
            x_test, y_test = test.vectors, test.y
            counts.update(test.counts)
        else:
            x_train, x_test, y_train, y_test = holdout_split(config, x, y, len(classes))
        if config.classifier == "knn" and not config.search and config.neighbors > len(y_train):
            raise ConfigError(
                f"--neighbors {config.neighbors}: more than the {len(y_train)} training rows"
            )
        model = estimator.fit(x_train, y_train)
        y_pred = np.asarray(model.predict(x_test), dtype=int)
        scores = class_scores(model, x_test, len(classes))[0]
        evaluation = Evaluation(y_test, y_pred, scores, {"leaks": leaks(x_train, x_test)})
        counts.update(train=len(y_train), test=len(y_test))
    if config.search:
        evaluation.extra["search"] = search_summary(model)
        model = model.best_estimator_
    return model, classes, evaluation, counts


def leaks(x_train: np.ndarray, x_test: np.ndarray) -> dict[str, Any]:
    """How many test rows repeat a training row (a near-duplicate: cosine similarity at or
    above `NEAR_DUPLICATE_COSINE`), which makes the test accuracy optimistic."""
    similarity, _ = nearest_in(x_test, x_train)
    return {
        "threshold": NEAR_DUPLICATE_COSINE,
        "test_rows_repeating_train": int((similarity >= np.float32(NEAR_DUPLICATE_COSINE)).sum()),
    }


def _train_streaming(
    config: TrainConfig,
    data: EmbeddingDataset,
    test_data: EmbeddingDataset | None,
    protocol: dict[str, Any],
) -> tuple[Pipeline, list[str], Evaluation, dict[str, Any]]:
    """`sgd`: one pass for the labels, one for IncrementalPCA, `epochs` for partial_fit."""
    # Labels and ids only (small), to fix classes, weights and the held-out split.
    rows = training_rows(
        data, config.label_column, config.batch_size, protocol, with_vectors=False
    )
    classes, counts, encoder = rows.classes, rows.counts, rows.encoder
    if test_data is None:
        train_ids, test_ids, y_train, _ = holdout_split(config, rows.ids, rows.y, len(classes))
    else:
        train_ids, test_ids, y_train = rows.ids, None, rows.y
    weights = balanced_class_weights(y_train) if config.class_weight else None
    model = build_pipeline(config, class_weight=weights)
    steps = [step for _, step in model.steps]
    rng = np.random.default_rng(config.seed)
    train_set = pa.array(list(train_ids), pa.string())

    def train_batches():
        for batch in encoded_batches(
            data, config.label_column, encoder, config.batch_size, train_set, rng,
            config.shuffle_buffer,
        ):
            if len(batch.y):
                yield batch.vectors, batch.y

    def transform(x: np.ndarray, upto: int) -> np.ndarray:
        for step in steps[:upto]:
            x = step.transform(x)
        return x

    if config.pca:
        if config.pca > min(len(y_train), data.provenance.dim):
            raise ConfigError(f"--pca {config.pca}: more than the {len(y_train)} training rows")
        _fit_incremental_pca(config, steps, train_batches(), transform)
    codes = np.arange(len(classes))
    for _ in range(config.epochs):
        for x, y in train_batches():
            steps[-1].partial_fit(transform(x, len(steps) - 1), y, classes=codes)

    # Evaluation: stream the held-out rows (or the --test set) through the fitted pipeline.
    source = test_data or data
    test_set = pa.array(list(test_ids), pa.string()) if test_ids is not None else None
    y_true, y_pred, scores = [], [], []
    unlabelled = unknown = 0
    for batch in encoded_batches(source, config.label_column, encoder, config.batch_size,
                                 test_set):
        unlabelled += batch.unlabelled
        unknown += batch.unknown
        if not len(batch.y):
            continue
        y_true.append(batch.y)
        y_pred.append(np.asarray(model.predict(batch.vectors), dtype=int))
        scores.append(class_scores(model, batch.vectors, len(classes))[0])
    if not y_true:
        raise ConfigError(f"{source.uri}: no labelled test rows of a known class")
    if test_data is not None:
        errors = test_data.count(with_errors=True) - test_data.count()
        counts.update(skipped_test_rows(errors, unlabelled, unknown))
    counts.update(train=len(y_train), test=int(sum(len(part) for part in y_true)))
    evaluation = Evaluation(np.concatenate(y_true), np.concatenate(y_pred), np.concatenate(scores))
    return model, classes, evaluation, counts


def _fit_incremental_pca(config: TrainConfig, steps: list[Any], batches, transform) -> None:
    """Fit the IncrementalPCA step in chunks of at least `--pca` rows."""
    pca_index = len(steps) - 2
    pending: list[np.ndarray] = []
    fitted_any = False
    for x, _ in batches:
        pending.append(transform(x, pca_index))
        if sum(len(p) for p in pending) >= max(config.batch_size, config.pca):
            steps[pca_index].partial_fit(np.concatenate(pending))
            pending, fitted_any = [], True
    rest = np.concatenate(pending) if pending else np.zeros((0, 1))
    # IncrementalPCA needs at least n_components rows per call; a short tail after other
    # chunks is left out of the PCA estimate (it still trains the classifier).
    if len(rest) >= config.pca or not fitted_any:
        steps[pca_index].partial_fit(rest)
