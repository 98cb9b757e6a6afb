"""Classifiers: training on generated embeddings with known accuracy, an end-to-end run on real
AlexNet output checked against an independent scikit-learn fit, the shared labelled-data pass,
save/load safety, errors."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
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
from sklearn.model_selection import (
    StratifiedKFold,
    cross_val_predict,
    cross_val_score,
    train_test_split,
)
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import LinearSVC

from jobs import cli
from jobs.predict import main as predict_main
from jobs.train_classifier import main as train_main
from pipeline.classify import (
    MANIFEST_FILE,
    MODEL_FILE,
    Classifier,
    TrainConfig,
    check_fits_in_memory,
    train,
    training_rows,
)
from pipeline.classify.data import encoded_batches, read_test_set
from pipeline.classify.estimators import SEARCH_GRIDS, balanced_class_weights
from pipeline.classify.predict import PREDICTIONS_METADATA_KEY
from pipeline.classify.train import evaluation_protocol
from pipeline.config import parse_config
from pipeline.errors import ArtifactError, ConfigError, OutputError, ProvenanceMismatch
from pipeline.fs import resolve
from pipeline.store import EmbeddingDataset, build_table, write_table_atomically

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


def messy_labels(rows: int, seed: int) -> tuple[np.ndarray, list[str | None], list[str | None]]:
    """Vectors of 3 classes, with 1 row with an error, 2 without a label, and classes of 1, 2
    and 3 rows ("lonely", "pair", "trio"); returns (x, labels, errors)."""
    x, y = clustered_vectors(rows, DIM, clusters=3, spread=0.2, seed=seed)
    labels: list[str | None] = names(y)
    errors: list[str | None] = [None] * rows
    labels[0] = None
    labels[1] = "   "
    errors[2] = "not an image: unknown format"
    labels[3] = "lonely"
    labels[4] = labels[5] = "pair"
    labels[6] = labels[7] = labels[8] = "trio"
    return x, labels, errors


# ---------------------------------------------------------------------------- training


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


@pytest.mark.parametrize("classifier", ["logreg", "sgd"])
def test_skipped_rows_and_small_classes_are_counted_not_fatal(tmp_path, capsys, classifier):
    x, labels, errors = messy_labels(120, seed=3)
    folder = write_embeddings(tmp_path / "emb", x, labels, errors=errors)
    code = train_main([str(folder), "--out", str(tmp_path / "m"), "--classifier", classifier])
    assert code == 0
    counts = json.loads((tmp_path / "m" / "metrics.json").read_text())["counts"]
    assert counts["rows"] == 120
    assert counts["skipped_error"] == 1
    assert counts["skipped_no_label"] == 2
    assert counts["small_classes"] == {"lonely": 1}  # pair and trio can be split
    assert counts["skipped_small_class"] == 1
    assert counts["labelled"] == 117
    assert counts["classes"] == 5
    assert counts["train"] + counts["test"] == 116
    out = capsys.readouterr().out
    assert "note: 1 class(es) have fewer than 2 labelled rows" in out
    assert "lonely (1)" in out and "1 with an error, 2 without a label" in out


def test_both_training_paths_count_and_split_the_same_rows(tmp_path):
    x, labels, errors = messy_labels(150, seed=8)
    folder = write_embeddings(tmp_path / "emb", x, labels, errors=errors, shards=2)
    in_memory = train(TrainConfig(embeddings=str(folder), out=str(tmp_path / "a"), seed=4))
    streaming = train(
        TrainConfig(embeddings=str(folder), out=str(tmp_path / "b"), classifier="sgd", seed=4)
    )
    assert in_memory.metrics["counts"] == streaming.metrics["counts"]
    assert in_memory.classes == streaming.classes
    # the same held-out rows: the same support per class
    support = {name: m["support"] for name, m in in_memory.metrics["per_class"].items()}
    assert support == {name: m["support"] for name, m in streaming.metrics["per_class"].items()}


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
    per_fold = [np.mean(expected[rows] == y[rows]) for _, rows in folds.split(x, y)]
    assert model.metrics["fold_accuracy"] == pytest.approx(per_fold)
    assert len(set(per_fold)) > 1  # the folds really differ: their order is checked
    # the saved model is refit on all rows
    reference.fit(x, y)
    np.testing.assert_allclose(
        np.array([[p for _, p in row] for row in model.predict_proba_top(x, k=3)]),
        -np.sort(-reference.predict_proba(x), axis=1),
        atol=1e-5,
    )


def test_search_scores_every_candidate_as_sklearn_does_and_keeps_the_best(tmp_path):
    x, y = clustered_vectors(240, DIM, clusters=4, spread=2.0, seed=9)  # k matters here
    folder = write_embeddings(tmp_path / "emb", x, names(y))
    model = train(
        TrainConfig(
            embeddings=str(folder), out=str(tmp_path / "m"), classifier="knn", search=True,
            cv=3, seed=5,
        )
    )
    folds = StratifiedKFold(3, shuffle=True, random_state=5)
    expected = {
        k: cross_val_score(
            make_pipeline(Normalizer(), KNeighborsClassifier(k, algorithm="brute")),
            x, y, cv=folds,
        ).mean()
        for k in SEARCH_GRIDS["knn"]["n_neighbors"]
    }
    assert len(set(expected.values())) > 1  # the choice is not trivial
    found = {
        int(key.rsplit(": ", 1)[1].rstrip("}")): score
        for key, score in model.metrics["search"]["mean_cv_accuracy"].items()
    }
    assert found == pytest.approx(expected)
    best = max(expected, key=expected.get)  # the first of equal scores, as GridSearchCV
    assert model.metrics["search"]["best_params"] == {"n_neighbors": best}
    # the saved model is the best candidate refit on all rows
    oracle = make_pipeline(Normalizer(), KNeighborsClassifier(best, algorithm="brute")).fit(x, y)
    np.testing.assert_array_equal(model.model.predict(x), oracle.predict(x))


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
    assert model.metrics["accuracy"] >= 0.97
    assert model.metrics["counts"]["test"] == 120


def test_sgd_on_a_separate_test_set_counts_what_it_skips(tmp_path):
    x, y = clustered_vectors(200, DIM, clusters=3, spread=0.2, seed=10)
    train_dir = write_embeddings(tmp_path / "train", x, names(y))
    x_test, y_test = clustered_vectors(60, DIM, clusters=3, spread=0.2, seed=10)
    labels: list[str | None] = names(y_test)
    errors: list[str | None] = [None] * 60
    labels[0], labels[1], errors[2] = "unknown", None, "broken"
    test_dir = write_embeddings(tmp_path / "test", x_test, labels, errors=errors)
    model = train(
        TrainConfig(
            embeddings=str(train_dir), out=str(tmp_path / "m"), test=str(test_dir),
            classifier="sgd",
        )
    )
    counts = model.metrics["counts"]
    assert (counts["test_skipped_error"], counts["test_skipped_no_label"]) == (1, 1)
    assert counts["test_skipped_unknown_class"] == 1
    assert counts["test"] == 57 and counts["train"] == 200


# ---------------------------------------------------------------------------- the shared data pass


def test_training_rows_filter_encode_and_count(tmp_path):
    x, labels, errors = messy_labels(90, seed=11)
    folder = write_embeddings(tmp_path / "emb", x, labels, errors=errors, shards=3)
    data = EmbeddingDataset.open(str(folder))
    folds = {"kind": "stratified-kfold", "folds": 3}
    rows = training_rows(data, "label", 16, folds)
    # what survives: a label, no error, a class of at least 3 rows (trio included)
    kept = [
        i for i in range(90)
        if errors[i] is None and labels[i] and labels[i].strip()
        and labels[i] not in ("lonely", "pair")
    ]
    assert rows.ids.tolist() == [f"img_{i:06d}.jpg" for i in kept]
    assert rows.classes == sorted({labels[i] for i in kept})
    assert [rows.classes[code] for code in rows.y] == [labels[i] for i in kept]
    np.testing.assert_array_equal(rows.vectors, x[kept])
    assert rows.counts == {
        "rows": 90, "skipped_error": 1, "skipped_no_label": 2, "skipped_small_class": 3,
        "small_classes": {"lonely": 1, "pair": 2}, "labelled": 87, "classes": 4,
    }
    # the streaming path reads the same rows, without their vectors
    labels_only = training_rows(data, "label", 7, folds, with_vectors=False)
    assert labels_only.vectors is None
    assert labels_only.ids.tolist() == rows.ids.tolist()
    np.testing.assert_array_equal(labels_only.y, rows.y)
    assert labels_only.counts == rows.counts


@pytest.mark.parametrize(
    "options, small",
    [
        ({}, {"lonely": 1}),
        ({"cv": 3}, {"lonely": 1, "pair": 2}),
        ({"cv": 4}, {"lonely": 1, "pair": 2, "trio": 3}),
        ({"test": "other"}, {}),  # no split: every class can be trained on
    ],
)
def test_the_protocol_decides_which_classes_are_too_small(tmp_path, options, small):
    x, labels, errors = messy_labels(60, seed=12)
    data = EmbeddingDataset.open(str(write_embeddings(tmp_path / "e", x, labels, errors=errors)))
    config = TrainConfig(embeddings="e", out="o", **options)
    protocol = evaluation_protocol(config, data if config.test else None)
    assert training_rows(data, "label", 64, protocol).counts["small_classes"] == small


def test_streamed_batches_hold_each_training_row_once(tmp_path):
    x, y = clustered_vectors(130, DIM, clusters=3, seed=13)
    folder = write_embeddings(tmp_path / "emb", x, names(y), shards=4)
    data = EmbeddingDataset.open(str(folder))
    rows = training_rows(data, "label", 64, {"kind": "stratified-holdout"})
    chosen = rows.ids[::2]
    batches = list(
        encoded_batches(
            data, "label", rows.encoder, 16, pa.array(chosen.tolist(), pa.string()),
            np.random.default_rng(0), shuffle_buffer=40,
        )
    )
    assert max(len(batch.y) for batch in batches) <= 16
    streamed = np.concatenate([batch.vectors for batch in batches])
    codes = np.concatenate([batch.y for batch in batches])
    wanted = np.isin(rows.ids, chosen)
    # the same rows, shuffled: compare in a canonical order
    order, expected = np.lexsort(streamed.T), np.lexsort(rows.vectors[wanted].T)
    np.testing.assert_array_equal(streamed[order], rows.vectors[wanted][expected])
    np.testing.assert_array_equal(codes[order], rows.y[wanted][expected])
    assert not np.array_equal(codes, rows.y[wanted])  # and really shuffled


def test_a_test_set_keeps_known_classes_and_counts_the_rest(tmp_path):
    x, y = clustered_vectors(40, DIM, clusters=2, seed=14)
    train_data = EmbeddingDataset.open(str(write_embeddings(tmp_path / "t", x, names(y))))
    rows = training_rows(train_data, "label", 64, {"kind": "separate-test-set"})
    labels: list[str | None] = names(y)
    errors: list[str | None] = [None] * 40
    labels[0], labels[1], labels[2], errors[3] = "zebra", "zebra", "", "broken"
    test = EmbeddingDataset.open(str(write_embeddings(tmp_path / "s", x, labels, errors=errors)))
    held_out = read_test_set(test, "label", 64, rows.encoder)
    assert held_out.counts == {
        "test_skipped_error": 1, "test_skipped_no_label": 1, "test_skipped_unknown_class": 2,
    }
    np.testing.assert_array_equal(held_out.vectors, x[4:])
    np.testing.assert_array_equal(held_out.y, y[4:])


def test_balanced_class_weights_give_every_class_the_same_total_weight():
    y = np.repeat([0, 1, 2], [5, 20, 75])
    weights = balanced_class_weights(y)
    totals = [weights[code] * np.sum(y == code) for code in range(3)]
    assert totals == pytest.approx([len(y) / 3] * 3)
    assert all(type(code) is int for code in weights)


# ---------------------------------------------------------------------------- end to end


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

    train_argv = [
        str(tmp_path / "emb"), "--out", str(tmp_path / "m"), "--classifier", "linear-svm",
        "--test-size", "0.5", "--C", "10",
    ]
    assert train_main(train_argv) == 0
    predict_argv = [
        str(tmp_path / "m"), str(tmp_path / "emb"), "--out", str(tmp_path / "pred"),
        "--top-k", "2",
    ]
    assert predict_main(predict_argv) == 0

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
    query = [str(files[ok[0]]), str(tmp_path / "missing.jpg"), str(files[ok[-1]])]
    assert predict_main([str(tmp_path / "m"), "--image", *query, "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    printed = [line.split("\t")[1] for line in captured.out.splitlines()]
    assert printed == [expected_labels[0], expected_labels[-1]]
    assert captured.err == f"{query[1]}\terror: cannot read: cannot read file: No such file or " \
        "directory\n"


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


def test_predictions_from_a_newer_release_are_not_overwritten(separable, tmp_path):
    train(TrainConfig(embeddings=str(separable), out=str(tmp_path / "m")))
    argv = [str(tmp_path / "m"), str(separable), "--out", str(tmp_path / "pred"), "--overwrite"]
    assert predict_main(argv) == 0
    part = tmp_path / "pred" / "part-00000.parquet"
    table = pq.read_table(part)
    metadata = dict(table.schema.metadata)
    about = json.loads(metadata[PREDICTIONS_METADATA_KEY])
    metadata[PREDICTIONS_METADATA_KEY] = json.dumps({**about, "schema_version": 99}).encode()
    pq.write_table(table.replace_schema_metadata(metadata), part)
    with pytest.raises(ArtifactError, match="newer fc7"):
        predict_main(argv)
    assert part.exists()


# ---------------------------------------------------------------------------- saved classifiers


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
    del manifest["schema_version"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="no valid schema version.*retrain"):
        Classifier.load(tmp_path / "m")
    with pytest.raises(ArtifactError, match="not a classifier folder"):
        Classifier.load(tmp_path)


def test_manifest_fingerprints_the_training_and_test_data(tmp_path):
    x, y = clustered_vectors(200, DIM, clusters=4, spread=0.2, seed=15)
    emb = write_embeddings(tmp_path / "emb", x[:150], names(y[:150]), shards=2)
    test = write_embeddings(tmp_path / "test", x[150:], names(y[150:]))
    model = train(TrainConfig(embeddings=str(emb), out=str(tmp_path / "m"), test=str(test)))
    training = json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())["training"]
    assert training["fingerprint"] == EmbeddingDataset.open(str(emb)).fingerprint()
    assert training["test_fingerprint"] == EmbeddingDataset.open(str(test)).fingerprint()
    assert training["fingerprint"] != training["test_fingerprint"]
    # the same files elsewhere are the same data; one more row is other data
    shutil.copytree(emb, tmp_path / "copy")
    copy = train(TrainConfig(embeddings=str(tmp_path / "copy"), out=str(tmp_path / "m2"),
                             test=str(test)))
    assert copy.manifest["training"]["fingerprint"] == training["fingerprint"]
    grown = write_embeddings(tmp_path / "grown", x[:151], names(y[:151]), shards=2)
    other = train(TrainConfig(embeddings=str(grown), out=str(tmp_path / "m3"), test=str(test)))
    assert other.manifest["training"]["fingerprint"] != training["fingerprint"]
    manifest = json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())
    assert manifest["classes"] == model.classes
    assert manifest["provenance"]["layer"] == "fc7"
    assert {"scikit-learn", "skops", "numpy", "fc7"} <= set(manifest["versions"])
    loaded = Classifier.load(tmp_path / "m")
    assert loaded.provenance == model.provenance
    assert loaded.metrics == model.metrics


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


# ---------------------------------------------------------------------------- errors and options


def test_no_labels_one_class_and_empty_input_are_clear_errors(tmp_path):
    x, y = clustered_vectors(30, DIM, clusters=2, seed=7)
    unlabelled = write_embeddings(tmp_path / "none", x)
    with pytest.raises(ConfigError, match="no row has a 'label'"):
        train(TrainConfig(embeddings=str(unlabelled), out=str(tmp_path / "m")))
    one = write_embeddings(tmp_path / "one", x, ["cat"] * 30)
    with pytest.raises(ConfigError, match="at least 2 classes.*only 'cat'"):
        train(TrainConfig(embeddings=str(one), out=str(tmp_path / "m")))
    two = write_embeddings(tmp_path / "two", x, names(y))
    too_small = r"found none \(2 class\(es\) have fewer than 40 .* cross-validation: class 0"
    with pytest.raises(ConfigError, match=too_small):
        train(TrainConfig(embeddings=str(two), out=str(tmp_path / "m"), cv=40))
    empty = write_embeddings(tmp_path / "empty", np.zeros((0, DIM), np.float32))
    with pytest.raises(ArtifactError, match="holds no rows"):
        train(TrainConfig(embeddings=str(empty), out=str(tmp_path / "m")))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ArtifactError, match="no Parquet part files"):
        train(TrainConfig(embeddings=str(tmp_path / "nothing"), out=str(tmp_path / "m")))
    with pytest.raises(ConfigError, match="--label-column species"):
        train_main([str(one), "--out", str(tmp_path / "m"), "--label-column", "species"])


def test_bad_options_are_config_errors(separable, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--classifier forest: .*'logreg'"):
        train_main([str(separable), "--out", str(tmp_path / "m"), "--classifier", "forest"])
    with pytest.raises(ConfigError, match="choose one"):
        train_main([str(separable), "--out", str(tmp_path / "m"), "--cv", "3", "--test", "x"])
    with pytest.raises(ConfigError, match="sgd"):
        train_main(
            [str(separable), "--out", str(tmp_path / "m"), "--classifier", "sgd", "--search"]
        )
    with pytest.raises(ConfigError, match="either EMBEDDINGS"):
        predict_main([str(tmp_path / "m")])
    assert (
        cli.main(["train", str(separable), "--out", str(tmp_path / "m"), "--classifier", "forest"])
        == 2
    )
    assert "fc7 train: error: --classifier forest" in capsys.readouterr().err
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


def test_shipped_yaml_config_is_valid():
    argv = ["--config", str(REPO / "configs" / "train.yaml"), "--cv", "3"]
    config = parse_config(TrainConfig, argv, "fc7 train", "")
    assert config == TrainConfig(embeddings="out/embeddings", out="out/classifier", cv=3)


def test_device_gpu_is_an_alias_of_cuda():
    from pipeline.classify import PredictConfig

    config = parse_config(PredictConfig, ["m", "--image", "a.jpg", "--device", "gpu"], "p", "")
    assert config.device == "cuda"
