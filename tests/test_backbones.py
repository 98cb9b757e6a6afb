"""Other torchvision networks (`--model`) and fine-tuned weights through the user's commands:
extract, index, query, train and predict; and the refusals that keep feature spaces apart.

The reference-cosine test of every model and layer is in test_model.py.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import torch
from conftest import REPO

from jobs.cli import main as fc7
from pipeline.model import Embedder, load_weights
from pipeline.provenance import file_sha256
from pipeline.store import EmbeddingDataset, embeddings_to_numpy

EXAMPLES = REPO / "examples/images"
LOCAL = ["--runner", "local"]  # the runner is not the point here (test_extract covers Ray)


def test_efficientnet_through_extract_index_query_train_and_predict(tmp_path, capsys):
    emb, index, clf = tmp_path / "emb", tmp_path / "index", tmp_path / "clf"
    assert fc7(["extract", str(EXAMPLES), "--out", str(emb), "--model", "efficientnet_b0",
                "--weights", "random:0", *LOCAL]) == 0
    data = EmbeddingDataset.open(str(emb))
    provenance = data.provenance
    assert (provenance.model, provenance.layer, provenance.dim) == ("efficientnet_b0",
                                                                   "avgpool", 1280)
    assert provenance.preprocessing.interpolation == "bicubic"
    vectors = embeddings_to_numpy(pq.read_table(emb).column("embedding"))
    # EfficientNet's features end in SiLU: negative values are real here, and accepted.
    assert vectors.shape == (12, 1280) and vectors.min() < 0

    assert fc7(["index", str(emb), "--out", str(index)]) == 0
    image = EXAMPLES / "dalmatian/image_0001.jpg"
    capsys.readouterr()
    assert fc7(["query", str(index), "--image", str(image), "-k", "2"]) == 0
    first = capsys.readouterr().out.splitlines()[4].split()
    # The query image is embedded by the index's own network: it finds itself.
    assert first[:3] == ["1", "1.0000", "dalmatian/image_0001.jpg"], first

    assert fc7(["train", str(emb), "--out", str(clf), "--test-size", "0.25"]) == 0
    capsys.readouterr()
    assert fc7(["predict", str(clf), "--image", str(image)]) == 0
    assert capsys.readouterr().out.startswith(f"{image}\t")


def test_an_index_refuses_embeddings_of_another_network(tmp_path, capsys):
    alexnet, resnet, index = tmp_path / "alexnet", tmp_path / "resnet", tmp_path / "index"
    source = str(EXAMPLES / "sunflower")
    assert fc7(["extract", source, "--out", str(alexnet), "--weights", "random:0", *LOCAL]) == 0
    assert fc7(["extract", source, "--out", str(resnet), "--weights", "random:0",
                "--model", "resnet50", *LOCAL]) == 0
    assert fc7(["index", str(alexnet), "--out", str(index)]) == 0
    capsys.readouterr()
    assert fc7(["index", str(resnet), "--out", str(index), "--add"]) == 1
    error = capsys.readouterr().err
    assert "model: alexnet vs resnet50" in error and "layer: fc7 vs avgpool" in error, error


def test_fine_tuned_weights_record_their_chain_and_embed_differently(tmp_path, capsys):
    """A fine-tuned model.pt (a torchvision state dict with a 3-class head) and the
    manifest.json `fc7 finetune` writes beside it: extraction embeds with the file's weights
    and records where they came from; a bad manifest or model is refused by name."""
    base = load_weights("random:0")
    state = {name: tensor.clone() for name, tensor in base.state_dict.items()}
    state["classifier.4.weight"] += 0.01  # fc7 trained: its features differ from the base's
    state["classifier.6.weight"] = torch.zeros(3, 4096)
    state["classifier.6.bias"] = torch.zeros(3)
    folder = tmp_path / "finetuned"
    folder.mkdir()
    torch.save(state, folder / "model.pt")
    manifest = {
        "kind": "fc7.finetune", "model": "alexnet",
        "model_sha256": file_sha256(folder / "model.pt"),
        "base_weights": {"weights": "random:0", "sha256": base.sha256, "chain": []},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))

    emb, base_emb = tmp_path / "emb", tmp_path / "base"
    source = str(EXAMPLES / "airplanes")
    assert fc7(["extract", source, "--out", str(emb), "--weights",
                str(folder / "model.pt"), *LOCAL]) == 0
    assert fc7(["extract", source, "--out", str(base_emb), "--weights", "random:0", *LOCAL]) == 0
    provenance = EmbeddingDataset.open(str(emb)).provenance
    assert provenance.weights == str(folder / "model.pt")
    assert provenance.weights_sha256 == manifest["model_sha256"]
    assert provenance.weights_chain == ({"weights": "random:0", "sha256": base.sha256},)
    tuned, plain = (embeddings_to_numpy(pq.read_table(out).sort_by("id").column("embedding"))
                    for out in (emb, base_emb))
    assert not np.allclose(tuned, plain, atol=1e-3)
    # The same images through the Python API: what the Parquet holds.
    embedder = Embedder(load_weights(str(folder / "model.pt")), device="cpu")
    again, errors = embedder.embed_bytes([p.read_bytes() for p in
                                          sorted((EXAMPLES / "airplanes").glob("*.jpg"))])
    assert errors == [None] * 4
    np.testing.assert_allclose(again, tuned, rtol=1e-4, atol=1e-5)

    capsys.readouterr()
    assert fc7(["extract", source, "--out", str(tmp_path / "r"), "--model", "resnet50",
                "--weights", str(folder / "model.pt"), *LOCAL]) == 1
    assert "not a torchvision resnet50 state dict" in capsys.readouterr().err
    manifest["model_sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert fc7(["extract", source, "--out", str(tmp_path / "x"), "--weights",
                str(folder / "model.pt"), *LOCAL]) == 1
    assert "the file was replaced or is corrupt" in capsys.readouterr().err
