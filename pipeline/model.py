"""A torchvision network cut at a layer, with its weights and provenance.

AlexNet by default (fc7, fc6, pool5), or another of `pipeline.backbones`. FC7 is the output of
the second 4096-wide Linear layer after its ReLU: `classifier[:6]` in eval mode (dropout off),
as Caffe's in-place relu7 gave it.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from pipeline.backbones import Backbone, backbone
from pipeline.config import DEVICE_ALIASES
from pipeline.decode import (
    DEFAULT_DECODE_MEMORY,
    DEFAULT_MAX_PIXELS,
    DecodeBudget,
    ImageDecodeError,
    decode_image,
)
from pipeline.errors import ConfigError, ProvenanceMismatch, WeightsError
from pipeline.provenance import (
    DEFAULT_MODEL,
    Preprocessing,
    Provenance,
    check_layer,
    file_sha256,
    layer_width,
    preprocessing_for,
)
from pipeline.quantize import RUNTIME, Int8Session, int8_model_for, runtime_version

IMAGENET_WEIGHTS = backbone(DEFAULT_MODEL).imagenet
# What `fc7 finetune` writes next to its model.pt: the weights it started from.
FINETUNE_KIND = "fc7.finetune"
# torch.hub's convention: a file named NAME-<sha256 prefix>.pth carries its own checksum.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.pth?$")


@dataclass(frozen=True)
class Weights:
    """A loaded state dict of one of `pipeline.backbones` and what identifies it."""

    spec: str  # what the user asked for: "imagenet", "random:0" or a file path
    sha256: str
    state_dict: dict[str, torch.Tensor]
    model: str = DEFAULT_MODEL
    # The head's width: 1000 for ImageNet, the classes of a fine-tuned model.
    num_classes: int = 1000
    # Fine-tuned weights: the weights they were trained from, oldest first.
    chain: tuple[dict[str, str], ...] = ()

    @property
    def backbone(self) -> Backbone:
        return backbone(self.model)


def parse_weights_spec(spec: str) -> str:
    """Normalise a `--weights` value: "imagenet", "random:SEED" or an absolute file path.

    Raises:
        ConfigError: a random seed that is not an integer.
    """
    if spec == "imagenet":
        return spec
    if spec == "random" or spec.startswith("random:"):
        seed = spec.partition(":")[2] or "0"
        if not seed.lstrip("-").isdigit():
            raise ConfigError(f"--weights {spec}: the seed after 'random:' must be an integer")
        return f"random:{int(seed)}"
    return str(Path(spec).expanduser().resolve())


def load_weights(spec: str, model: str = DEFAULT_MODEL) -> Weights:
    """Load `model`'s weights named by `spec` (see `parse_weights_spec`).

    A file may be a fine-tuned network (`fc7 finetune`'s model.pt): its head has another width,
    and the manifest.json beside it names the weights it was trained from (`Weights.chain`).

    Raises:
        ConfigError: a model fc7 does not offer.
        WeightsError: not in the cache and not downloadable, unreadable, wrong checksum, or not
            a state dict of `model`. The message names the ways out.
    """
    spec = parse_weights_spec(spec)
    network = backbone(model)
    if spec.startswith("random:"):
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
            torch.manual_seed(int(spec.partition(":")[2]))
            state_dict = network.build().state_dict()
        digest = hashlib.sha256()
        for name, tensor in state_dict.items():
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
        return Weights(spec, digest.hexdigest(), state_dict, model)
    if spec == "imagenet":
        path = _imagenet_weights_file(network)
    else:
        path = Path(spec)
        if not path.is_file():
            raise WeightsError(f"--weights {spec}: no such file")
    sha256 = _verified_sha256(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise WeightsError(f"--weights {path}: not a readable torch state dict ({err})") from err
    with torch.device("meta"):  # the names and shapes only, without initialising the weights
        expected = network.build().state_dict()
    if not isinstance(state_dict, dict) or set(state_dict) != set(expected):
        keys = sorted(state_dict)[:4] if isinstance(state_dict, dict) else type(state_dict)
        raise WeightsError(
            f"--weights {path}: not a torchvision {model} state dict (keys like {keys}); "
            f"pass --model to name the network it belongs to"
        )
    head = state_dict[f"{network.head}.weight"]
    return Weights(spec, sha256, state_dict, model, head.shape[0], _chain(path, model, sha256))


def _chain(path: Path, model: str, sha256: str) -> tuple[dict[str, str], ...]:
    """The weights a fine-tuned file was trained from, read from its manifest.json."""
    manifest_path = path.parent / "manifest.json"
    if not manifest_path.is_file():
        return ()
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as err:
        raise WeightsError(f"{manifest_path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("kind") != FINETUNE_KIND:
        return ()  # another tool's manifest: the file is plain weights
    if manifest.get("model") != model:
        raise WeightsError(
            f"--weights {path}: fine-tuned from {manifest.get('model')}, not {model}; pass "
            f"--model {manifest.get('model')}"
        )
    if manifest.get("model_sha256") not in (None, sha256):
        raise WeightsError(
            f"--weights {path}: its sha256 {sha256[:12]}... is not the {manifest_path.name}'s "
            f"{str(manifest['model_sha256'])[:12]}...: the file was replaced or is corrupt"
        )
    base = manifest.get("base_weights") or {}
    return (*base.get("chain", ()), {"weights": base.get("weights", ""),
                                     "sha256": base.get("sha256", "")})


def _imagenet_weights_file(network: Backbone) -> Path:
    url = network.imagenet.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if cached.is_file():
        return cached
    try:
        torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise WeightsError(
            f"--weights imagenet: the ImageNet {network.name} weights are not in the torch hub "
            f"cache ({cached}) and could not be downloaded ({err}). Ways out: (1) copy "
            f"{cached.name} into {cached.parent} (or set TORCH_HOME); (2) pass "
            f"--weights /path/to/{cached.name}; (3) pass --weights random for a smoke test."
        ) from err
    return cached


def _verified_sha256(path: Path) -> str:
    sha256 = file_sha256(path)
    match = _HASH_IN_NAME.search(path.name)
    if match and not sha256.startswith(match.group(1)):
        raise WeightsError(
            f"{path}: sha256 {sha256[:12]}... does not match the {match.group(1)} in its name: "
            f"the file is corrupt or truncated; delete it and download it again"
        )
    return sha256


def make_provenance(
    weights: Weights,
    layer: str,
    dtype: str,
    preprocessing: Preprocessing | None = None,
    precision: str = "fp32",
) -> Provenance:
    """The provenance of embeddings made with these weights, layer, dtype, preprocessing and
    precision (as `resolve_precision` returns it). An int8 provenance names no model yet:
    `pipeline.extract.calibrate.prepare_int8` builds it and records its sha256."""
    return Provenance(
        model=weights.model,
        weights=weights.spec,
        weights_sha256=weights.sha256,
        weights_chain=weights.chain,
        layer=layer,
        dim=layer_width(weights.model, layer),
        preprocessing=preprocessing or preprocessing_for(weights.model),
        dtype=dtype,
        torch_version=torch.__version__,
        torchvision_version=torchvision.__version__,
        precision=precision,
        runtime=RUNTIME if precision == "int8" else "torch",
        runtime_version=runtime_version() if precision == "int8" else torch.__version__,
    )


def resolve_precision(precision: str, device: str) -> str:
    """`--precision` for `--device`: `auto` is fp16 on CUDA and fp32 on the CPU.

    Returns:
        "fp32", "fp16" or "int8".

    Raises:
        ConfigError: fp16 on the CPU (torch has no fast fp16 there), or int8 on CUDA (the int8
            model runs in ONNX Runtime on the CPU).

    Example:
        >>> resolve_precision("auto", "cpu")
        'fp32'
    """
    if precision not in ("auto", "fp32", "fp16", "int8"):
        raise ConfigError(f"--precision {precision}: must be auto, fp32, fp16 or int8")
    if precision == "int8":
        if DEVICE_ALIASES.get(device, device).startswith("cuda"):
            raise ConfigError(
                f"--precision int8 --device {device}: the int8 model runs in ONNX Runtime on "
                f"the CPU; pass --device cpu, or --precision auto to use the GPU"
            )
        return "int8"
    on_gpu = resolve_device(device).type == "cuda"
    if precision == "fp16" and not on_gpu:
        raise ConfigError(
            f"--precision fp16 --device {device}: fp16 runs on CUDA only; pass --precision "
            f"fp32 (or int8 for speed on the CPU)"
        )
    if precision == "auto":
        return "fp16" if on_gpu else "fp32"
    return precision


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when available, else CPU.

    Raises:
        ConfigError: `cuda` asked for on a machine without CUDA.
    """
    device = DEVICE_ALIASES.get(device, device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


class Embedder:
    """A network (AlexNet by default) up to `layer`, loaded once; call it on a uint8 batch to
    get embeddings.

    `precision` fp32 runs torch in fp32; fp16 and auto autocast to fp16 on CUDA (fp32 on the
    CPU); int8 runs `int8_model` (serialised ONNX, see `pipeline.quantize`) in ONNX Runtime on
    the CPU. `Embedder.matching` finds that model for an int8 artifact.

    Example:
        >>> embedder = Embedder(load_weights("random:0"), layer="fc7")
        >>> embedder(torch.zeros(2, 3, 224, 224, dtype=torch.uint8)).shape
        (2, 4096)
    """

    def __init__(
        self,
        weights: Weights,
        layer: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        preprocessing: Preprocessing | None = None,
        decode_memory: int = DEFAULT_DECODE_MEMORY,
        precision: str = "auto",
        int8_model: bytes | None = None,
    ):
        _, layer = check_layer(weights.model, layer)  # None: the model's default layer
        if (precision == "int8") != (int8_model is not None):
            raise ConfigError("precision int8 needs an int8 model, and only it (Embedder.matching)")
        self.weights = weights
        self.layer = layer
        self.dtype = dtype
        self.precision = precision
        self.preprocessing = preprocessing or preprocessing_for(weights.model)
        # Shared by every thread that decodes for this model (decode pool, server requests).
        self.decode_budget = DecodeBudget(decode_memory)
        self.session: Int8Session | None = None
        self.int8_provenance: Provenance | None = None
        self.network: nn.Module | None = None
        if int8_model is not None:
            # ONNX Runtime on the CPU whatever `device` says: a server whose index is on the GPU
            # still embeds its queries here. Extraction refuses int8 on CUDA up front.
            self.device = torch.device("cpu")
            self.session = Int8Session(int8_model)
        else:
            self.device = resolve_device(device)
            self.network = build_network(weights, layer).to(
                self.device, memory_format=torch.channels_last
            )
        # (x / 255 - mean) / std as one multiply-add on the raw 0..255 values.
        shape = (1, 3, 1, 1)
        mean = torch.tensor(self.preprocessing.mean).view(shape)
        std = torch.tensor(self.preprocessing.std).view(shape)
        self.scale = (1 / (255 * std)).to(self.device)
        self.shift = (-mean / std).to(self.device)

    @property
    def dim(self) -> int:
        """The width of the embeddings."""
        return layer_width(self.weights.model, self.layer)

    @property
    def provenance(self) -> Provenance:
        """What this embedder makes; for an int8 model, the provenance `matching` found it by
        (which names the model), else one without the model's sha256."""
        if self.int8_provenance is not None:
            return self.int8_provenance
        precision = "fp32" if self.precision == "auto" else self.precision
        return make_provenance(self.weights, self.layer, self.dtype, self.preprocessing, precision)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (batch, 3, crop, crop) to the model's float input, on the CPU, NCHW."""
        return images.float().mul_(self.scale.cpu()).add_(self.shift.cpu()).contiguous()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """Embed a (batch, 3, crop, crop) uint8 tensor; returns a (batch, dim) float32 array."""
        if self.session is not None:
            return self.session(self.normalise(images).numpy())
        on_gpu = self.device.type == "cuda"
        # uint8 travels and is reordered (4x less memory traffic than float), then one float
        # copy normalised in place: this is 5% of the CPU time per image, not 15%.
        if on_gpu and not images.is_cuda:
            images = images.pin_memory()  # so that the copy below does not block the host
        images = images.to(self.device, non_blocking=on_gpu)
        images = images.contiguous(memory_format=torch.channels_last).float()
        images = images.mul_(self.scale).add_(self.shift)
        autocast = on_gpu and self.precision != "fp32"
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            features = self.network(images)
        return features.float().cpu().numpy()

    def embed_bytes(
        self, images: list[bytes], max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> tuple[np.ndarray, list[str | None]]:
        """Decode and embed encoded images, e.g. files given to a query.

        Returns:
            (embeddings of shape (len(images), dim) with zero rows for failures, and per image
            None or the reason it could not be decoded).
        """
        tensors, errors = [], []
        for data in images:
            try:
                decoded = decode_image(data, self.preprocessing, max_pixels, self.decode_budget)
                tensors.append(decoded[0])
                errors.append(None)
            except ImageDecodeError as err:
                errors.append(str(err))
        vectors = np.zeros((len(images), self.dim), dtype=np.float32)
        if tensors:
            ok = [i for i, error in enumerate(errors) if error is None]
            vectors[ok] = self(torch.stack(tensors))
        return vectors, errors

    @classmethod
    def matching(
        cls,
        provenance: Provenance,
        device: str = "auto",
        decode_memory: int = DEFAULT_DECODE_MEMORY,
        weights: Weights | None = None,
        model_dirs: tuple[str, ...] = (),
    ) -> Embedder:
        """The embedder that made artifacts with `provenance`, its weights checked by sha256.

        Args:
            weights: already loaded weights (saves loading them again); checked all the same.
            model_dirs: folders (local or URI) besides the cache where a derived model file
                named by the provenance (the int8 model) may be found.

        Raises:
            WeightsError: the recorded weights cannot be loaded here.
            ProvenanceMismatch: the weights found here differ from the recorded ones.
            ArtifactError: an int8 provenance whose model is in neither the cache nor
                `model_dirs`, or names no model (an extraction stopped before it was built).
            ConfigError: an int8 provenance and `device` cuda.
        """
        weights = weights or load_weights(provenance.weights, provenance.model)
        if weights.model != provenance.model:
            raise ProvenanceMismatch(
                f"weights {weights.spec} are {weights.model}'s, the artifact was made with "
                f"{provenance.model}"
            )
        if weights.sha256 != provenance.weights_sha256:
            raise ProvenanceMismatch(
                f"weights {provenance.weights}: sha256 here is {weights.sha256[:12]}..., the "
                f"artifact was made with {provenance.weights_sha256[:12]}..."
            )
        int8_model = int8_model_for(provenance, tuple(model_dirs))
        embedder = cls(
            weights,
            provenance.layer,
            device,
            provenance.dtype,
            provenance.preprocessing,
            decode_memory=decode_memory,
            precision=provenance.precision,
            int8_model=int8_model,
        )
        if int8_model is not None:
            embedder.int8_provenance = provenance
        return embedder


def full_network(weights: Weights) -> nn.Module:
    """The whole torchvision network with `weights` (its head included), in eval mode, on the
    CPU."""
    # Built on the meta device and given the loaded tensors (assign): initialising the weights
    # only to overwrite them took 0.4 s of every start (AlexNet's 61M).
    with torch.device("meta"):
        network = weights.backbone.build(weights.num_classes)
    network.load_state_dict(weights.state_dict, assign=True)
    return network.eval()


def build_network(weights: Weights, layer: str) -> nn.Sequential:
    """The network with `weights`, cut after `layer`, in eval mode, on the CPU."""
    return weights.backbone.cut(full_network(weights), layer)
