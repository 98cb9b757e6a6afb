"""`fc7 train`: train and evaluate a scikit-learn classifier on labelled embeddings.

fc7 train out/embeddings --out out/classifier --classifier logreg --cv 5
python jobs/train_classifier.py --config configs/train.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `ray job submit` and python

from pipeline.classify import CLASSIFIERS, TrainConfig, summary_text, train  # noqa: E402
from pipeline.cli import run  # noqa: E402
from pipeline.config import add_option, load_config, new_parser  # noqa: E402

EPILOG = """examples:
  fc7 train out/embeddings --out out/clf
  fc7 train out/embeddings --out out/clf --classifier linear-svm --cv 5 --search
  fc7 train out/train --test out/test --out out/clf --pca 256 --class-weight balanced
  fc7 train huge/embeddings --out out/clf --classifier sgd --epochs 3   # out-of-core
"""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "fc7 train", "Train and evaluate a classifier on labelled embeddings.", EPILOG
    )
    parser.add_argument(
        "embeddings",
        nargs="?",
        metavar="EMBEDDINGS",
        help="extraction output (folder or URI of part-*.parquet) with a label column",
    )

    def option(flag: str, text: str, **kwargs) -> None:
        add_option(parser, flag, TrainConfig, text, **kwargs)

    parser.add_argument(
        "--out",
        metavar="MODEL_DIR",
        help="folder for the classifier, metrics and report (required; default: none)",
    )
    option(
        "--classifier",
        f"one of {', '.join(CLASSIFIERS)}; sgd trains out-of-core with partial_fit",
    )
    option("--label-column", "column holding the class names")
    option(
        "--normalize",
        "L2-normalise vectors first (--no-normalize: off)",
        action=argparse.BooleanOptionalAction,
    )
    option("--pca", "reduce to this many dimensions with PCA", type=int, metavar="D")
    option("--test-size", "share of rows held out (stratified) for evaluation", type=float)
    option(
        "--test",
        "a separate labelled extraction output to evaluate on",
        metavar="EMBEDDINGS",
    )
    option(
        "--cv",
        "evaluate by stratified K-fold cross-validation, then refit on all rows",
        type=int,
        metavar="K",
    )
    option(
        "--search",
        "pick C / k / alpha by cross-validated grid search",
        action="store_true",
    )
    option("--class-weight", "'balanced' weighs classes inversely to their size")
    option("--C", "inverse regularisation of logreg and linear-svm", type=float)
    option("--alpha", "L2 penalty of sgd and mlp", type=float)
    option("--neighbors", "k of knn", type=int)
    option("--hidden", "hidden units of mlp", type=int)
    option("--epochs", "passes over the data for sgd", type=int)
    option("--shuffle-buffer", "rows shuffled together for sgd", type=int)
    option("--batch-size", "rows per Parquet batch read", type=int)
    option("--top-k", "k of the top-k accuracy", type=int)
    option("--seed", "seed of splits and estimators", type=int)
    option(
        "--overwrite",
        "replace the classifier in --out (only fc7's own files there)",
        action="store_true",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    config = load_config(TrainConfig, build_parser().parse_args(argv))
    classifier = train(config)
    print(summary_text(classifier.metrics))
    print(
        f"wrote {config.out}: model.skops, manifest.json, metrics.json, report.md, "
        "confusion_matrix.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run("train", main, None))
