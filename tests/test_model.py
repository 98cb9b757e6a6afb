import io
import urllib.error

import numpy as np
import pytest
import torch
from conftest import REPO, jpeg_bytes
from PIL import Image
from torchvision.models import AlexNet_Weights, alexnet

from pipeline.decode import decode_image
from pipeline.errors import ProvenanceMismatch, WeightsError
from pipeline.model import Embedder, load_weights

EXAMPLES = sorted((REPO / "examples/images").rglob("*.jpg"))


@pytest.fixture(scope="module")
def weights():
    return load_weights("random:0")


def _reference(weights, images: list[bytes], module_index: int) -> np.ndarray:
    """torchvision's plain pipeline: PIL, the weights' own transforms, the stock model, and a
    forward hook on the classifier module whose output is the layer."""
    model = alexnet(weights=None)
    model.load_state_dict(weights.state_dict)
    model.eval()
    transform = AlexNet_Weights.IMAGENET1K_V1.transforms()
    batch = torch.stack([transform(Image.open(io.BytesIO(d)).convert("RGB")) for d in images])
    captured = {}
    hook = model.classifier[module_index].register_forward_hook(
        lambda module, inputs, output: captured.setdefault("out", output)
    )
    with torch.inference_mode():
        model(batch)
    hook.remove()
    return captured["out"].numpy()


def _ours(embedder, images: list[bytes]) -> np.ndarray:
    return embedder(torch.stack([decode_image(d, embedder.preprocessing)[0] for d in images]))


@pytest.mark.parametrize("layer,module_index", [("fc7", 5), ("fc6", 2)])
def test_matches_torchvision_reference_pipeline(weights, layer, module_index):
    images = [p.read_bytes() for p in EXAMPLES] + [jpeg_bytes(s, (200, 150)) for s in range(6)]
    ours = _ours(Embedder(weights, layer, device="cpu"), images)
    reference = _reference(weights, images, module_index)
    assert ours.shape == reference.shape == (len(images), 4096)
    cosine = (ours * reference).sum(1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosine.min() >= 0.995, cosine
    # The bound means something: different images are further apart than that.
    unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    assert (unit @ unit.T)[np.triu_indices(len(unit), 1)].min() < 0.95


def test_pool5_is_the_flattened_feature_map(weights):
    model = alexnet(weights=None)
    model.load_state_dict(weights.state_dict)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    embedder = Embedder(weights, "pool5", device="cpu")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    normalised = (images.float() / 255 - mean) / std
    with torch.inference_mode():
        expected = torch.flatten(model.eval().avgpool(model.features(normalised)), 1)
    np.testing.assert_allclose(embedder(images), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_random_weights_are_seeded_and_recorded():
    assert load_weights("random").sha256 == load_weights("random:0").sha256
    assert load_weights("random:1").sha256 != load_weights("random:0").sha256
    assert Embedder(load_weights("random:3"), device="cpu").provenance.weights == "random:3"


def test_weight_files_are_checked_by_the_hash_in_their_name(tmp_path, weights):
    good = tmp_path / "alexnet-test.pth"
    torch.save(weights.state_dict, good)
    loaded = load_weights(str(good))
    assert loaded.spec == str(good) and len(loaded.sha256) == 64
    named = tmp_path / f"alexnet-{loaded.sha256[:8]}.pth"
    good.rename(named)
    assert load_weights(str(named)).sha256 == loaded.sha256
    wrong = tmp_path / "alexnet-deadbeef.pth"
    named.rename(wrong)
    with pytest.raises(WeightsError, match="does not match the deadbeef in its name"):
        load_weights(str(wrong))
    other = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(2)}, other)
    with pytest.raises(WeightsError, match="not a torchvision AlexNet state dict"):
        load_weights(str(other))
    with pytest.raises(WeightsError, match="no such file"):
        load_weights(str(tmp_path / "missing.pth"))


def test_missing_imagenet_weights_offline_name_the_three_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):  # the outside world: no network
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as raised:
        load_weights("imagenet")
    message = str(raised.value)
    assert "alexnet-owt-7be5be79.pth" in message and str(tmp_path) in message
    assert "--weights /path/to/" in message and "--weights random" in message


def test_matching_embedder_checks_recorded_weights(weights):
    provenance = Embedder(weights, device="cpu").provenance
    assert Embedder.matching(provenance, device="cpu").weights.sha256 == weights.sha256
    tampered = provenance.model_copy(update={"weights_sha256": "f" * 64})
    with pytest.raises(ProvenanceMismatch, match="sha256 here is"):
        Embedder.matching(tampered, device="cpu")


def test_embed_bytes_reports_undecodable_images(weights):
    vectors, errors = Embedder(weights, device="cpu").embed_bytes([jpeg_bytes(1), b"nope"])
    assert errors[0] is None and errors[1].startswith("not an image")
    assert vectors.shape == (2, 4096) and vectors[0].any() and not vectors[1].any()
