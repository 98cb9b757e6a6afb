"""Bytes to a center-cropped uint8 tensor, the way the reference preprocessing does it.

JPEGs in RGB or grayscale take torchvision's libjpeg-turbo decoder (about 1.4x faster here than
Pillow); every other format and mode goes through Pillow (EXIF orientation, first frame of an
animation, CMYK, 16-bit, palette and alpha all converted to RGB). Both paths then resize the
tensor with antialiasing, so outputs stay within cosine 0.995 of `AlexNet_Weights.transforms()`.

Hostile files are refused from the header, before anything large is allocated: formats outside
`ALLOWED_FORMATS` (so Pillow never hands an EPS file to Ghostscript), more than `max_pixels`,
or more memory than a `DecodeBudget` allows. The budget is shared by every decode in a process
and makes concurrent decodes wait for each other, so a few 100-megapixel files at once cannot
take the machine's memory.

A file that cannot become an image raises `ImageDecodeError` with a reason meant for the
`error` column; nothing else escapes for a bad file.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.provenance import Preprocessing

# We refuse oversized images ourselves, from the header, with a clearer message (max_pixels).
Image.MAX_IMAGE_PIXELS = None
Image.init()  # registers every plugin, so that `formats=ALLOWED_FORMATS` finds WEBP and TIFF

# Pillow also opens EPS (through Ghostscript), PSD, ICO, PDF-like and many other formats; an
# image collection needs these, and the others are only attack surface. (Pillow's JPEG opener
# also gives MPO, the multi-picture JPEG that many phone cameras write.)
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_DECODE_MEMORY = 2 * 1024**3
# The shorter side is resized to 256, so a 4x100000 strip would become 256x6400000 pixels (5 GB
# and 8 s) to crop a 224x224 square of smeared pixels out of it. Panoramas stay well below this.
MAX_ASPECT_RATIO = 100

# Peak bytes a decode holds per source pixel, with a margin over what was measured here (peak
# RSS: 3.4 for a 40-megapixel JPEG, 10 for an RGB PNG, 5 for a 1-bit and 6 for a 16-bit PNG of
# 100 megapixels): the JPEG decoder writes the RGB pixels once; Pillow holds the decoded image,
# the converted copy and the tensor; grayscale stays one channel until the crop.
_BYTES_PER_PIXEL = {"jpeg": 5, "gray": 8, "color": 16}
# The resized image before the crop, uint8, three channels (one for grayscale).
_RESIZED_BYTES_PER_PIXEL = {"jpeg": 3, "gray": 1, "color": 3}
_GRAY_MODES = ("1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")


class ImageDecodeError(Exception):
    """A file is not a usable image; `str(err)` is the reason stored in the `error` column.

    `kind` says what a server answers: "empty" and "corrupt" (400), "format" (415), "size" (413).
    """

    def __init__(self, reason: str, kind: Literal["empty", "format", "size", "corrupt"]):
        super().__init__(reason)
        self.kind = kind


class DecodeBudget:
    """Bytes that the decodes of one process may hold at once: a weighted semaphore.

    A decode reserves its estimated peak (`decode_memory`) and waits while others hold too much;
    one that would need more than the whole budget is refused at once.

    Example:
        >>> budget = DecodeBudget(2 * 1024**3)
        >>> with budget.reserve(300 * 1024**2, "cat.png"):
        ...     pass
    """

    def __init__(self, capacity: int = DEFAULT_DECODE_MEMORY):
        self.capacity = capacity
        self._held = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int, what: str) -> Iterator[None]:
        """Hold `nbytes` of the budget for the block; waits for room.

        Raises:
            ImageDecodeError: `nbytes` exceeds the whole budget (kind "size").
        """
        if nbytes > self.capacity:
            raise ImageDecodeError(
                f"too large to decode: {what} needs about {_mib(nbytes)} of memory, more than "
                f"the decode memory limit {_mib(self.capacity)} (--decode-memory)",
                "size",
            )
        with self._changed:
            self._changed.wait_for(lambda: self._held + nbytes <= self.capacity)
            self._held += nbytes
        try:
            yield
        finally:
            with self._changed:
                self._held -= nbytes
                self._changed.notify_all()


# For callers that bring no budget of their own (scripts, notebooks, `Embedder`s created without
# one): they still cannot decode more at once than the default allows.
PROCESS_BUDGET = DecodeBudget(DEFAULT_DECODE_MEMORY)


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image's header, refusing what fc7 must not decode. Nothing is decoded yet.

    Args:
        data: the file's bytes.
        max_pixels: refuse images whose header says width*height exceeds this.

    Returns:
        The Pillow image, its pixels not loaded.

    Raises:
        ImageDecodeError: empty (kind "empty"), not an image or a format outside
            `ALLOWED_FORMATS` ("format"), unreadable header ("corrupt"), or too many pixels
            ("size").

    Example:
        >>> read_header(open("cat.jpg", "rb").read()).size  # doctest: +SKIP
        (500, 375)
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)", "empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        reason = (
            f"not an image: unknown or unsupported format (file starts with {data[:16]!r}; "
            f"fc7 reads {', '.join(ALLOWED_FORMATS)})"
        )
        raise ImageDecodeError(reason, "format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageDecodeError(f"unreadable image header: {err}", "corrupt") from None
    check_size(*image.size, max_pixels)
    return image


def check_size(width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse a size fc7 must not decode or resize: the header's, or a decoded array's.

    Raises:
        ImageDecodeError: more than `max_pixels`, empty, or sides more than
            `MAX_ASPECT_RATIO` to 1.

    Example:
        >>> check_size(640, 480)  # a photo: nothing raised; check_size(2, 10**6) raises
    """
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"too large: {width}x{height} = {width * height:,} pixels exceeds max_pixels "
            f"{max_pixels:,} (possible decompression bomb)",
            "size",
        )
    if width < 1 or height < 1:
        raise ImageDecodeError(f"unreadable image header: size {width}x{height}", "corrupt")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageDecodeError(
            f"extreme aspect ratio: {width}x{height}, one side more than {MAX_ASPECT_RATIO} "
            f"times the other (the center crop would keep almost nothing of it)",
            "size",
        )


def decode_memory(image: Image.Image, preprocessing: Preprocessing) -> int:
    """Estimated peak bytes to decode and resize `image` (a header from `read_header`)."""
    path = _path(image)
    width, height = image.size
    scale = preprocessing.resize / min(width, height)
    resized = max(1, round(width * scale)) * max(1, round(height * scale))
    return width * height * _BYTES_PER_PIXEL[path] + resized * _RESIZED_BYTES_PER_PIXEL[path]


def decode_image(
    data: bytes,
    preprocessing: Preprocessing,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    budget: DecodeBudget | None = None,
) -> tuple[torch.Tensor, int, int]:
    """Decode, orient, convert to RGB, resize and center-crop one image.

    Args:
        data: the file's bytes.
        preprocessing: resize and crop sizes (interpolation is bilinear with antialias).
        max_pixels: refuse images whose header says width*height exceeds this, before decoding.
        budget: memory shared with other decodes; None shares this process's default budget.

    Returns:
        (uint8 tensor of shape (3, crop, crop), original width, original height).

    Raises:
        ImageDecodeError: empty, not an image, truncated or corrupt, or too large.

    Example:
        >>> data = open("cat.jpg", "rb").read()  # doctest: +SKIP
        >>> tensor, width, height = decode_image(data, Preprocessing())  # doctest: +SKIP
    """
    image = read_header(data, max_pixels)
    width, height = image.size
    needed = decode_memory(image, preprocessing) + len(data)
    with (budget or PROCESS_BUDGET).reserve(needed, f"a {width}x{height} image"):
        try:
            if _path(image) == "jpeg":
                tensor = _decode_jpeg(data)
            else:
                tensor = _decode_with_pillow(image)
        except (OSError, SyntaxError, ValueError, RuntimeError, EOFError) as err:
            reason = f"corrupt or truncated {image.format or 'image'}: {err}"
            raise ImageDecodeError(reason, "corrupt") from None
        del image
        return crop(tensor, preprocessing), width, height


def interpolation(preprocessing: Preprocessing) -> F.InterpolationMode:
    """The resize's interpolation: bilinear for most models, bicubic for EfficientNet."""
    return F.InterpolationMode(preprocessing.interpolation)


def crop(tensor: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """A decoded (channels, height, width) uint8 image, one channel or three, resized and
    center-cropped to the model's (3, crop, crop) uint8 input.

    Example:
        >>> crop(torch.zeros(3, 300, 400, dtype=torch.uint8), Preprocessing()).shape
        torch.Size([3, 224, 224])
    """
    tensor = F.resize(tensor, [preprocessing.resize], interpolation(preprocessing),
                      antialias=preprocessing.antialias)
    tensor = F.center_crop(tensor, [preprocessing.crop])
    # Grayscale is resized as one channel (the same numbers as three equal channels).
    return tensor.expand(3, -1, -1).contiguous()


def _path(image: Image.Image) -> Literal["jpeg", "gray", "color"]:
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
        return "jpeg"
    return "gray" if image.mode in _GRAY_MODES else "color"


def _decode_jpeg(data: bytes) -> torch.Tensor:
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)


def _decode_with_pillow(image: Image.Image) -> torch.Tensor:
    """(channels, height, width) uint8: one channel for grayscale modes, else three."""
    with warnings.catch_warnings():
        # Pillow warns on odd but valid files (EXIF quirks, palette transparency); the image
        # still decodes, and a real failure raises.
        warnings.simplefilter("ignore")
        image.seek(0)  # first frame of an animation
        image.load()
        if has_exif_orientation(image):
            image = ImageOps.exif_transpose(image, in_place=False)
        if image.mode in _GRAY_MODES:
            array = _to_gray(image)
            del image
            return torch.from_numpy(array)[None]
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")
        if image.mode != "RGB":
            image = image.convert("RGB")
        array = np.asarray(image)  # read-only, a copy of Pillow's pixels
        del image
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def has_exif_orientation(image: Image.Image) -> bool:
    """Whether the header asks for the pixels to be rotated or flipped (EXIF tag 0x0112)."""
    return image.getexif().get(0x0112, 1) != 1


def _to_gray(image: Image.Image) -> np.ndarray:
    """8-bit grayscale; 16/32-bit scaled by 1/257 (Pillow's convert() would clip at 255)."""
    if image.mode in ("1", "L"):
        return np.asarray(image.convert("L") if image.mode == "1" else image).copy()
    wide = np.asarray(image)
    scale = 257.0 if wide.max(initial=0) > 255 else 1.0
    gray = np.empty(wide.shape, dtype=np.uint8)
    rows = max(1, (1 << 20) // max(1, wide.shape[1]))  # float64 one megapixel at a time
    for start in range(0, wide.shape[0], rows):
        block = wide[start : start + rows].astype(np.float64) / scale
        gray[start : start + rows] = np.clip(block + 0.5, 0, 255).astype(np.uint8)
    return gray


def _mib(nbytes: int) -> str:
    return f"{nbytes / 1024**2:,.0f} MiB"
