"""`fc7 train`: train and evaluate a scikit-learn classifier on labelled embeddings.

fc7 train out/embeddings --out out/classifier --classifier logreg --cv 5
python jobs/train_classifier.py --config configs/train.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `ray job submit` and python

from jobs import run  # noqa: E402
from pipeline.classify import TrainConfig, left_out_note, summary_text, train  # noqa: E402
from pipeline.config import parse_config  # noqa: E402

EPILOG = """examples:
  fc7 train out/embeddings --out out/clf
  fc7 train out/embeddings --out out/clf --classifier linear-svm --cv 5 --search
  fc7 train out/train --test out/test --out out/clf --pca 256 --class-weight balanced
  fc7 train huge/embeddings --out out/clf --classifier sgd --epochs 3   # out-of-core
"""


def main(argv: list[str] | None = None) -> int:
    config = parse_config(
        TrainConfig, argv, "fc7 train", "Train and evaluate a classifier on labelled embeddings.",
        EPILOG,
    )
    classifier = train(config)
    note = left_out_note(classifier.metrics)
    if note:
        print(note)
    print(summary_text(classifier.metrics))
    print(
        f"wrote {config.out}: model.skops, manifest.json, metrics.json, report.md, "
        "confusion_matrix.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run("train", main, None))
