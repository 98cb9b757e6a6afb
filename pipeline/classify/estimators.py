"""The scikit-learn side of a classifier: the pipeline a config asks for, the grid of `--search`,
balanced class weights, and the score a fitted pipeline gives every class.

A classifier is a `Pipeline` (`Normalizer` -> optional `PCA` -> estimator) fitted on integer
class codes `0..n-1` (see `pipeline.classify.data`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.decomposition import PCA, IncrementalPCA
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import LinearSVC
from sklearn.utils.class_weight import compute_class_weight

from pipeline.classify.config import TrainConfig

# Small grids for --search: the one parameter that matters most for each classifier.
SEARCH_GRIDS: dict[str, dict[str, list[Any]]] = {
    "logreg": {"C": [0.01, 0.1, 1.0, 10.0]},
    "linear-svm": {"C": [0.01, 0.1, 1.0, 10.0]},
    "knn": {"n_neighbors": [1, 3, 5, 10, 20]},
    "mlp": {"alpha": [1e-4, 1e-3, 1e-2]},
}


def build_pipeline(config: TrainConfig, class_weight: dict[int, float] | None = None) -> Pipeline:
    """The unfitted scikit-learn pipeline for `config`: Normalizer, PCA, estimator.

    Args:
        config: the training options (classifier, normalize, pca, C, alpha, ...).
        class_weight: explicit weights per class code; `sgd` needs them because `partial_fit`
            cannot compute "balanced" itself (see `balanced_class_weights`).

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


def with_search(config: TrainConfig, pipeline: Pipeline, rows_per_class: int) -> Any:
    """`pipeline` itself, or a `GridSearchCV` over its key parameter when `--search`.

    Args:
        config: the training options (classifier, search, cv, seed).
        pipeline: from `build_pipeline`.
        rows_per_class: rows of the smallest class, which bounds the k of a k-NN.

    Returns:
        `pipeline`, or an unfitted `GridSearchCV` (stratified folds: `--cv`, else 3).
    """
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


def search_summary(search: GridSearchCV) -> dict[str, Any]:
    """What a fitted grid search found: the best parameter and every candidate's accuracy."""
    return {
        "best_params": {key.split("__", 1)[1]: value for key, value in search.best_params_.items()},
        "mean_cv_accuracy": {
            str(params): float(score)
            for params, score in zip(
                search.cv_results_["params"], search.cv_results_["mean_test_score"], strict=True
            )
        },
    }


def balanced_class_weights(y: np.ndarray) -> dict[int, np.float64]:
    """scikit-learn's "balanced" weights of the classes present in `y`, as `partial_fit` needs
    them: `rows / (classes * rows of the class)`.

    Example:
        >>> {code: float(w) for code, w in balanced_class_weights(np.array([0, 0, 0, 1])).items()}
        {0: 0.6666666666666666, 1: 2.0}
    """
    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    # int keys, numpy float64 weights: the types fc7 has always saved (skops stores them as is)
    return {int(code): weight for code, weight in zip(present, weights, strict=True)}


def score_kind(model: Any) -> str:
    """What a model's scores are: "probability" when it has `predict_proba`, else
    "decision_function"."""
    return "probability" if hasattr(model, "predict_proba") else "decision_function"


def score_method(model: Any) -> str:
    """The method giving `model`'s scores: `predict_proba` or `decision_function`."""
    return "predict_proba" if score_kind(model) == "probability" else "decision_function"


def as_class_columns(raw: np.ndarray) -> np.ndarray:
    """Scores from `score_method` with one column per class (a binary margin, positive for
    the second class, becomes two columns), as float64."""
    raw = np.asarray(raw, dtype=np.float64)
    return np.column_stack([-raw, raw]) if raw.ndim == 1 else raw


def class_scores(model: Any, x: np.ndarray, n_classes: int) -> tuple[np.ndarray, str]:
    """Scores of every class for every row: probabilities when the model has them.

    A class the model never saw scores 0 (probabilities) or -inf (decision function).

    Returns:
        (array (rows, n_classes), "probability" or "decision_function").
    """
    kind = score_kind(model)
    raw = as_class_columns(getattr(model, score_method(model))(x))
    scores = np.full((len(x), n_classes), -np.inf if kind != "probability" else 0.0)
    scores[:, np.asarray(model.classes_, dtype=int)] = raw
    return scores, kind


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the `k` best classes per row, best first (stable for ties).

    Example:
        >>> top_k(np.array([[0.2, 0.5, 0.3]]), 2)
        (array([[1, 2]]), array([[0.5, 0.3]]))
    """
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)
