"""The evaluation of a classifier: metrics, the summary text, `metrics.json`, `report.md` and the
confusion-matrix PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.classify.artifact import (
    CONFUSION_FILE,
    METRICS_FILE,
    REPORT_FILE,
    write_json,
    write_text,
)
from pipeline.classify.data import describe_small_classes
from pipeline.errors import OutputError


def evaluate(
    y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray, classes: list[str], k: int = 5
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, top-k accuracy and per-class P/R/F1/support.

    Top-k accuracy is null when there are no more than k classes (it would be 1 trivially).

    Args:
        y_true, y_pred: class codes (indices into `classes`).
        scores: (rows, classes) scores, higher is better.
        classes: the class names.
        k: the k of the top-k accuracy.

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


def left_out_note(metrics: dict[str, Any]) -> str | None:
    """The note on classes too small for the evaluation protocol, or None when there were none.

    Example:
        >>> note = left_out_note({"counts": {"small_classes": {"owl": 1}},
        ...                       "protocol": {"kind": "stratified-holdout"}})
        >>> note.startswith("note: 1 class(es) have fewer than 2 labelled rows")
        True
    """
    small = metrics["counts"].get("small_classes")
    if not small:
        return None
    problem, listed = describe_small_classes(small, metrics["protocol"])
    return f"note: {problem}, and are left out of training: {listed}"


def summary_text(metrics: dict[str, Any]) -> str:
    """The few lines `fc7 train` prints at the end (and report.md starts with)."""
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
    repeats = metrics.get("leaks", {}).get("test_rows_repeating_train", 0)
    if repeats:
        lines.append(
            f"warning: {repeats} evaluated images repeat a training image (cosine similarity "
            f">= {metrics['leaks']['threshold']}): the accuracy is optimistic; fc7 audit "
            f"--test lists them"
        )
    return "\n".join(lines)


def write_report(folder: Path, metrics: dict[str, Any], classes: list[str]) -> None:
    """Write metrics.json, report.md and the confusion-matrix PNG into `folder`.

    Raises:
        OutputError: `folder` cannot be written.
    """
    write_json(folder / METRICS_FILE, metrics)
    _plot_confusion(np.asarray(metrics["confusion_matrix"]), classes, folder / CONFUSION_FILE)
    worst = sorted(metrics["per_class"].items(), key=lambda item: item[1]["f1"])[:10]
    table = "\n".join(
        f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        for name, m in worst
    )
    write_text(
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
    temporary = path.with_name(f".{path.name}.tmp")  # see write_text
    try:
        figure.savefig(temporary, dpi=100, format="png")
        os.replace(temporary, path)
    except OSError as err:
        raise OutputError(f"--out {path.parent}: cannot write {path.name}: {err}") from err
    finally:
        plt.close(figure)
