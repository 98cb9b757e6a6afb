import io
import urllib.error

import numpy as np
import pytest
import torch
from conftest import REPO, jpeg_bytes
from PIL import Image
from torchvision.models import alexnet

from pipeline.backbones import BACKBONES
from pipeline.decode import decode_image
from pipeline.errors import ConfigError, ProvenanceMismatch, WeightsError
from pipeline.model import Embedder, load_weights
from pipeline.provenance import MODEL_LAYERS, layer_width

EXAMPLES = sorted((REPO / "examples/images").rglob("*.jpg"))


@pytest.fixture(scope="module")
def weights():
    return load_weights("random:0")


# For every model and layer fc7 offers, the module of the stock torchvision network whose
# (flattened) output that layer is, by torchvision's module names.
REFERENCE_MODULES = {
    "alexnet": {"fc7": "classifier.5", "fc6": "classifier.2", "pool5": "avgpool"},
    "vgg16": {"fc7": "classifier.4", "fc6": "classifier.1", "pool5": "avgpool"},
    "resnet50": {"avgpool": "avgpool", "layer4": "layer4"},
    "efficientnet_b0": {"avgpool": "avgpool"},
}


def _reference(weights, images: list[bytes]) -> dict[str, np.ndarray]:
    """torchvision's plain pipeline: PIL, the ImageNet weights' own transforms, the stock
    network, and forward hooks on the modules whose outputs are the layers."""
    network = BACKBONES[weights.model]
    model = network.build()
    model.load_state_dict(weights.state_dict)
    model.eval()
    transform = network.imagenet.transforms()
    batch = torch.stack([transform(Image.open(io.BytesIO(d)).convert("RGB")) for d in images])
    captured = {}

    def capture(layer):
        def hook(module, inputs, output) -> None:  # None: the output goes on unchanged
            captured[layer] = torch.flatten(output, 1).clone()
        return hook

    for layer, module in REFERENCE_MODULES[weights.model].items():
        model.get_submodule(module).register_forward_hook(capture(layer))
    with torch.inference_mode():
        model(batch)
    return {layer: output.numpy() for layer, output in captured.items()}


def _ours(embedder, images: list[bytes]) -> np.ndarray:
    return embedder(torch.stack([decode_image(d, embedder.preprocessing)[0] for d in images]))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_every_model_and_layer_has_a_reference():
    assert {model: set(layers) for model, layers in REFERENCE_MODULES.items()} == {
        model: set(layers) for model, layers in MODEL_LAYERS.items()
    }


@pytest.mark.parametrize("model", list(MODEL_LAYERS))
def test_matches_torchvision_reference_pipeline(model):
    """Every layer of every model, against torchvision's own preprocessing and network."""
    weights = load_weights("random:0", model)
    # VGG16 costs 15 GFLOPs an image: a few images there, more for the light networks.
    extra = 2 if model == "vgg16" else 6
    images = [p.read_bytes() for p in EXAMPLES[::2]] + [
        jpeg_bytes(s, (200, 150)) for s in range(extra)
    ]
    reference = _reference(weights, images)
    for layer in MODEL_LAYERS[model]:
        ours = _ours(Embedder(weights, layer, device="cpu"), images)
        assert ours.shape == reference[layer].shape == (len(images), layer_width(model, layer))
        cosine = _cosines(ours, reference[layer])
        assert cosine.min() >= 0.995, (model, layer, cosine)
    # The bound means something: different images are further apart than that (at the layer
    # furthest from the pixels).
    unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    assert (unit @ unit.T)[np.triu_indices(len(unit), 1)].min() < 0.95


def test_weights_of_another_model_are_refused_naming_the_model(tmp_path, weights):
    path = tmp_path / "alexnet.pth"
    torch.save(weights.state_dict, path)
    with pytest.raises(WeightsError, match="not a torchvision resnet50 state dict"):
        load_weights(str(path), "resnet50")
    with pytest.raises(ConfigError, match="--layer fc7: efficientnet_b0 offers avgpool$"):
        Embedder(load_weights("random:0", "efficientnet_b0"), "fc7", device="cpu")
    with pytest.raises(ConfigError, match="--model resnet: must be one of alexnet, vgg16"):
        load_weights("random:0", "resnet")


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
    with pytest.raises(WeightsError, match="not a torchvision alexnet state dict"):
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


# Not vgg16: after pool5 its rest is its whole classifier, as AlexNet's is (the same code), and
# building its 138M random weights costs seconds of a suite at its time limit.
@pytest.mark.parametrize("model", [model for model in MODEL_LAYERS if model != "vgg16"])
def test_the_rest_of_the_network_after_the_pooled_layer_gives_its_logits(model):
    """Fine-tuning from stored embeddings runs `rest` on what `cut` gave: together they are
    the stock network; and with frozen convolutions, what trains is exactly `rest`."""
    network = BACKBONES[model]
    stock = network.build(num_classes=5).eval()
    # Small images: the adaptive pooling makes any size >= 32 a valid input.
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = stock(images)
        pooled = network.cut(stock, network.pooled)(images)
        np.testing.assert_allclose(network.rest(stock, network.pooled)(pooled), expected,
                                   rtol=1e-5, atol=1e-5)
    frozen = network.frozen_prefixes("features")
    trained = [p for name, p in stock.named_parameters() if not name.startswith(frozen)]
    rest = list(network.rest(stock, network.pooled).parameters())
    assert {id(p) for p in trained} == {id(p) for p in rest}
    assert stock.get_submodule(network.head).weight.shape[0] == 5
