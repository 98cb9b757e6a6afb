"""Classifiers: training on generated embeddings with known accuracy, an end-to-end run on real
AlexNet output checked against an independent scikit-learn fit, save/load safety, errors."""

from __future__ import annotations

import json
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import skops.io as sio
from conftest import (
    REPO,
    clustered_vectors,
    test_provenance,
    write_embeddings,
    write_labelled_folder,
)
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import LinearSVC

from jobs.predict import main as predict_main
from jobs.train_classifier import main as train_main
from pipeline import cli
from pipeline.classify import (
    MANIFEST_FILE,
    MODEL_FILE,
    Classifier,
    TrainConfig,
    check_fits_in_memory,
    train,
)
from pipeline.config import load_config
from pipeline.errors import ArtifactError, ConfigError, OutputError, ProvenanceMismatch
from pipeline.store import build_table, resolve, write_table_atomically

DIM = 32


def names(labels: np.ndarray) -> list[str]:
    return [f"class {value}" for value in labels]


@pytest.fixture
def separable(tmp_path: Path) -> Path:
    """400 rows of 8 well-separated clusters, in 3 part files."""
    x, y = clustered_vectors(400, DIM, clusters=8, spread=0.2, seed=1)
    return write_embeddings(tmp_path / "emb", x, names(y), shards=3)


def read_predictions(folder: Path) -> dict:
    return pq.read_table(folder).to_pydict()


@pytest.mark.parametrize("classifier", ["logreg", "linear-svm", "knn", "sgd", "mlp"])
def test_every_classifier_separates_separable_clusters(separable, tmp_path, classifier):
    extra = {"knn": {"neighbors": 3}, "mlp": {"hidden": 32}}.get(classifier, {})
    model = train(
        TrainConfig(
            embeddings=str(separable),
            out=str(tmp_path / "m"),
            classifier=classifier,
            pca=16,
            **extra,
        )
    )
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["accuracy"] == 1.0
    assert metrics["counts"]["train"] + metrics["counts"]["test"] == 400
    assert metrics["counts"]["test"] == 80  # 20% stratified hold-out
    assert sum(c["support"] for c in metrics["per_class"].values()) == 80
    assert metrics["top5_accuracy"] == 1.0
    assert model.classes == [f"class {i}" for i in range(8)]
    for name in ("report.md", "confusion_matrix.png", MODEL_FILE, MANIFEST_FILE):
        assert (tmp_path / "m" / name).stat().st_size > 0
    assert (tmp_path / "m" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_known_accuracy_on_a_separate_test_set_with_wrong_labels(tmp_path):
    x, y = clustered_vectors(300, DIM, clusters=3, spread=0.2, seed=2)
    train_dir = write_embeddings(tmp_path / "train", x, names(y))
    x_test, y_test = clustered_vectors(100, DIM, clusters=3, spread=0.2, seed=2)
    # the same centres (same seed), so the classifier is right on every vector; 10 rows of
    # class 0 are labelled class 1, so exactly those 10 are counted wrong
    wrong = np.flatnonzero(y_test == 0)[:10]
    labels = names(y_test)
    for i in wrong:
        labels[i] = "class 1"
    labels[int(np.flatnonzero(y_test == 2)[0])] = "a class never trained"
    test_dir = write_embeddings(tmp_path / "test", x_test, labels)
    train(TrainConfig(embeddings=str(train_dir), out=str(tmp_path / "m"), test=str(test_dir)))
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["counts"]["test"] == 99
    assert metrics["counts"]["test_skipped_unknown_class"] == 1
    assert metrics["accuracy"] == pytest.approx(89 / 99)
    n0, n1 = np.sum(y_test == 0), np.sum(y_test == 1)
    per_class = metrics["per_class"]
    assert per_class["class 0"]["precision"] == pytest.approx((n0 - 10) / n0)
    assert per_class["class 0"]["recall"] == 1.0  # nothing labelled 0 was missed
    assert per_class["class 1"]["recall"] == pytest.approx(n1 / (n1 + 10))
    assert per_class["class 1"]["support"] == n1 + 10
    assert metrics["top5_accuracy"] is None  # 3 classes: top-5 would be trivially 1
    assert metrics["protocol"]["kind"] == "separate-test-set"


def test_skipped_rows_and_small_classes_are_counted_not_fatal(tmp_path, capsys):
    x, y = clustered_vectors(120, DIM, clusters=3, spread=0.2, seed=3)
    labels: list[str | None] = names(y)
    errors: list[str | None] = [None] * 120
    labels[0] = None
    labels[1] = "   "
    errors[2] = "not an image: unknown format"
    labels[3] = "lonely"  # one row: cannot be both trained on and tested
    folder = write_embeddings(tmp_path / "emb", x, labels, errors=errors)
    code = train_main([str(folder), "--out", str(tmp_path / "m")])
    assert code == 0
    counts = json.loads((tmp_path / "m" / "metrics.json").read_text())["counts"]
    assert counts["rows"] == 120
    assert counts["skipped_error"] == 1
    assert counts["skipped_no_label"] == 2
    assert counts["small_classes"] == {"lonely": 1}
    assert counts["train"] + counts["test"] == 116
    out = capsys.readouterr().out
    assert "lonely (1)" in out and "1 with an error, 2 without a label" in out


def test_cross_validation_matches_an_independent_sklearn_run(tmp_path):
    x, y = clustered_vectors(150, DIM, clusters=3, spread=3.0, seed=4)  # overlapping clusters
    folder = write_embeddings(tmp_path / "emb", x, names(y), shards=2)
    model = train(TrainConfig(embeddings=str(folder), out=str(tmp_path / "m"), cv=5, seed=7))
    reference = make_pipeline(Normalizer(), LogisticRegression(max_iter=1000, random_state=7))
    folds = StratifiedKFold(5, shuffle=True, random_state=7)
    expected = cross_val_predict(reference, x, y, cv=folds)
    assert 0.5 < np.mean(expected == y) < 1.0  # a non-trivial problem
    assert model.metrics["accuracy"] == pytest.approx(np.mean(expected == y))
    assert model.metrics["confusion_matrix"] == confusion_matrix(y, expected).tolist()
    assert len(model.metrics["fold_accuracy"]) == 5
    # the saved model is refit on all rows
    reference.fit(x, y)
    np.testing.assert_allclose(
        np.array([[p for _, p in row] for row in model.predict_proba_top(x, k=3)]),
        -np.sort(-reference.predict_proba(x), axis=1),
        atol=1e-5,
    )


def test_search_picks_a_parameter_from_the_grid(separable, tmp_path):
    model = train(
        TrainConfig(
            embeddings=str(separable), out=str(tmp_path / "m"), classifier="knn", search=True, cv=3
        )
    )
    best = model.metrics["search"]["best_params"]["n_neighbors"]
    assert best in (1, 3, 5, 10, 20)
    assert model.model.steps[-1][1].n_neighbors == best


def test_sgd_streams_class_sorted_batches(tmp_path):
    x, y = clustered_vectors(600, DIM, clusters=4, spread=0.2, seed=5)
    order = np.argsort(y, kind="stable")  # class-sorted, as folder extraction writes it
    folder = write_embeddings(tmp_path / "emb", x[order], names(y[order]), shards=4)
    model = train(
        TrainConfig(
            embeddings=str(folder),
            out=str(tmp_path / "m"),
            classifier="sgd",
            batch_size=40,
            shuffle_buffer=150,
            pca=8,
            class_weight="balanced",
        )
    )
    assert model.metrics["protocol"]["out_of_core"] is True
    assert model.metrics["accuracy"] >= 0.97
    assert model.metrics["counts"]["test"] == 120


def test_end_to_end_on_alexnet_output_matches_independent_sklearn(tmp_path, capsys):
    from pipeline.model import Embedder, load_weights

    images = write_labelled_folder(tmp_path / "images", classes=3, per_class=6)
    (images / "class_0" / "notes.jpg").write_bytes(b"not a picture")
    files = sorted(images.rglob("*.jpg"))
    embedder = Embedder(load_weights("random:0"), layer="fc7", device="cpu")
    vectors, errors = embedder.embed_bytes([file.read_bytes() for file in files])
    provenance = embedder.provenance.stamped()
    table = build_table(
        provenance,
        [str(f.relative_to(images)) for f in files],
        [str(f) for f in files],
        [f.parent.name for f in files],
        vectors,
        errors,
    )
    fs, base = resolve(str(tmp_path / "emb"))
    fs.create_dir(base)
    write_table_atomically(table, fs, f"{base}/part-00000.parquet")

    assert (
        train_main(
            [
                str(tmp_path / "emb"),
                "--out",
                str(tmp_path / "m"),
                "--classifier",
                "linear-svm",
                "--test-size",
                "0.5",
                "--C",
                "10",
            ]
        )
        == 0
    )
    assert (
        predict_main(
            [
                str(tmp_path / "m"),
                str(tmp_path / "emb"),
                "--out",
                str(tmp_path / "pred"),
                "--top-k",
                "2",
            ]
        )
        == 0
    )

    ok = [i for i, error in enumerate(errors) if error is None]
    x, labels = vectors[ok], np.array([files[i].parent.name for i in ok])
    y = np.searchsorted(["class_0", "class_1", "class_2"], labels)
    x_train, _, y_train, _ = train_test_split(x, y, test_size=0.5, stratify=y, random_state=0)
    reference = make_pipeline(Normalizer(), LinearSVC(C=10, random_state=0)).fit(x_train, y_train)
    expected_margin = reference.decision_function(x)

    predictions = read_predictions(tmp_path / "pred")
    assert len(predictions["id"]) == len(files)
    bad = predictions["id"].index("class_0/notes.jpg")
    assert predictions["prediction"][bad] is None and "not an image" in predictions["error"][bad]
    got = [i for i in range(len(files)) if i != bad]
    expected_labels = np.array(["class_0", "class_1", "class_2"])[reference.predict(x)]
    assert [predictions["prediction"][i] for i in got] == expected_labels.tolist()
    np.testing.assert_allclose(
        [predictions["score"][i] for i in got], expected_margin.max(axis=1), atol=1e-4
    )
    assert all(len(predictions["top_labels"][i]) == 2 for i in got)
    metadata = pq.read_schema(next((tmp_path / "pred").glob("part-*.parquet"))).metadata
    assert json.loads(metadata[b"fc7.classifier"])["score_kind"] == "decision_function"
    assert json.loads(metadata[b"fc7.provenance"])["weights_sha256"] == provenance.weights_sha256

    capsys.readouterr()
    query = [str(files[ok[0]]), str(files[ok[-1]])]
    assert predict_main([str(tmp_path / "m"), "--image", *query, "--device", "cpu"]) == 0
    printed = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]
    assert printed == [expected_labels[0], expected_labels[-1]]


def test_predict_refuses_embeddings_from_other_features(separable, tmp_path):
    train(TrainConfig(embeddings=str(separable), out=str(tmp_path / "m")))
    x, y = clustered_vectors(20, DIM, clusters=2, seed=6)
    other = write_embeddings(
        tmp_path / "fc6", x, names(y), provenance=test_provenance(DIM, layer="fc6")
    )
    with pytest.raises(ProvenanceMismatch, match="layer: fc7 vs fc6"):
        predict_main([str(tmp_path / "m"), str(other), "--out", str(tmp_path / "pred")])
    assert not list((tmp_path).glob("pred/part-*"))
    with pytest.raises(ProvenanceMismatch, match="--test"):
        train(TrainConfig(embeddings=str(separable), out=str(tmp_path / "m2"), test=str(other)))


def test_tampered_model_files_are_refused_and_not_executed(separable, tmp_path):
    folder = tmp_path / "m"
    train(TrainConfig(embeddings=str(separable), out=str(folder)))
    Classifier.load(folder)
    original = (folder / MODEL_FILE).read_bytes()
    manifest = json.loads((folder / MANIFEST_FILE).read_text())

    (folder / MODEL_FILE).write_bytes(original[:-20] + b"\0" * 20)
    with pytest.raises(ArtifactError, match="modified or corrupted"):
        Classifier.load(folder)

    def replace_model(data: bytes) -> None:
        import hashlib

        (folder / MODEL_FILE).write_bytes(data)
        manifest["model_sha256"] = hashlib.sha256(data).hexdigest()  # attacker fixes the hash
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest))

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "pwned"))

    replace_model(pickle.dumps(Payload()))
    with pytest.raises(ArtifactError, match="not a skops file"):
        Classifier.load(folder)
    assert not marker.exists()

    # eval, not print: Ray, started by other tests in the same process, replaces print.
    replace_model(sio.dumps({"steps": [eval]}))
    with pytest.raises(ArtifactError, match="builtins.eval"):
        Classifier.load(folder)


def test_manifest_from_a_newer_release_is_refused(separable, tmp_path):
    train(TrainConfig(embeddings=str(separable), out=str(tmp_path / "m")))
    path = tmp_path / "m" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="upgrade fc7"):
        Classifier.load(tmp_path / "m")
    with pytest.raises(ArtifactError, match="not a classifier folder"):
        Classifier.load(tmp_path)


def test_manifest_records_provenance_fingerprint_and_versions(separable, tmp_path):
    model = train(TrainConfig(embeddings=str(separable), out=str(tmp_path / "m")))
    manifest = json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())
    assert manifest["classes"] == model.classes
    assert manifest["provenance"]["layer"] == "fc7"
    assert len(manifest["training"]["fingerprint"]) == 64
    assert {"scikit-learn", "skops", "numpy", "fc7"} <= set(manifest["versions"])
    loaded = Classifier.load(tmp_path / "m")
    assert loaded.provenance == model.provenance
    assert loaded.metrics["accuracy"] == model.metrics["accuracy"]


def test_concurrent_predictions_agree(separable, tmp_path):
    train(TrainConfig(embeddings=str(separable), out=str(tmp_path / "m")))
    model = Classifier.load(tmp_path / "m")
    x, _ = clustered_vectors(64, DIM, clusters=8, spread=0.2, seed=1)
    expected = model.predict_proba_top(x, k=3)
    barrier = threading.Barrier(4)

    def work(_: int):
        barrier.wait()
        return [model.predict_proba_top(x, k=3) for _ in range(5)]

    with ThreadPoolExecutor(4) as pool:
        for results in pool.map(work, range(4)):
            assert all(result == expected for result in results)
    with pytest.raises(ConfigError, match="expects"):
        model.predict_proba_top(np.zeros((2, DIM + 1)))


def test_no_labels_one_class_and_empty_input_are_clear_errors(tmp_path):
    x, y = clustered_vectors(30, DIM, clusters=2, seed=7)
    unlabelled = write_embeddings(tmp_path / "none", x)
    with pytest.raises(ConfigError, match="no row has a 'label'"):
        train(TrainConfig(embeddings=str(unlabelled), out=str(tmp_path / "m")))
    one = write_embeddings(tmp_path / "one", x, ["cat"] * 30)
    with pytest.raises(ConfigError, match="at least 2 classes.*only 'cat'"):
        train(TrainConfig(embeddings=str(one), out=str(tmp_path / "m")))
    empty = write_embeddings(tmp_path / "empty", np.zeros((0, DIM), np.float32))
    with pytest.raises(ArtifactError, match="holds no rows"):
        train(TrainConfig(embeddings=str(empty), out=str(tmp_path / "m")))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ArtifactError, match="no Parquet part files"):
        train(TrainConfig(embeddings=str(tmp_path / "nothing"), out=str(tmp_path / "m")))
    with pytest.raises(ConfigError, match="--label-column species"):
        train_main([str(one), "--out", str(tmp_path / "m"), "--label-column", "species"])


def test_bad_options_are_config_errors(separable, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--classifier 'forest'.*logreg"):
        train_main([str(separable), "--out", str(tmp_path / "m"), "--classifier", "forest"])
    with pytest.raises(ConfigError, match="choose one"):
        train_main([str(separable), "--out", str(tmp_path / "m"), "--cv", "3", "--test", "x"])
    with pytest.raises(ConfigError, match="sgd"):
        train_main(
            [str(separable), "--out", str(tmp_path / "m"), "--classifier", "sgd", "--search"]
        )
    assert (
        cli.main(["train", str(separable), "--out", str(tmp_path / "m"), "--classifier", "forest"])
        == 2
    )
    assert "fc7 train: error: --classifier 'forest'" in capsys.readouterr().err
    train_main([str(separable), "--out", str(tmp_path / "m"), "--no-normalize"])
    assert [name for name, _ in Classifier.load(tmp_path / "m").model.steps] == [
        "logisticregression"
    ]
    with pytest.raises(OutputError, match="--overwrite"):
        train_main([str(separable), "--out", str(tmp_path / "m")])


def test_data_too_large_for_memory_says_so():
    check_fits_in_memory(1000, 4096, "small", available=2**30)
    with pytest.raises(ConfigError, match=r"15\.3 GiB does not fit.*--classifier sgd"):
        check_fits_in_memory(1_000_000, 4096, "big", available=8 * 2**30)


def test_shipped_yaml_config_is_valid(tmp_path):
    import argparse

    args = argparse.Namespace(config=str(REPO / "configs" / "train.yaml"), cv=3)
    config = load_config(TrainConfig, args)
    assert config.classifier == "logreg" and config.normalize and config.cv == 3
    assert config == TrainConfig(embeddings="out/embeddings", out="out/classifier", cv=3)
