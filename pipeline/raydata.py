"""fc7 inside your own Ray Data pipeline: `FC7Embedder` for `Dataset.map_batches`.

    ds = ray.data.read_binary_files("photos/", include_paths=True)
    ds = ds.map_batches(FC7Embedder, fn_constructor_kwargs={"weights": "imagenet"},
                        compute=ray.data.ActorPoolStrategy(size=2), batch_size=256,
                        batch_format="pyarrow")

Each actor loads the model once. A batch keeps its columns (`path`, ...) and gains the columns
`fc7 extract` writes, with the same Arrow types: `embedding` (`fixed_size_list<float>[dim]`,
null on failure), `error`, `sha256`, `width`, `height`. The image column itself is dropped
(`keep_images=True` keeps it). The provenance is `FC7Embedder.provenance` and also the
`fc7.provenance` key of every returned batch's schema metadata, which `write_parquet` keeps.

What a batch may hold, in this order of preference:
- `bytes`: encoded files (`read_binary_files`); decoded and preprocessed exactly as `fc7
  extract` does on the CPU, with the same error rows and the same `sha256` of the bytes.
- `image`: decoded arrays, (height, width, 3) or (height, width) uint8 (`read_images(...,
  mode="RGB")`); resized and cropped as `fc7 extract` does after its decode. Ray's decoder does
  not apply EXIF orientation, so rotated photos differ from `fc7 extract`; `sha256` is null.
- `path` alone: files that the embedder reads itself with `fc7 extract`'s checks (regular files
  only, at most `max_bytes`), so that every path becomes a row. `read_binary_files` silently
  skips dangling links, FIFOs and devices; a dataset of paths does not.

A file that cannot be embedded is a row with an `error`, never an exception.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import ValidationError, create_model
from ray.data.block import BlockAccessor, BlockType

from pipeline.config import JobConfig
from pipeline.decode import (
    DEFAULT_DECODE_MEMORY,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    check_size,
    crop,
)
from pipeline.errors import ConfigError, OutputError, SourceError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.worker import DecodedRow, decode_row, embed_rows
from pipeline.model import (
    Embedder,
    load_weights,
    make_provenance,
    parse_weights_spec,
    resolve_precision,
)
from pipeline.provenance import PARQUET_METADATA_KEY, Preprocessing, Provenance, check_layer
from pipeline.sources import DEFAULT_MAX_BYTES, InputReadError, check_file_size, read_image_bytes
from pipeline.store import build_table

if TYPE_CHECKING:
    import pandas as pd

# The input columns FC7Embedder reads, in order of preference.
INPUT_COLUMNS = ("bytes", "image", "path")
# The columns it adds, in the order (and with the types) of `fc7 extract`'s Parquet.
OUTPUT_COLUMNS = ("embedding", "error", "sha256", "width", "height")

# `fc7 extract`'s own declarations (types, defaults, limits), so the two cannot disagree.
_OPTION_NAMES = (
    "weights", "model", "layer", "device", "dtype", "precision", "batch_size", "max_pixels",
    "max_bytes", "decode_memory",
)
_Options = create_model(
    "FC7EmbedderOptions",
    __base__=JobConfig,
    **{
        name: (ExtractConfig.model_fields[name].annotation, ExtractConfig.model_fields[name])
        for name in _OPTION_NAMES
    },
)


class FC7Embedder:
    """AlexNet embeddings as a Ray Data stage: `ds.map_batches(FC7Embedder, ...)`.

    The options mirror `fc7 extract`'s (same names, defaults and checks). Give each actor CPUs
    with `num_cpus=` (Ray gives an actor one, and torch then runs one thread) or a GPU with
    `num_gpus=1` (`device="auto"` then takes it; JPEGs are still decoded on the CPU, while
    `fc7 extract` on CUDA decodes them with nvJPEG, within the tolerance `pipeline.gpu` states).

    Args:
        weights: "imagenet", "random:SEED" or the absolute path of a .pth state dict (a
            relative path is resolved in the actor's working directory).
        model: "alexnet", "vgg16", "resnet50" or "efficientnet_b0".
        layer: one of the model's layers (`pipeline.provenance.MODEL_LAYERS`); None, its
            first (AlexNet's fc7).
        device: "auto" (CUDA when the actor has a GPU), "cpu" or "cuda".
        dtype: stored vector type, "float32" or "float16".
        precision: "auto", "fp32" or "fp16" (CUDA only). int8 is refused: its model is
            calibrated on a collection by `fc7 extract --precision int8`.
        batch_size: images per model call; `map_batches(batch_size=...)` sets rows per call.
        max_pixels: refuse images with more pixels than this (from the header, before decoding).
        max_bytes: refuse files larger than this (`bytes` and `path` input), e.g. "512MiB".
        decode_memory: memory the decodes of one actor may hold at once, e.g. "2GiB".
        keep_images: keep the input's `bytes` or `image` column in the output.

    Attributes:
        provenance: what the embeddings are, as `fc7 extract` stamps it into its Parquet.

    Raises:
        ConfigError: an invalid option, int8, or fp16 / cuda without CUDA.
        WeightsError: the weights cannot be loaded.

    Example:
        >>> ds = ray.data.read_binary_files("photos/", include_paths=True)  # doctest: +SKIP
        >>> ds.map_batches(FC7Embedder, fn_constructor_kwargs={"weights": "random:0"},
        ...                compute=ray.data.ActorPoolStrategy(size=1), batch_size=64,
        ...                batch_format="pyarrow").write_parquet("embeddings/")  # doctest: +SKIP
    """

    def __init__(
        self,
        weights: str = "imagenet",
        model: str = "alexnet",
        layer: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        precision: str = "auto",
        batch_size: int = 64,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int | str = DEFAULT_MAX_BYTES,
        decode_memory: int | str = DEFAULT_DECODE_MEMORY,
        keep_images: bool = False,
    ):
        options = self.validate_options(
            weights=weights, model=model, layer=layer, device=device, dtype=dtype,
            precision=precision, batch_size=batch_size, max_pixels=max_pixels, max_bytes=max_bytes,
            decode_memory=decode_memory,
        )
        if options["precision"] == "int8":
            raise ConfigError(
                "FC7Embedder(precision='int8'): the int8 model is calibrated on a collection "
                "and checked against fp32 by fc7 extract --precision int8; FC7Embedder runs "
                "fp32 or fp16 (pass precision='auto')"
            )
        self.batch_size = options["batch_size"]
        self.max_pixels = options["max_pixels"]
        self.max_bytes = options["max_bytes"]
        self.keep_images = keep_images
        loaded = load_weights(options["weights"], options["model"])
        precision = resolve_precision(options["precision"], options["device"])
        self.provenance: Provenance = make_provenance(
            loaded, options["layer"], options["dtype"], precision=precision
        ).stamped()
        self.embedder = Embedder.matching(
            self.provenance, options["device"], options["decode_memory"], weights=loaded
        )
        # As in `fc7 extract`'s worker: decodes overlap the model, one per spare thread, and
        # one more thread reads while the others decode. Ray sets an actor's torch threads
        # from its num_cpus.
        decoders = max(1, torch.get_num_threads() - 1)
        self.decode_slots = threading.BoundedSemaphore(decoders)
        self.loader = ThreadPoolExecutor(decoders + 1, thread_name_prefix="fc7-decode")

    @staticmethod
    def validate_options(**options: Any) -> dict[str, Any]:
        """Check constructor options in the driver, before any actor starts.

        Args:
            options: any of the constructor's options except `keep_images`.

        Returns:
            The options with `fc7 extract`'s defaults filled in, sizes in bytes and the
            weights normalised (a file path made absolute here): pass them as
            `fn_constructor_kwargs`.

        Raises:
            ConfigError: an unknown option or an invalid value; the message names it.

        Example:
            >>> FC7Embedder.validate_options(weights="random", max_bytes="1MiB")["max_bytes"]
            1048576
        """
        try:
            values = _Options.model_validate(options).model_dump()
        except ValidationError as err:
            problems = [
                f"{'.'.join(map(str, item['loc']))}={item.get('input')!r}: {item['msg']}"
                for item in err.errors()
            ]
            raise ConfigError("FC7Embedder(" + "; ".join(problems) + ")") from None
        values["weights"] = parse_weights_spec(values["weights"])
        try:
            values["model"], values["layer"] = check_layer(values["model"], values["layer"])
        except ConfigError as err:
            raise ConfigError(
                f"FC7Embedder(model={values['model']!r}, layer={values['layer']!r}): {err}"
            ) from None
        return values

    def close(self) -> None:
        """Stop the decode threads (the end of a Ray actor does this for it)."""
        self.loader.shutdown(wait=True, cancel_futures=True)

    def __call__(self, batch: pa.Table | pd.DataFrame | dict[str, np.ndarray]) -> pa.Table:
        """Embed one batch of images.

        Args:
            batch: a `bytes`, `image` or `path` column (see the module's docstring) and any
                other columns, in any of Ray Data's batch formats; "pyarrow" converts least.

        Returns:
            A pyarrow Table: the batch's other columns, then `embedding`, `error`, `sha256`,
            `width`, `height` with `fc7 extract`'s types; `fc7.provenance` in its schema
            metadata.

        Raises:
            SourceError: the batch has none of the input columns.
            OutputError: the batch already has a column that FC7Embedder writes.
        """
        table = BlockAccessor.batch_to_block(batch, BlockType.ARROW)
        source = next((name for name in INPUT_COLUMNS if name in table.column_names), None)
        if source is None:
            raise SourceError(
                f"FC7Embedder: the batch has no {', '.join(INPUT_COLUMNS[:-1])} or "
                f"{INPUT_COLUMNS[-1]} column (it has "
                f"{', '.join(table.column_names) or 'none'}); read images with "
                f"ray.data.read_binary_files(..., include_paths=True) or ray.data.read_images, "
                f"or rename the column that holds them"
            )
        dropped = None if self.keep_images or source == "path" else source
        kept = [name for name in table.column_names if name != dropped]
        taken = [name for name in OUTPUT_COLUMNS if name in kept]
        if taken:
            raise OutputError(
                f"FC7Embedder: the batch already has the column(s) {', '.join(taken)}, which "
                f"FC7Embedder writes; drop or rename them first (ds.drop_columns, "
                f"ds.rename_columns)"
            )
        if source == "image":
            values = BlockAccessor.for_block(table.select([source])).to_numpy(source)
            decoded = self.loader.map(self._decode_array, values)
        else:
            read = self._decode_bytes if source == "bytes" else self._read_and_decode
            decoded = self.loader.map(read, table.column(source).to_pylist())
        embeddings, rows = embed_rows(self.embedder, decoded, table.num_rows, self.batch_size,
                                      self.provenance.dtype)
        count = table.num_rows
        added = build_table(
            self.provenance, [""] * count, [""] * count, [None] * count, embeddings,
            [row.error for row in rows], [row.sha256 for row in rows],
            [row.width for row in rows], [row.height for row in rows],
        ).select(list(OUTPUT_COLUMNS))
        metadata = dict(table.schema.metadata or {})
        metadata[PARQUET_METADATA_KEY] = self.provenance.to_json().encode()
        schema = pa.schema(
            [table.schema.field(name) for name in kept] + list(added.schema), metadata=metadata
        )
        return pa.Table.from_arrays(
            [table.column(name) for name in kept] + added.columns, schema=schema
        )

    # -- one row each; nothing here raises for a bad input --------------------------------

    def _read_and_decode(self, path: str | None) -> DecodedRow:
        if path is None:
            return DecodedRow(None, "cannot read file: the path is null")
        try:
            data = read_image_bytes(path, self.max_bytes)
        except InputReadError as err:
            return DecodedRow(None, str(err))
        return self._decode_bytes(data)

    def _decode_bytes(self, data: bytes | None) -> DecodedRow:
        if data is None:
            return DecodedRow(None, "empty file (the bytes are null)")
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            # Already in memory, but the same file gives the same row as in `fc7 extract`.
            check_file_size(len(data), self.max_bytes)
        except InputReadError as err:
            return DecodedRow(None, str(err), sha256)
        return decode_row(data, sha256, self.embedder.preprocessing, self.max_pixels,
                          self.embedder.decode_budget, self.decode_slots)

    def _decode_array(self, array: Any) -> DecodedRow:
        if not _is_image_array(array):
            shape, kind = getattr(array, "shape", None), getattr(array, "dtype", type(array))
            return DecodedRow(None, (
                f"not an image: an array of shape {shape} and type {kind}; FC7Embedder takes "
                f"(height, width, 3) or (height, width) uint8 arrays, as "
                f"ray.data.read_images(..., mode='RGB') gives"
            ))
        height, width = array.shape[:2]
        try:
            check_size(width, height, self.max_pixels)
            with self.decode_slots:
                tensor = crop_array(array, self.embedder.preprocessing)
        except ImageDecodeError as err:
            return DecodedRow(None, str(err))
        except (RuntimeError, MemoryError) as err:
            return DecodedRow(None, f"cannot decode: {type(err).__name__}: {err}")
        return DecodedRow(tensor, None, None, width, height)


def crop_array(array: np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    """A decoded (height, width, 3) or (height, width) uint8 image to the model's crop, resized
    and cropped as `decode.decode_image` does after decoding.

    Returns:
        A (3, crop, crop) uint8 tensor.

    Example:
        >>> crop_array(np.zeros((300, 400, 3), np.uint8), Preprocessing()).shape
        torch.Size([3, 224, 224])
    """
    if not array.flags.writeable:  # Ray's zero-copy batches; torch wants its own memory
        array = array.copy()
    tensor = torch.from_numpy(array)
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return crop(tensor, preprocessing)


def _is_image_array(array: Any) -> bool:
    return (
        isinstance(array, np.ndarray)
        and array.dtype == np.uint8
        and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3)))
        and min(array.shape[:2]) > 0
    )
