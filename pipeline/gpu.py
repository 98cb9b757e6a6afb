"""JPEG decoding on the GPU for extraction on CUDA: a batch of files in, a batch of crops out.

On a GPU worker the model takes about a millisecond per image and the CPUs become the limit,
mostly in decoding. `GpuJpegDecoder.decode` gives the JPEGs of a batch to nvJPEG in one
`torchvision.io.decode_jpeg(list, device="cuda")` call and resizes and crops them on the GPU; the
CPU only reads files and parses headers. Only the encoded bytes cross the bus, several times
fewer than the pixels.

Everything the CPU path refuses from the header is refused here too (`read_header`: format,
pixels, aspect ratio), with the same reasons. The CPU path (`decode_image`) still decodes what
nvJPEG should not: other formats (PNG, WebP, ...), JPEGs in CMYK, and JPEGs with an EXIF
orientation, since torchvision applies EXIF orientation on the CPU only. Those crops are pinned
and copied to the GPU without blocking.

Usage (the extraction worker does this per model batch):

    decoder = GpuJpegDecoder(Preprocessing(), max_pixels, torch.device("cuda"), budget)
    for result in decoder.decode(list_of_file_bytes):   # aligned with the input
        result.tensor   # (3, crop, crop) uint8 on the GPU, or None and result.error says why
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.decode import (
    DEFAULT_MAX_PIXELS,
    DecodeBudget,
    ImageDecodeError,
    _oriented,
    decode_image,
    read_header,
)
from pipeline.provenance import Preprocessing

# nvJPEG holds a batch's decoded pixels at once (3 bytes each); this bounds one call's memory
# at about 0.75 GB whatever the images' sizes, so 64 phone photos never ask for 15 GB.
GPU_BATCH_PIXELS = 256_000_000


class DecodedImage(NamedTuple):
    """One input: a crop on the device, or the reason it has none; the original size."""

    tensor: torch.Tensor | None
    error: str | None
    width: int | None = None
    height: int | None = None


def gpu_decodable(image) -> bool:
    """Whether nvJPEG gives the same image as the CPU path: a JPEG in RGB or grayscale without
    an EXIF orientation to apply (`image` is a header from `read_header`)."""
    return image.format == "JPEG" and image.mode in ("RGB", "L") and not _oriented(image)


class GpuJpegDecoder:
    """Decodes batches of files into center crops on `device`, JPEGs on the GPU.

    Args:
        preprocessing: resize and crop, as for the CPU path.
        max_pixels: refuse images larger than this, from the header.
        device: the CUDA device the crops end on.
        budget: host memory for the files that take the CPU path.
    """

    def __init__(
        self,
        preprocessing: Preprocessing,
        device: torch.device,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        budget: DecodeBudget | None = None,
    ):
        self.preprocessing = preprocessing
        self.device = device
        self.max_pixels = max_pixels
        self.budget = budget

    def decode(self, files: list[bytes]) -> list[DecodedImage]:
        """Decode, resize and crop `files`; the result is aligned with them."""
        results: list[DecodedImage | None] = [None] * len(files)
        on_gpu: list[tuple[int, bytes, int, int]] = []  # (position, bytes, width, height)
        for position, data in enumerate(files):
            try:
                header = read_header(data, self.max_pixels)
            except ImageDecodeError as err:
                results[position] = DecodedImage(None, str(err))
                continue
            width, height = header.size
            if gpu_decodable(header):
                on_gpu.append((position, data, width, height))
            else:
                results[position] = self._on_cpu(data)
        for chunk in _chunks_by_pixels(on_gpu, GPU_BATCH_PIXELS):
            for (position, _, width, height), image in zip(
                chunk, self._decode_jpegs([data for _, data, _, _ in chunk]), strict=True
            ):
                if isinstance(image, str):
                    results[position] = DecodedImage(None, image)
                else:
                    results[position] = DecodedImage(self._crop(image), None, width, height)
        return results  # type: ignore[return-value]

    def _decode_jpegs(self, files: list[bytes]) -> list[torch.Tensor | str]:
        """nvJPEG on a batch; when the batch fails (one corrupt file fails all of them), each
        file alone, so that only the bad ones become errors."""
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass
        decoded: list[torch.Tensor | str] = []
        for one in encoded:
            try:
                decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError as err:
                decoded.append(f"corrupt or truncated JPEG: {err}")
        return decoded

    def _crop(self, image: torch.Tensor) -> torch.Tensor:
        image = F.resize(image, [self.preprocessing.resize], antialias=self.preprocessing.antialias)
        return F.center_crop(image, [self.preprocessing.crop])

    def _on_cpu(self, data: bytes) -> DecodedImage:
        try:
            tensor, width, height = decode_image(
                data, self.preprocessing, self.max_pixels, self.budget
            )
        except ImageDecodeError as err:
            return DecodedImage(None, str(err))
        except (RuntimeError, MemoryError) as err:
            return DecodedImage(None, f"cannot decode: {type(err).__name__}: {err}")
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return DecodedImage(tensor, None, width, height)


def _chunks_by_pixels(items: list[tuple[int, bytes, int, int]], limit: int):
    """Consecutive runs of `items` whose width x height sum to at most `limit` (one item may
    exceed it alone)."""
    chunk, pixels = [], 0
    for item in items:
        size = item[2] * item[3]
        if chunk and pixels + size > limit:
            yield chunk
            chunk, pixels = [], 0
        chunk.append(item)
        pixels += size
    if chunk:
        yield chunk
