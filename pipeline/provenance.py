"""What made an artifact: model, weights, layer, preprocessing, versions.

Every artifact (Parquet embeddings, FAISS index, classifier) stores a `Provenance`; a job that
combines two artifacts calls `require_compatible` and refuses to mix vectors from different
feature spaces. `schema_version` refuses data written by a newer, incompatible release.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline import __version__
from pipeline.errors import ArtifactError, ConfigError, ProvenanceMismatch

SCHEMA_VERSION = 1
PARQUET_METADATA_KEY = b"fc7.provenance"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The networks fc7 embeds with (`pipeline.backbones`), their layers (the default first, as
# `--help` lists them) and the layers' widths. Here, not in `backbones` (which imports torch), so
# that index and classifier code can check widths without loading torch.
MODEL_LAYERS = {
    "alexnet": {"fc7": 4096, "fc6": 4096, "pool5": 9216},
    "vgg16": {"fc7": 4096, "fc6": 4096, "pool5": 25088},
    "resnet50": {"avgpool": 2048, "layer4": 2048 * 7 * 7},
    "efficientnet_b0": {"avgpool": 1280},
}
DEFAULT_MODEL = "alexnet"
# EfficientNet's features end in SiLU, which dips below zero; every other layer is the output of
# a ReLU, or of pooling over ReLUs, and is never negative.
_SIGNED_LAYERS = frozenset({("efficientnet_b0", "avgpool")})
# Each model's preprocessing where it differs from AlexNet's (`Preprocessing()`): that of its
# ImageNet weights' `transforms()` (ResNet-50's IMAGENET1K_V2 resizes to 232).
_MODEL_PREPROCESSING = {
    "resnet50": {"resize": 232},
    "efficientnet_b0": {"interpolation": "bicubic"},
}


def layer_width(model: str, layer: str) -> int:
    """The width of `layer`'s flattened output.

    Raises:
        ConfigError: a model or layer fc7 does not offer.
    """
    return MODEL_LAYERS[check_layer(model, layer)[0]][layer]


def check_layer(model: str, layer: str | None) -> tuple[str, str]:
    """`(model, layer)`, with the model's default layer for None.

    Raises:
        ConfigError: a model fc7 does not offer, or a layer the model does not have.
    """
    if model not in MODEL_LAYERS:
        raise ConfigError(f"--model {model}: must be one of {', '.join(MODEL_LAYERS)}")
    layers = MODEL_LAYERS[model]
    if layer is None:
        return model, next(iter(layers))
    if layer not in layers:
        raise ConfigError(f"--layer {layer}: {model} offers {', '.join(layers)}")
    return model, layer


def is_nonnegative(model: str, layer: str) -> bool:
    """Whether every value of this layer is >= 0 (a ReLU's output), which stored data must
    respect."""
    return (model, layer) not in _SIGNED_LAYERS


# The int8 model's file name holds its sha256; here, not in `quantize` (which imports torch), so
# that index and classifier folders can name it without loading torch.
INT8_MODEL_NAME = re.compile(r"int8-[0-9a-f]{64}\.onnx")


def int8_model_name(sha256: str) -> str:
    """The file name of the int8 model with this sha256, wherever it is stored."""
    return f"int8-{sha256}.onnx"


def check_schema_version(found: Any, supported: int, where: str, fix: str) -> int:
    """The schema version `found` in an artifact, refused unless this fc7 reads it.

    Every artifact (Parquet provenance, index, ids, classifier, predictions) records an integer
    schema version; this is the one place that reads it.

    Args:
        found: the recorded value (any type: it comes from a file).
        supported: the newest version this fc7 reads (older ones are read too).
        where: the file, for the message.
        fix: what the user can do, e.g. "rebuild the index".

    Raises:
        ArtifactError: missing, not an integer, or newer than `supported`.

    Example:
        >>> check_schema_version(1, 1, "index/manifest.json", "rebuild the index")
        1
    """
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise ArtifactError(f"{where}: no valid schema version ({found!r}); {fix}")
    if found > supported:
        raise ArtifactError(
            f"{where}: written by a newer fc7 (schema {found}, this one reads {supported}); "
            f"upgrade fc7 or {fix}"
        )
    return found


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 4 MiB chunks (weights, index and model files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Preprocessing(BaseModel):
    """Image to tensor, as `AlexNet_Weights.IMAGENET1K_V1.transforms()` does it (other models:
    `preprocessing_for`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    exif_orientation: bool = True
    color: str = "RGB"
    resize: int = 256
    interpolation: str = "bilinear"
    antialias: bool = True
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def describe(self) -> str:
        return (
            f"exif-orient, {self.color}, resize {self.resize} {self.interpolation}"
            f"{' antialias' if self.antialias else ''}, center-crop {self.crop}, imagenet-norm"
        )


def preprocessing_for(model: str) -> Preprocessing:
    """The preprocessing of `model`'s ImageNet weights (also used with other weights)."""
    return Preprocessing(**_MODEL_PREPROCESSING.get(model, {}))


def _arithmetic(precision: str) -> str:
    return "int8" if precision == "int8" else "float"


class Provenance(BaseModel):
    """Provenance recorded in every artifact; see `require_compatible`."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    schema_version: int = SCHEMA_VERSION
    model: str = DEFAULT_MODEL
    weights: str
    weights_sha256: str
    # Fine-tuned weights: the weights they were trained from, oldest first, each
    # {"weights": spec, "sha256": ...} (`fc7 finetune`'s manifest.json). `weights_sha256`
    # already separates the feature spaces; this says where they came from.
    weights_chain: tuple[dict[str, str], ...] = ()
    layer: str
    dim: int
    preprocessing: Preprocessing = Preprocessing()
    dtype: str = "float32"
    package_version: str = __version__
    torch_version: str = ""
    torchvision_version: str = ""
    created_at: str = ""
    # The model's arithmetic: fp32, fp16 (autocast on CUDA) or int8 (the quantised model named
    # by its sha256, run by `runtime`). Artifacts older than these fields were fp32 or fp16.
    precision: str = "fp32"
    runtime: str = "torch"
    runtime_version: str = ""
    int8_model_sha256: str = ""
    # The int8 model measured against fp32 when it was built (see pipeline.quantize).
    int8_check: dict[str, Any] | None = None

    # Fields that define the feature space. Versions, dtype and time do not; precision does only
    # as far as int8 versus float (fp16 rounds fp32's features, int8 is another model).
    FEATURE_SPACE: ClassVar[tuple[str, ...]] = (
        "model", "weights_sha256", "layer", "dim", "preprocessing", "precision",
        "int8_model_sha256",
    )

    def stamped(self) -> Provenance:
        """A copy with `created_at` set to now (UTC)."""
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        return self.model_copy(update={"created_at": now})

    def differences(self, other: Provenance) -> list[str]:
        """Human-readable feature-space differences, empty when compatible."""
        diffs = []
        for name in self.FEATURE_SPACE:
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "precision" and _arithmetic(mine) == _arithmetic(theirs):
                continue
            if mine != theirs:
                if name == "int8_model_sha256":
                    mine, theirs = mine[:12] or "none", theirs[:12] or "none"
                elif name == "weights_sha256":
                    mine = f"{self.weights} ({mine[:12]})"
                    theirs = f"{other.weights} ({theirs[:12]})"
                elif name == "preprocessing":
                    mine, theirs = mine.describe(), theirs.describe()
                diffs.append(f"{name}: {mine} vs {theirs}")
        return diffs

    def require_compatible(
        self, other: Provenance, mine: str, theirs: str, same_dtype: bool = False, fix: str = ""
    ) -> None:
        """The one "same features" check: raise `ProvenanceMismatch` naming both artifacts
        and what differs when their feature spaces (and, if `same_dtype`, stored types) differ.

        Args:
            mine, theirs: how the message names the two artifacts.
            same_dtype: also require the same stored vector type (for files of one dataset).
            fix: what the user can do, appended to the message.
        """
        diffs = self.differences(other)
        if same_dtype and self.dtype != other.dtype:
            diffs.append(f"dtype: {self.dtype} vs {other.dtype}")
        if diffs:
            raise ProvenanceMismatch(
                f"{theirs} was made with different features than {mine}: " + "; ".join(diffs)
                + (f"; {fix}" if fix else "")
            )

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Provenance:
        """Parse stored provenance; `where` names the artifact in error messages.

        Raises:
            ArtifactError: not valid provenance, or written by a newer schema version.
        """
        try:
            data = json.loads(text)
        except (ValueError, TypeError) as err:
            raise ArtifactError(f"{where}: provenance is not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: provenance is not a JSON object")
        check_schema_version(data.get("schema_version"), SCHEMA_VERSION, where, "re-extract")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ArtifactError(f"{where}: provenance is invalid: {err}") from err
