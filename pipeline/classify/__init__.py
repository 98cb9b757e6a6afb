"""Classifiers on embeddings: train and evaluate scikit-learn pipelines, save, load, predict.

A classifier is a scikit-learn `Pipeline` (`Normalizer` -> optional `PCA` -> estimator) fitted
on integer-coded labels. Every classifier except `sgd` trains on all rows in memory and refuses,
with the numbers, data that will not fit; `sgd` streams the Parquet with `partial_fit` (and
`IncrementalPCA`) instead.

Modules, in the order training uses them:

    config      TrainConfig, PredictConfig: the options of `fc7 train` and `fc7 predict`
    estimators  build_pipeline (the estimator for a config), the --search grid, balanced class
                weights, the scores of a fitted pipeline
    data        the one labelled-data pass of both training paths: label filtering, classes
                too small for the protocol, LabelEncoder, the counts; streaming batches
    train       train: in memory (hold-out, cross_val_predict, --test) or streaming (sgd)
    report      metrics, summary text, metrics.json, report.md, the confusion-matrix PNG
    artifact    Classifier (predict, skops save and verified load), the folder's manifest and
                files, check_classifier_out
    predict     predictions Parquet (schema, predict_dataset) and labelling image files

Example:
    >>> model = train(TrainConfig(embeddings="out/emb", out="out/clf"))  # doctest: +SKIP
    >>> Classifier.load("out/clf").predict_proba_top(vectors, k=3)       # doctest: +SKIP
"""

from pipeline.classify.artifact import (
    CLASSIFIER_FILES,
    CONFUSION_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    REPORT_FILE,
    SCHEMA_VERSION,
    TRUSTED_TYPES,
    Classifier,
    check_classifier_out,
    is_classifier_file,
)
from pipeline.classify.config import CLASSIFIERS, PredictConfig, TrainConfig
from pipeline.classify.data import check_fits_in_memory, read_labelled, training_rows
from pipeline.classify.estimators import build_pipeline, class_scores, top_k
from pipeline.classify.predict import (
    PREDICTIONS_METADATA_KEY,
    ImagePrediction,
    predict_dataset,
    predict_image_files,
    predictions_schema,
)
from pipeline.classify.report import evaluate, left_out_note, summary_text, write_report
from pipeline.classify.train import train

__all__ = [
    "CLASSIFIERS",
    "CLASSIFIER_FILES",
    "CONFUSION_FILE",
    "MANIFEST_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "PREDICTIONS_METADATA_KEY",
    "REPORT_FILE",
    "SCHEMA_VERSION",
    "TRUSTED_TYPES",
    "Classifier",
    "ImagePrediction",
    "PredictConfig",
    "TrainConfig",
    "build_pipeline",
    "check_classifier_out",
    "check_fits_in_memory",
    "class_scores",
    "evaluate",
    "is_classifier_file",
    "left_out_note",
    "predict_dataset",
    "predict_image_files",
    "predictions_schema",
    "read_labelled",
    "summary_text",
    "top_k",
    "train",
    "training_rows",
    "write_report",
]
