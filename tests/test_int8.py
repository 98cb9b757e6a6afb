"""`fc7 extract --precision int8`: the quantised model, its fidelity gate, and how the rest of fc7
keeps int8 vectors apart from fp32 ones.

Random weights (the tests cannot download ImageNet's) give near-uniform FC7 vectors, so the
figures here check the arithmetic and the plumbing, not how good int8 is on real features.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, jpeg_bytes, write_embeddings

from jobs import run
from jobs.extract import main as extract_main
from jobs.predict import main as predict_main
from jobs.train_classifier import main as train_main
from pipeline.classify import Classifier, check_classifier_out, predict_dataset
from pipeline.decode import decode_image
from pipeline.errors import ArtifactError, ConfigError, OutputError, ProvenanceMismatch
from pipeline.extract.calibrate import _samples
from pipeline.extract.config import ExtractConfig
from pipeline.extract.plan import _read_plan
from pipeline.index import IndexConfig, add_to_index, build_index
from pipeline.index.faiss_env import faiss
from pipeline.model import Embedder, load_weights, resolve_precision
from pipeline.provenance import Provenance
from pipeline.quantize import int8_model_name
from pipeline.search import SimilarityIndex
from pipeline.store import EmbeddingDataset

EXAMPLES = REPO / "examples" / "images"
# Small samples keep calibration to seconds: 8 images calibrate, 16 others check.
INT8_ARGS = ["--weights", "random:0", "--precision", "int8", "--runner", "local",
             "--int8-calibration-images", "8", "--int8-check-images", "16", "--shard-size", "10"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private FC7_CACHE for the module, so that what is cached is what these tests made."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv("FC7_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """30 generated photos in 3 classes, and one file that does not decode."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(30):
        folder = root / f"class_{i % 3}"
        folder.mkdir(exist_ok=True)
        (folder / f"img_{i:02d}.jpg").write_bytes(jpeg_bytes(seed=i, size=(160, 120)))
    (root / "class_0" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


@pytest.fixture(scope="module")
def int8_out(cache, photos, tmp_path_factory) -> tuple[Path, str]:
    """An int8 extraction of `photos`, made as a user makes it; and what it printed."""
    out = tmp_path_factory.mktemp("int8") / "emb"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        assert extract_main([str(photos), "--out", str(out), *INT8_ARGS]) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def int8_index(int8_out, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(IndexConfig(embeddings=str(int8_out[0]), out=str(out)),
                EmbeddingDataset.open(str(int8_out[0])))
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_int8_output_records_its_model_and_gate(int8_out):
    out, printed = int8_out
    provenance = EmbeddingDataset.open(str(out)).provenance
    assert (provenance.precision, provenance.runtime) == ("int8", "onnxruntime")
    assert provenance.runtime_version
    model = out / "_plan" / int8_model_name(provenance.int8_model_sha256)
    assert hashlib.sha256(model.read_bytes()).hexdigest() == provenance.int8_model_sha256
    check = provenance.int8_check
    assert check["images"] == 16 and check["calibration_images"] == 8
    assert not check["same_images"] and not check["split"]
    assert f"mean cosine to fp32 {check['mean_cosine']:.4f}" in printed
    assert "on 16 held-out images, calibrated on 8" in printed


def test_gate_figures_match_an_independent_computation(int8_out, photos):
    """The recorded figures, recomputed on the same check sample with numpy and IndexFlat."""
    out, _ = int8_out
    config = ExtractConfig(source=str(photos), out=str(out), int8_calibration_images=8,
                           int8_check_images=16)
    plan, _ = _read_plan(str(out))
    calibration, check, how = _samples(config, plan)
    assert how == "apart" and len(check) == 16
    assert not {sha for sha, _ in calibration} & {sha for sha, _ in check}
    images = torch.stack([tensor for _, tensor in check])
    fp32 = Embedder(load_weights("random:0"), "fc7", "cpu", precision="fp32")(images)
    int8 = Embedder.matching(plan.provenance)(images)
    cosines = (_unit(int8) * _unit(fp32)).sum(1)
    k = 10
    neighbours = []
    for vectors in (int8, fp32):
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(_unit(vectors).astype(np.float32))
        _, found = flat.search(_unit(vectors).astype(np.float32), k + 1)
        neighbours.append([[j for j in row if j != i][:k] for i, row in enumerate(found)])
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(*neighbours, strict=True)])
    recorded = plan.provenance.int8_check
    assert recorded["mean_cosine"] == pytest.approx(cosines.mean(), abs=1e-5)
    assert recorded["min_cosine"] == pytest.approx(cosines.min(), abs=1e-5)
    assert recorded["neighbour_overlap"] == pytest.approx(overlap, abs=1e-5)
    assert recorded["neighbours"] == "top-10 neighbours by cosine"


def test_int8_vectors_are_close_to_fp32_and_not_equal(int8_out, photos):
    data = EmbeddingDataset.open(str(int8_out[0]))
    rows = {}
    for batch in data.batches(["id", "path", "embedding", "error"], with_errors=True):
        for item, path, vector, error in zip(
            batch.column("id").to_pylist(), batch.column("path").to_pylist(),
            batch.column("embedding").to_pylist(), batch.column("error").to_pylist(),
            strict=True,
        ):
            rows[item] = (path, vector, error)
    assert rows["class_0/broken.jpg"][2]  # a failed decode is an error row, as in fp32
    ids = sorted(item for item, (_, _, error) in rows.items() if error is None)[:6]
    fp32 = Embedder(load_weights("random:0"), "fc7", "cpu", precision="fp32")
    images = [decode_image(Path(rows[i][0]).read_bytes(), fp32.preprocessing)[0] for i in ids]
    stored = np.array([rows[i][1] for i in ids], dtype=np.float32)
    fp32 = fp32(torch.stack(images))
    cosines = (_unit(stored) * _unit(fp32)).sum(1)
    assert cosines.min() > 0.99
    assert not np.allclose(stored, fp32, rtol=0, atol=1e-6)


def test_a_model_below_the_gate_is_refused_with_its_figures(cache, tmp_path, capsys):
    """Through the job, as a user meets it; the 12 bundled photos are too few to hold any out,
    and the message says so. The override reruns from the cache."""
    out = tmp_path / "emb"
    argv = [str(EXAMPLES), "--out", str(out), "--weights", "random:0", "--precision", "int8",
            "--runner", "local"]
    assert run("extract", extract_main, [*argv, "--int8-min-cosine", "1"]) == 1
    error = capsys.readouterr().err
    assert "too far from fp32" in error and "mean cosine to fp32 0.9" in error
    assert "on the 12 calibration images themselves" in error
    assert "--precision fp32" in error and "--int8-min-cosine" in error
    assert not list(out.glob("part-*.parquet"))
    assert not list((out / "_plan").glob("int8-*.onnx"))
    plan = json.loads((out / "_plan" / "plan.json").read_text())
    assert plan["provenance"]["int8_model_sha256"] == ""

    assert run("extract", extract_main, argv) == 0
    printed = capsys.readouterr().out
    assert "int8 check (cached model)" in printed
    assert EmbeddingDataset.open(str(out)).provenance.int8_check["same_images"] is True


def test_resume_reuses_the_model_without_calibrating(int8_out, photos, tmp_path, monkeypatch):
    source, _ = int8_out
    out = tmp_path / "emb"
    shutil.copytree(source, out)
    removed = sorted(out.glob("part-*.parquet"))[1:3]
    before = {p.name: p.read_bytes() for p in removed}
    for part in removed:
        part.unlink()
    empty_cache = tmp_path / "other-cache"
    monkeypatch.setenv("FC7_CACHE", str(empty_cache))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        assert extract_main([str(photos), "--out", str(out), *INT8_ARGS]) == 0
    assert "int8 check (resumed model)" in printed.getvalue()
    # Found beside the output and cached; nothing calibrated.
    assert not list(empty_cache.glob("int8/calibration-*.json"))
    sha = EmbeddingDataset.open(str(source)).provenance.int8_model_sha256
    assert EmbeddingDataset.open(str(out)).provenance.int8_model_sha256 == sha
    for part in removed:
        old = pq.read_table(io.BytesIO(before[part.name])).column("embedding").to_pylist()
        new = pq.read_table(part).column("embedding").to_pylist()
        np.testing.assert_array_equal(np.array(old), np.array(new))


def test_fp32_run_into_an_int8_output_is_refused(int8_out, photos, capsys):
    out, _ = int8_out
    argv = [str(photos), "--out", str(out), "--weights", "random:0", "--precision", "fp32",
            "--runner", "local"]
    assert run("extract", extract_main, argv) == 1
    assert "precision: int8 vs fp32" in capsys.readouterr().err


def test_index_refuses_to_mix_int8_and_fp32(int8_out, int8_index, tmp_path):
    int8 = EmbeddingDataset.open(str(int8_out[0]))
    fp32_provenance = int8.provenance.model_copy(
        update={"precision": "fp32", "runtime": "torch", "int8_model_sha256": "",
                "int8_check": None}
    )
    rng = np.random.default_rng(0)
    fp32_folder = write_embeddings(
        tmp_path / "fp32", rng.random((8, 4096), dtype=np.float32), provenance=fp32_provenance
    )
    fp32 = EmbeddingDataset.open(str(fp32_folder))
    with pytest.raises(ProvenanceMismatch, match="precision: int8 vs fp32"):
        add_to_index(IndexConfig(embeddings=str(fp32_folder), out=str(int8_index)), fp32)
    fp32_index = tmp_path / "fp32-index"
    build_index(IndexConfig(embeddings=str(fp32_folder), out=str(fp32_index)), fp32)
    with pytest.raises(ProvenanceMismatch, match="precision: fp32 vs int8"):
        add_to_index(IndexConfig(embeddings=str(int8_out[0]), out=str(fp32_index)), int8)


def test_query_on_a_moved_int8_index_embeds_with_int8(int8_out, int8_index, tmp_path,
                                                      monkeypatch):
    """The index folder carries the model: moved to another place (and an empty cache, as on
    another machine), a query by image still embeds with the int8 model."""
    moved = tmp_path / "moved"
    shutil.copytree(int8_index, moved)
    monkeypatch.setenv("FC7_CACHE", str(tmp_path / "fresh-cache"))
    index = SimilarityIndex.open(moved, device="cpu")
    embedder = index.embedder()
    assert embedder.precision == "int8"
    assert embedder.provenance.int8_model_sha256 == index.provenance.int8_model_sha256
    photo = jpeg_bytes(seed=4, size=(160, 120))  # class_1/img_04.jpg
    vector, errors = embedder.embed_bytes([photo])
    assert errors == [None]
    int8 = Embedder.matching(index.provenance, model_dirs=(str(int8_out[0] / "_plan"),))
    np.testing.assert_array_equal(vector, int8.embed_bytes([photo])[0])
    fp32 = Embedder(load_weights("random:0"), "fc7", "cpu", precision="fp32")
    assert not np.allclose(vector, fp32.embed_bytes([photo])[0], rtol=0, atol=1e-6)
    best = index.search_images([photo], k=1)[0][0]
    assert best.id == "class_1/img_04.jpg" and best.score > 0.9999


def test_precision_and_feature_space():
    base = Provenance(weights="random:0", weights_sha256="a" * 64, layer="fc7", dim=4096)
    fp16 = base.model_copy(update={"precision": "fp16"})
    int8 = base.model_copy(update={"precision": "int8", "int8_model_sha256": "b" * 64})
    other_int8 = int8.model_copy(update={"int8_model_sha256": "c" * 64})
    assert base.differences(fp16) == []
    assert base.differences(int8) == [
        "precision: fp32 vs int8", f"int8_model_sha256: none vs {'b' * 12}"
    ]
    assert int8.differences(other_int8) == [f"int8_model_sha256: {'b' * 12} vs {'c' * 12}"]
    old = json.loads(base.to_json())
    for name in ("precision", "runtime", "runtime_version", "int8_model_sha256", "int8_check"):
        del old[name]
    assert Provenance.from_json(json.dumps(old), "old.json").differences(base) == []


def test_resolve_precision():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("int8", "cpu") == resolve_precision("int8", "auto") == "int8"
    with pytest.raises(ConfigError, match="fp16 runs on CUDA only"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="ONNX Runtime on the CPU"):
        resolve_precision("int8", "gpu")


# Classifier folders carry the int8 model as index folders do.


@pytest.fixture(scope="module")
def examples_int8(cache, tmp_path_factory) -> Path:
    """The 12 bundled photos (3 classes), extracted in int8 as a user extracts them."""
    out = tmp_path_factory.mktemp("examples-int8") / "emb"
    argv = [str(EXAMPLES), "--out", str(out), "--weights", "random:0", "--precision", "int8",
            "--runner", "local"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert extract_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def int8_classifier(examples_int8, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clf-int8") / "clf"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert train_main([str(examples_int8), "--out", str(out), "--test-size", "0.5"]) == 0
    return out


def _stored_vectors(folder: Path) -> dict[str, np.ndarray]:
    vectors = {}
    for batch in EmbeddingDataset.open(str(folder)).batches(["id", "embedding"]):
        for item, vector in zip(batch.column("id").to_pylist(),
                                batch.column("embedding").to_pylist(), strict=True):
            vectors[item] = np.asarray(vector, np.float32)
    return vectors


def test_int8_classifier_folder_carries_its_model(examples_int8, int8_classifier):
    sha = EmbeddingDataset.open(str(examples_int8)).provenance.int8_model_sha256
    manifest = json.loads((int8_classifier / "manifest.json").read_text())
    assert manifest["provenance"]["precision"] == "int8"
    assert manifest["int8_model"] == int8_model_name(sha)
    model = int8_classifier / int8_model_name(sha)
    assert model.read_bytes() == (examples_int8 / "_plan" / int8_model_name(sha)).read_bytes()
    assert Classifier.load(int8_classifier).folder == int8_classifier


def test_predict_image_on_a_moved_int8_classifier_with_an_empty_cache(
    examples_int8, int8_classifier, tmp_path, monkeypatch, capsys
):
    """As on another machine: the classifier folder moved, the cache empty; `fc7 predict
    --image` embeds with the int8 model the folder carries, and labels as the classifier
    labels the extraction's stored int8 vector of that photo."""
    moved = tmp_path / "moved-clf"
    shutil.copytree(int8_classifier, moved)
    empty_cache = tmp_path / "empty-cache"
    monkeypatch.setenv("FC7_CACHE", str(empty_cache))
    image = "dalmatian/image_0001.jpg"
    assert predict_main([str(moved), "--image", str(EXAMPLES / image), "--device", "cpu"]) == 0
    path, label, score, _ = capsys.readouterr().out.rstrip("\n").split("\t")
    assert path == str(EXAMPLES / image)
    classifier = Classifier.load(moved)
    sha = classifier.provenance.int8_model_sha256
    assert (empty_cache / "int8" / int8_model_name(sha)).is_file()  # found in the folder
    expected = classifier.predict_proba_top(_stored_vectors(examples_int8)[image][None], k=1)[0]
    assert label == expected[0][0]
    assert float(score) == pytest.approx(expected[0][1], abs=2e-3)
    # The same, computed independently: the int8 embedder from the folder, and not fp32.
    int8 = Embedder.matching(classifier.provenance, model_dirs=(str(moved),))
    photo = (EXAMPLES / image).read_bytes()
    vector = int8.embed_bytes([photo])[0]
    assert classifier.predict_proba_top(vector, k=1)[0][0][0] == label
    fp32 = Embedder(load_weights("random:0"), "fc7", "cpu", precision="fp32")
    assert not np.allclose(vector, fp32.embed_bytes([photo])[0], rtol=0, atol=1e-6)


def test_int8_classifier_without_its_model_says_where_it_looked(int8_classifier, tmp_path,
                                                               monkeypatch):
    moved = tmp_path / "moved-clf"
    shutil.copytree(int8_classifier, moved)
    for model in moved.glob("int8-*.onnx"):
        model.unlink()
    monkeypatch.setenv("FC7_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ArtifactError, match=f"is not here .*{moved}"):
        Classifier.load(moved).predict_images([jpeg_bytes(seed=1)], device="cpu")


def test_classifier_overwrite_treats_the_int8_model_as_its_own(examples_int8, int8_classifier,
                                                               tmp_path):
    out = tmp_path / "clf"
    shutil.copytree(int8_classifier, out)
    (out / "notes.md").write_text("mine")
    (out / ".int8-{}.onnx.tmp".format("0" * 64)).write_bytes(b"half")  # a killed run's
    check_classifier_out(out, overwrite=True)
    # An fp32 classifier over the int8 one leaves no int8 model behind, and the notes alone.
    fp32_folder = _as_fp32(examples_int8, tmp_path / "fp32")
    argv = [str(fp32_folder), "--out", str(out), "--test-size", "0.5"]
    with pytest.raises(OutputError, match="pass --overwrite"):
        train_main(argv)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert train_main([*argv, "--overwrite"]) == 0
    assert not list(out.glob("*int8-*"))
    assert (out / "notes.md").read_text() == "mine"
    assert json.loads((out / "manifest.json").read_text())["int8_model"] is None
    # A folder under the int8 model's name is not fc7's to replace.
    shutil.rmtree(out)
    shutil.copytree(int8_classifier, out)
    (out / int8_model_name("f" * 64)).mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_classifier_out(out, overwrite=True)
    # A folder holding only an int8 model is not a classifier folder.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / int8_model_name("f" * 64)).write_bytes(b"x")
    with pytest.raises(OutputError, match="not an fc7 classifier folder"):
        check_classifier_out(lone, overwrite=True)


def _as_fp32(int8_out, folder):
    """The int8 vectors written as if they were fp32 ones: the same numbers, other features."""
    int8 = EmbeddingDataset.open(str(int8_out))
    fp32_provenance = int8.provenance.model_copy(
        update={"precision": "fp32", "runtime": "torch", "int8_model_sha256": "",
                "int8_check": None}
    )
    vectors = _stored_vectors(int8_out)
    return write_embeddings(
        folder, np.stack(list(vectors.values())),
        labels=[item.split("/")[0] for item in vectors], provenance=fp32_provenance,
    )


def test_predict_refuses_to_mix_int8_and_fp32(examples_int8, int8_classifier, tmp_path):
    int8 = EmbeddingDataset.open(str(examples_int8))
    fp32_folder = _as_fp32(examples_int8, tmp_path / "fp32")
    fp32 = EmbeddingDataset.open(str(fp32_folder))
    with pytest.raises(ProvenanceMismatch, match="precision: int8 vs fp32"):
        predict_dataset(Classifier.load(int8_classifier), fp32, str(tmp_path / "p1"),
                        str(int8_classifier))
    fp32_classifier = tmp_path / "fp32-clf"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert train_main([str(fp32_folder), "--out", str(fp32_classifier),
                           "--test-size", "0.5"]) == 0
    with pytest.raises(ProvenanceMismatch, match="precision: fp32 vs int8"):
        predict_dataset(Classifier.load(fp32_classifier), int8, str(tmp_path / "p2"),
                        str(fp32_classifier))
