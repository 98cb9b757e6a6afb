"""The options of `fc7 finetune`: one validated model, also the command line."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from pipeline.backbones import backbone
from pipeline.config import JobConfig, option
from pipeline.errors import ConfigError
from pipeline.model import parse_weights_spec

Freeze = Literal["features", "fc6", "none"]
Augment = Literal["none", "light", "strong"]
TrainPath = Literal["auto", "images", "embeddings"]

# Options that do not change the trained weights (beyond float summation order for
# num_workers, see tests/test_ray_job.py; with --dropout above 0 each worker draws its own
# dropout masks, so the worker count changes them): a resumed run may change these.
NOT_HYPERPARAMETERS = frozenset(
    {"out", "overwrite", "num_workers", "device", "max_failures", "keep_checkpoints",
     "decode_threads"}
)


class FinetuneConfig(JobConfig):
    """Options of `fc7 finetune` (and `jobs/finetune.py`, `configs/finetune.yaml`)."""

    data: str = option(
        help="labelled images: a folder of class subfolders or a manifest with a label column",
        positional=True,
        metavar="DATA",
    )
    out: str = option(help="folder for model.pt, manifest.json, curves.png and checkpoints",
                      metavar="DIR")
    model: str = option("alexnet", "torchvision model: alexnet, vgg16, resnet50, "
                        "efficientnet_b0")
    weights: str = option(
        "imagenet", "starting weights: imagenet, random:SEED, or a file (e.g. a fine-tuned "
        "model.pt)", metavar="SPEC",
    )
    freeze: Freeze = option(
        "features", "layers kept fixed: features (the convolutions), fc6 (and fc6), none"
    )
    epochs: int = option(10, "passes over the training split at most", metavar="N", ge=1)
    batch_size: int = option(
        32, "images per optimiser step, over all workers together (the global batch)",
        metavar="N", ge=1,
    )
    lr: float = option(0.01, "peak learning rate of SGD with momentum", gt=0)
    momentum: float = option(0.9, "SGD momentum", ge=0, lt=1)
    weight_decay: float = option(5e-4, "L2 penalty on the trained weights", ge=0)
    schedule: Literal["cosine", "constant"] = option(
        "cosine", "learning rate per epoch: cosine decay to 0 over --epochs, or constant"
    )
    dropout: float = option(0.5, "probability of every Dropout module of the model", ge=0,
                            lt=1)
    standardize: bool = option(
        True,
        "with frozen convolutions, train the first trained layer on standardized inputs "
        "(centred per feature and scaled to unit variance over the training split, folded back "
        "into its weights in model.pt): "
        "features far from ImageNet's, random ones above all, are tiny and nearly constant, and "
        "SGD barely moves on them",
    )
    augment: Augment = option(
        "none", "training augmentation: light (random resized crop, flip) or strong (also "
        "colour jitter)"
    )
    val_fraction: float = option(
        0.2, "share of images held out (stratified) for validation and early stopping",
        metavar="SHARE", gt=0, lt=1,
    )
    patience: int = option(
        3, "stop after this many epochs without a lower validation loss", metavar="N", ge=1
    )
    path: TrainPath = option(
        "auto", "train from images, or from --embeddings (pool5; frozen convolutions, no "
        "augmentation); auto picks embeddings when it can"
    )
    embeddings: str | None = option(
        None, "pool5 embeddings of DATA written by fc7 extract --layer pool5", metavar="EMB"
    )
    num_workers: int = option(
        1, "Ray Train workers (DDP); 0: Ray Train's local mode, in this process. The same "
        "curves for any count, except that each worker draws its own dropout masks",
        metavar="N",
        ge=0,
    )
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto", "auto: a GPU per worker if the Ray cluster has GPUs, else CPUs"
    )
    seed: int = option(0, "seed of the split, the order, the new head and dropout")
    decode_threads: int = option(4, "threads decoding the images", metavar="N", ge=1)
    max_failures: int = option(
        0, "times Ray Train restarts failed workers (each resumes from the last checkpoint)",
        metavar="N", ge=0,
    )
    keep_checkpoints: bool = option(False, "keep DIR/checkpoints once model.pt is written")
    overwrite: bool = option(
        False, "start again in --out (deletes fc7 finetune's own files there, nothing else)"
    )

    @field_validator("weights")
    @classmethod
    def _weights_spec(cls, value: str) -> str:
        try:
            return parse_weights_spec(value)
        except ConfigError as err:
            raise ValueError(str(err).removeprefix(f"--weights {value}: ")) from None

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        try:
            backbone(value)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _compatible_options(self) -> FinetuneConfig:
        try:
            backbone(self.model).frozen_prefixes(self.freeze)
        except ConfigError as err:
            raise ValueError(f"--freeze {self.freeze} --model {self.model}: {err}") from None
        if self.path == "embeddings":
            if not self.embeddings:
                raise ValueError("--path embeddings needs --embeddings EMB (fc7 extract DATA "
                                 "--layer pool5 --out EMB)")
            if reason := images_needed(self):
                raise ValueError(f"--path embeddings: {reason}; use --path images")
        if self.path == "images" and self.embeddings:
            raise ValueError("--path images ignores --embeddings: give one or the other")
        return self

    def hyperparameters(self) -> dict:
        """What a resumed run must share with the run it continues."""
        return self.model_dump(exclude=set(NOT_HYPERPARAMETERS))


def images_needed(config: FinetuneConfig) -> str | None:
    """Why the run cannot train from pool5 embeddings, or None when it can."""
    if config.freeze == "none":
        return "--freeze none trains the convolutions, which need the images"
    if config.augment != "none":
        return f"--augment {config.augment} needs the images"
    return None


def choose_path(config: FinetuneConfig) -> tuple[str, str]:
    """("images" or "embeddings", why), as printed and recorded in the manifest.

    Example:
        >>> choose_path(FinetuneConfig(data="d", out="o", augment="light"))  # doctest: +SKIP
        ('images', '--augment light needs the images')
    """
    if config.path == "images":
        return "images", "--path images"
    reason = images_needed(config)
    if reason:
        return "images", reason
    pooled = backbone(config.model).pooled
    if not config.embeddings:
        return "images", (f"no --embeddings given (fc7 extract DATA --layer {pooled} would let "
                          f"training skip decoding and the convolutions)")
    return "embeddings", (f"{pooled} from {config.embeddings}; convolutions frozen, no "
                          f"augmentation")
