"""The options of `fc7 extract`: one validated model, also the command line."""

from __future__ import annotations

from typing import Literal

from pydantic import PositiveInt, field_validator, model_validator

from pipeline.config import Device, JobConfig, Size, option
from pipeline.decode import DEFAULT_MAX_PIXELS
from pipeline.errors import ConfigError
from pipeline.fs import normalize_source
from pipeline.model import parse_weights_spec
from pipeline.provenance import DEFAULT_MODEL, MODEL_LAYERS, check_layer


class ExtractConfig(JobConfig):
    """Options of `fc7 extract` (and `jobs/extract.py`, `configs/extract.yaml`)."""

    source: str = option(
        help="folder of images, or a .txt/.csv/.parquet manifest (local path or s3://, gs:// "
        "URI)",
        positional=True,
    )
    out: str = option(help="output folder or URI for the Parquet dataset")
    weights: str = option(
        "imagenet",
        "'imagenet' (torch hub cache, downloaded if missing), 'random' or 'random:SEED' (a "
        "seeded smoke test), or a .pth state dict",
    )
    model: Literal[tuple(MODEL_LAYERS)] = option(  # type: ignore[valid-type]
        DEFAULT_MODEL,
        "torchvision network, each with its own layers, ImageNet weights and preprocessing",
    )
    layer: str | None = option(
        None,
        "layer to output; none means the model's first: alexnet fc7, fc6 (4096-d), pool5 "
        "(9216-d); vgg16 fc7, fc6 (4096-d), pool5 (25088-d); resnet50 avgpool (2048-d), layer4 "
        "(100352-d); efficientnet_b0 avgpool (1280-d)",
    )
    batch_size: PositiveInt = option(64, "images per model call", metavar="N")
    device: Device = option("auto", "auto (CUDA if any), cpu or cuda (gpu is an alias)")
    dtype: Literal["float32", "float16"] = option("float32", "stored vector type")
    precision: Literal["auto", "fp32", "fp16", "int8"] = option(
        "auto",
        "model arithmetic: auto (fp16 on GPU, fp32 on CPU), fp32 (exact), fp16 (GPU only), or "
        "int8 (CPU, ONNX Runtime, calibrated on your images and checked against fp32; a "
        "different feature space from fp32)",
    )
    runner: Literal["auto", "local", "ray"] = option(
        "auto",
        "auto: in this process when no cluster is given and one worker would do (or the job is "
        "small), else Ray; local: always in this process; ray: always on Ray",
    )
    limit: PositiveInt | None = option(None, "embed only the first N images", metavar="N")
    num_workers: PositiveInt | None = option(
        None, "model replicas (Ray actors); none means one per GPU, or one per 8 CPUs",
        metavar="N",
    )
    cpus_per_worker: PositiveInt | None = option(
        None, "CPUs (threads) per replica; none means all CPUs per GPU, or up to 8", metavar="N"
    )
    shard_size: PositiveInt = option(256, "images per output part file", metavar="N")
    max_pixels: PositiveInt = option(
        DEFAULT_MAX_PIXELS,
        "refuse images larger than this (width x height, read from the header before decoding)",
        metavar="N",
    )
    # Sizes as a user writes them, so that --help shows "512MiB"; validated into bytes.
    max_bytes: Size = option(
        "512MiB",
        "refuse files larger than this, e.g. 512MiB (only regular files are read: never devices "
        "or FIFOs)",
        metavar="SIZE",
        validate_default=True,
    )
    decode_memory: Size = option(
        "2GiB",
        "memory the decodes of one worker may hold at once, e.g. 2GiB; an image that needs more "
        "is an error row",
        metavar="SIZE",
        validate_default=True,
    )
    int8_calibration_images: PositiveInt = option(
        128, "int8: images of the collection the quantisation is calibrated on", metavar="N"
    )
    int8_check_images: PositiveInt = option(
        256,
        "int8: other images embedded both ways to measure the int8 model against fp32",
        metavar="N",
    )
    int8_min_cosine: float = option(
        0.99, "int8: refuse a model whose mean cosine to fp32 is below this", metavar="X",
        ge=0, le=1,
    )
    int8_min_overlap: float = option(
        0.9,
        "int8: refuse a model whose mean top-10 neighbour overlap with fp32 is below this",
        metavar="X", ge=0, le=1,
    )
    overwrite: bool = option(
        False,
        "replace an fc7 output made with other settings; deletes only the files fc7 wrote there",
    )
    dry_run: bool = option(
        False,
        "write the plan and sum it up (images, shards, labels, bytes, workers, an estimated "
        "time from a few images embedded here) without embedding; a run without it reuses "
        "the plan",
    )

    @field_validator("weights")
    @classmethod
    def _normalise_weights(cls, value: str) -> str:
        return parse_weights_spec(value)

    @field_validator("source", "out")
    @classmethod
    def _normalise_location(cls, value: str) -> str:
        return normalize_source(value)

    @model_validator(mode="after")
    def _layer_of_the_model(self) -> ExtractConfig:
        try:
            _, self.layer = check_layer(self.model, self.layer)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return self

    @model_validator(mode="after")
    def _dry_run_deletes_nothing(self) -> ExtractConfig:
        # A dry run writes its plan, and with --overwrite that plan would replace (delete) the
        # embeddings already in --out: a preview must not destroy what it previews.
        if self.dry_run and self.overwrite:
            raise ValueError(
                "--dry-run --overwrite: the dry run writes its plan into --out, which would "
                "delete the output there; dry-run into a new --out, or run --overwrite without "
                "--dry-run"
            )
        return self
