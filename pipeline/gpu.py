"""JPEG decoding on the GPU for extraction on CUDA: a batch of files in, a batch of crops out.

On a GPU worker the model takes about a millisecond per image and the CPUs become the limit,
mostly in decoding. `GpuJpegDecoder.decode` gives the JPEGs of a batch to nvJPEG in one
`torchvision.io.decode_jpeg(list, device="cuda")` call and resizes and crops them on the GPU
(images of one size in one call); the CPU only reads files and parses headers. Only the encoded
bytes cross the bus, several times fewer than the pixels.

Which file goes where (`route`):
- refused from the header exactly as on the CPU path (`read_header`: format, pixels, aspect
  ratio), with the same reasons;
- the GPU: JPEGs in RGB or grayscale, without an EXIF orientation, that end with the JPEG end
  marker;
- the CPU path (`decode_image`, pinned, then copied without blocking): everything else.
  Other formats (PNG, WebP, ...) and CMYK JPEGs, which nvJPEG does not decode as Pillow does.
  JPEGs with an EXIF orientation, since `decode_jpeg(..., device="cuda")` ignores
  `apply_exif_orientation` (torchvision 0.29: the CUDA branch calls `decode_jpegs_cuda(input,
  mode, device)` without it). And JPEGs that do not end with the end marker: truncated
  downloads, which nvJPEG's batched hardware decoder may turn into grey-bottomed images
  without an error, where libjpeg-turbo raises, and files with data appended after the image.

One corrupt JPEG fails a whole nvJPEG batch; the batch is then decoded one file at a time, so
only that file becomes an error row ("corrupt or truncated JPEG: ...", as on the CPU path). A
file that runs out of GPU memory alone goes to the CPU path.

Memory: host memory for the CPU path is the `DecodeBudget`'s, as everywhere. On the GPU, nvJPEG
holds a batch's pixels at once and the resize a float copy of one size group, so one call is
bounded by `GPU_BATCH_PIXELS` source pixels (about 3 GB at most); `max_pixels` bounds one file.
Crops are released by the caller once embedded; PyTorch's caching allocator keeps the freed
blocks for the next batch.

Threads and streams: nvJPEG runs under one process-wide lock in torchvision, so decodes from
several threads take turns; each call's output is ready on the calling thread's current CUDA
stream (torchvision records an event on its decoder stream and makes the current stream wait).
Model replicas in threads, each under `torch.cuda.stream(...)`, thus overlap one replica's
decode with another's model (`bench/gpu_check.sh` measures whether that pays).

Usage (the extraction worker does this per model batch):

    decoder = GpuJpegDecoder(Preprocessing(), torch.device("cuda"), max_pixels, budget, pool)
    for result in decoder.decode(list_of_file_bytes):   # aligned with the input
        result.tensor   # (3, crop, crop) uint8 on the GPU, or None and result.error says why
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor
from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.decode import (
    DEFAULT_MAX_PIXELS,
    DecodeBudget,
    ImageDecodeError,
    decode_image,
    has_exif_orientation,
    interpolation,
    read_header,
)
from pipeline.provenance import Preprocessing

# nvJPEG holds a batch's decoded pixels at once (3 bytes each) and the resize a float copy of
# a size group (12 bytes each): this bounds one call at about 0.75 GB decoded, 3 GB at the
# resize, whatever the images' sizes, so 64 phone photos never ask for 15 GB and more.
GPU_BATCH_PIXELS = 256_000_000

_END_OF_IMAGE = b"\xff\xd9"


class DecodedImage(NamedTuple):
    """One input: a crop on the device, or the reason it has none; the original size."""

    tensor: torch.Tensor | None
    error: str | None
    width: int | None = None
    height: int | None = None


def route(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, Image.Image | str]:
    """Where one file is decoded: ("gpu", header), ("cpu", header) or ("error", reason).

    Args:
        data: the file's bytes.
        max_pixels: refuse images whose header says width*height exceeds this.

    Returns:
        ("error", the reason `read_header` gives) for a file refused from its header; else
        ("gpu", header) for a JPEG that nvJPEG decodes as the CPU path does (see the module's
        docstring) and ("cpu", header) for the rest.

    Example:
        >>> route(b"")
        ('error', 'empty file (0 bytes)')
    """
    try:
        header = read_header(data, max_pixels)
    except ImageDecodeError as err:
        return "error", str(err)
    return ("gpu" if gpu_decodable(header, data) else "cpu"), header


def gpu_decodable(image: Image.Image, data: bytes) -> bool:
    """Whether nvJPEG gives the same image (or error) as the CPU path: a JPEG in RGB or
    grayscale, without an EXIF orientation to apply, that ends with the end-of-image marker
    (`image` is `data`'s header from `read_header`)."""
    return (
        image.format == "JPEG"
        and image.mode in ("RGB", "L")
        and data.rstrip(b"\0\n\r ").endswith(_END_OF_IMAGE)
        and not has_exif_orientation(image)
    )


class GpuJpegDecoder:
    """Decodes batches of files into center crops on `device`, JPEGs on the GPU.

    On a CPU `device` it runs the same routing and batching with libjpeg-turbo, and gives
    exactly what `decode_image` gives (the tests check the logic this way without a GPU).

    Args:
        preprocessing: resize and crop, as for the CPU path.
        device: the device the crops end on (CUDA for nvJPEG).
        max_pixels: refuse images larger than this, from the header.
        budget: host memory for the files that take the CPU path (None: the process's).
        executor: threads that decode the CPU-path files of a batch while the GPU decodes its
            JPEGs; None decodes them in the calling thread.

    Example:
        >>> decoder = GpuJpegDecoder(Preprocessing(), torch.device("cpu"))
        >>> decoder.decode([b"not an image"])[0].error.split(":")[0]
        'not an image'
    """

    def __init__(
        self,
        preprocessing: Preprocessing,
        device: torch.device,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        budget: DecodeBudget | None = None,
        executor: Executor | None = None,
    ):
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        self.budget = budget
        self.executor = executor

    def decode(self, files: list[bytes]) -> list[DecodedImage]:
        """Decode, resize and crop `files`.

        Args:
            files: encoded images, e.g. a model batch's worth (64 to 256).

        Returns:
            One `DecodedImage` per file, in the same order: a (3, crop, crop) uint8 tensor on
            `device` and the original width and height, or tensor None and the error reason.
            Nothing is raised for a bad file.
        """
        results: list[DecodedImage | None] = [None] * len(files)
        on_gpu: list[tuple[int, bytes, int, int]] = []  # (position, bytes, width, height)
        on_cpu: list[int] = []
        for position, data in enumerate(files):
            where, header = route(data, self.max_pixels)
            if where == "error":
                results[position] = DecodedImage(None, header)
            elif where == "gpu":
                on_gpu.append((position, data, *header.size))
            else:
                on_cpu.append(position)
        # Submitted first, so that the CPU decodes run while nvJPEG works.
        if self.executor is not None:
            cpu_results = self.executor.map(lambda i: self._on_cpu(files[i]), on_cpu)
        else:
            cpu_results = (self._on_cpu(files[i]) for i in on_cpu)
        for chunk in _chunks_by_pixels(on_gpu, GPU_BATCH_PIXELS):
            images = self._decode_jpegs([data for _, data, _, _ in chunk])
            crops = self._crops([image for image in images if isinstance(image, torch.Tensor)])
            for (position, data, width, height), image in zip(chunk, images, strict=True):
                if isinstance(image, str):
                    results[position] = DecodedImage(None, image)
                elif image is None:  # out of GPU memory alone: the CPU path
                    results[position] = self._on_cpu(data)
                else:
                    results[position] = DecodedImage(next(crops), None, width, height)
        for position, result in zip(on_cpu, cpu_results, strict=True):
            results[position] = result
        return results  # type: ignore[return-value]

    def _decode_jpegs(self, files: list[bytes]) -> list[torch.Tensor | str | None]:
        """nvJPEG on a batch: a tensor per file, or the reason it is corrupt, or None when it
        alone does not fit in GPU memory. When the batch fails (one corrupt file fails all of
        them, and a large batch may not fit), each file is decoded alone."""
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # torch.OutOfMemoryError too
            pass
        decoded: list[torch.Tensor | str | None] = []
        for one in encoded:
            try:
                decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
            except torch.OutOfMemoryError:
                decoded.append(None)
            except RuntimeError as err:
                decoded.append(f"corrupt or truncated JPEG: {err}")
        return decoded

    def _crops(self, images: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Resize and crop `images` (each (3, h, w)), yielded in their order; images of one size
        are resized in one call (photos of a collection often share a few sizes)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(index)
        crops: list[torch.Tensor | None] = [None] * len(images)
        for indices in groups.values():
            batch = torch.stack([images[i] for i in indices])
            batch = F.resize(batch, [self.preprocessing.resize],
                             interpolation(self.preprocessing),
                             antialias=self.preprocessing.antialias)
            batch = F.center_crop(batch, [self.preprocessing.crop])
            for i, crop in zip(indices, batch, strict=True):
                crops[i] = crop
            del batch
        for index in range(len(images)):
            yield crops[index]  # type: ignore[misc]
            crops[index] = None

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
            # Pinned, the copy runs on the copy engine while the host goes on; the caching host
            # allocator keeps the pinned block until the copy is done.
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
