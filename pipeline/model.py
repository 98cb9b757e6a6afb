"""torchvision's AlexNet cut at a layer (fc7, fc6, pool5), with its weights and provenance.

FC7 is the output of the second 4096-wide Linear layer after its ReLU: `classifier[:6]` in eval
mode (dropout off), as Caffe's in-place relu7 gave it.
"""

from __future__ import annotations

import hashlib
import re
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import AlexNet_Weights, alexnet

from pipeline.config import DEVICE_ALIASES
from pipeline.decode import (
    DEFAULT_DECODE_MEMORY,
    DEFAULT_MAX_PIXELS,
    DecodeBudget,
    ImageDecodeError,
    decode_image,
)
from pipeline.errors import ConfigError, ProvenanceMismatch, WeightsError
from pipeline.provenance import LAYER_WIDTHS, Preprocessing, Provenance, file_sha256
from pipeline.quantize import RUNTIME, Int8Session, int8_model_for, runtime_version

IMAGENET_WEIGHTS = AlexNet_Weights.IMAGENET1K_V1
# How many modules of `alexnet().classifier` each layer runs (fc7 ends after its ReLU).
_CLASSIFIER_DEPTH = {"fc7": 6, "fc6": 3, "pool5": 0}
# torch.hub's convention: a file named NAME-<sha256 prefix>.pth carries its own checksum.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.pth?$")


@dataclass(frozen=True)
class Weights:
    """A loaded AlexNet state dict and what identifies it."""

    spec: str  # what the user asked for: "imagenet", "random:0" or a file path
    sha256: str
    state_dict: dict[str, torch.Tensor]


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


def load_weights(spec: str) -> Weights:
    """Load AlexNet weights named by `spec` (see `parse_weights_spec`).

    Raises:
        WeightsError: not in the cache and not downloadable, unreadable, wrong checksum, or not
            an AlexNet state dict. The message names the ways out.
    """
    spec = parse_weights_spec(spec)
    if spec.startswith("random:"):
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
            torch.manual_seed(int(spec.partition(":")[2]))
            state_dict = alexnet(weights=None).state_dict()
        digest = hashlib.sha256()
        for name, tensor in state_dict.items():
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
        return Weights(spec, digest.hexdigest(), state_dict)
    if spec == "imagenet":
        path = _imagenet_weights_file()
    else:
        path = Path(spec)
        if not path.is_file():
            raise WeightsError(f"--weights {spec}: no such file")
    sha256 = _verified_sha256(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise WeightsError(f"--weights {path}: not a readable torch state dict ({err})") from err
    with torch.device("meta"):  # the names and shapes only, without initialising 61M weights
        expected = alexnet(weights=None).state_dict()
    if not isinstance(state_dict, dict) or set(state_dict) != set(expected):
        keys = sorted(state_dict)[:4] if isinstance(state_dict, dict) else type(state_dict)
        raise WeightsError(
            f"--weights {path}: not a torchvision AlexNet state dict (keys like {keys})"
        )
    return Weights(spec, sha256, state_dict)


def _imagenet_weights_file() -> Path:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_WEIGHTS.url).name
    if cached.is_file():
        return cached
    try:
        torch.hub.load_state_dict_from_url(IMAGENET_WEIGHTS.url, progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise WeightsError(
            f"--weights imagenet: the ImageNet AlexNet weights are not in the torch hub cache "
            f"({cached}) and could not be downloaded ({err}). Ways out: (1) copy "
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
        weights=weights.spec,
        weights_sha256=weights.sha256,
        layer=layer,
        dim=LAYER_WIDTHS[layer],
        preprocessing=preprocessing or Preprocessing(),
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
    """AlexNet up to `layer`, loaded once; call it on a uint8 batch to get embeddings.

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
        layer: str = "fc7",
        device: str = "auto",
        dtype: str = "float32",
        preprocessing: Preprocessing | None = None,
        decode_memory: int = DEFAULT_DECODE_MEMORY,
        precision: str = "auto",
        int8_model: bytes | None = None,
    ):
        if layer not in _CLASSIFIER_DEPTH:
            raise ConfigError(f"--layer {layer}: must be one of {', '.join(_CLASSIFIER_DEPTH)}")
        if (precision == "int8") != (int8_model is not None):
            raise ConfigError("precision int8 needs an int8 model, and only it (Embedder.matching)")
        self.weights = weights
        self.layer = layer
        self.dtype = dtype
        self.precision = precision
        self.preprocessing = preprocessing or Preprocessing()
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
        vectors = np.zeros((len(images), LAYER_WIDTHS[self.layer]), dtype=np.float32)
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
        weights = weights or load_weights(provenance.weights)
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


def build_network(weights: Weights, layer: str) -> nn.Sequential:
    """torchvision's AlexNet with `weights`, cut after `layer`, in eval mode, on the CPU."""
    # Built on the meta device and given the loaded tensors (assign): initialising the 61M
    # weights only to overwrite them took 0.4 s of every start.
    with torch.device("meta"):
        network = alexnet(weights=None)
    network.load_state_dict(weights.state_dict, assign=True)
    return nn.Sequential(
        network.features,
        network.avgpool,
        nn.Flatten(1),
        *network.classifier[: _CLASSIFIER_DEPTH[layer]],
    ).eval()
