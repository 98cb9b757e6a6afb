"""The options of `fc7 train` and `fc7 predict`: one validated model each, also the command line."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import model_validator

from pipeline.config import Device, JobConfig, option

ClassifierName = Literal["logreg", "linear-svm", "knn", "sgd", "mlp"]
CLASSIFIERS: tuple[str, ...] = get_args(ClassifierName)


class TrainConfig(JobConfig):
    """Options of `fc7 train` (and `jobs/train_classifier.py`, `configs/train.yaml`)."""

    embeddings: str = option(
        help="extraction output (folder or URI of part-*.parquet) with a label column",
        positional=True,
        metavar="EMBEDDINGS",
    )
    out: str = option(help="folder for the classifier, metrics and report", metavar="MODEL_DIR")
    classifier: ClassifierName = option(
        "logreg", "sgd trains out-of-core with partial_fit; the others in memory"
    )
    label_column: str = option("label", "column holding the class names")
    normalize: bool = option(True, "L2-normalise vectors first")
    pca: int | None = option(None, "reduce to this many dimensions with PCA", metavar="D", ge=1)
    test_size: float = option(
        0.2, "share of rows held out (stratified) for evaluation", metavar="SHARE", gt=0, lt=1
    )
    test: str | None = option(
        None, "a separate labelled extraction output to evaluate on", metavar="EMBEDDINGS"
    )
    cv: int | None = option(
        None,
        "evaluate by stratified K-fold cross-validation, then refit on all rows",
        metavar="K",
        ge=2,
    )
    search: bool = option(False, "pick C / k / alpha by cross-validated grid search")
    class_weight: Literal["balanced"] | None = option(
        None, "weigh classes inversely to their size (not knn, mlp)"
    )
    C: float = option(1.0, "inverse regularisation of logreg and linear-svm", gt=0)
    alpha: float = option(1e-4, "L2 penalty of sgd and mlp", gt=0)
    neighbors: int = option(10, "k of knn", metavar="K", ge=1)
    hidden: int = option(512, "hidden units of mlp", metavar="N", ge=1)
    epochs: int = option(5, "passes over the data for sgd", metavar="N", ge=1)
    shuffle_buffer: int = option(
        20_000, "rows shuffled together for sgd (outputs are often class-sorted)", metavar="N",
        ge=1,
    )
    batch_size: int = option(8192, "rows per Parquet batch read", metavar="N", ge=1)
    top_k: int = option(5, "k of the top-k accuracy", metavar="K", ge=1)
    seed: int = option(0, "seed of splits and estimators")
    overwrite: bool = option(
        False, "replace the classifier in --out (only fc7's own files there)"
    )

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
    """Options of `fc7 predict` (and `jobs/predict.py`)."""

    model_dir: str = option(help="folder written by fc7 train or fc7 finetune", positional=True,
                            metavar="MODEL_DIR")
    embeddings: str | None = option(
        None, "extraction output to label (or use --image)", positional=True,
        metavar="EMBEDDINGS",
    )
    out: str | None = option(None, "folder for the predictions Parquet", metavar="PRED_DIR")
    image: list[str] = option(
        [], "image files to embed with the recorded model and label", metavar="PATH"
    )
    top_k: int = option(5, "best labels kept per row", metavar="K", ge=1)
    batch_size: int = option(8192, "rows per Parquet batch", metavar="N", ge=1)
    device: Device = option("auto", "for --image: auto (CUDA if any), cpu or cuda (gpu is an "
                            "alias)")
    overwrite: bool = option(
        False, "replace the predictions in --out (deletes only fc7 prediction parts)"
    )

    @model_validator(mode="after")
    def _one_input(self) -> PredictConfig:
        if bool(self.image) == bool(self.embeddings):
            raise ValueError("give either EMBEDDINGS (with --out) or --image PATH..., not both")
        if self.embeddings and not self.out:
            raise ValueError("--out PRED_DIR is required with EMBEDDINGS")
        return self
