"""The images a request touches: uploads decoded for the model, indexed files as thumbnails.

Both are opened by `pipeline.decode.read_header`, the one header guard (allowed formats, pixel
limit, aspect ratio), and decoded while holding their estimated memory in the server's
`DecodeBudget`. What cannot be used becomes an HTTP error that says why.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import torch
from fastapi import HTTPException
from PIL import ImageOps

from pipeline.decode import DecodeBudget, ImageDecodeError, decode_image, read_header
from pipeline.provenance import Preprocessing
from pipeline.sources import read_image_bytes

# An ImageDecodeError's kind as an HTTP status: the client's file, not the server, is at fault.
DECODE_STATUS = {"empty": 400, "corrupt": 400, "format": 415, "size": 413}
THUMBNAIL_CACHE_BYTES = 64 * 1024 * 1024
# Peak bytes per (drafted) source pixel while a thumbnail is made: the decoded image, its
# upright copy and its RGB copy. Always Pillow's path, so more than `pipeline.decode`'s estimate
# for a JPEG (which torchvision decodes in one copy); like its estimate for Pillow's color path.
THUMBNAIL_BYTES_PER_PIXEL = 16


def decode_upload(
    data: bytes,
    preprocessing: Preprocessing,
    max_upload: int,
    max_pixels: int,
    budget: DecodeBudget,
) -> torch.Tensor:
    """An uploaded image, decoded and cropped for the model, as a (3, crop, crop) uint8 tensor.

    Args:
        data: the uploaded file's bytes.
        preprocessing: the index's recorded preprocessing (resize and crop).
        max_upload: largest accepted file, in bytes.
        max_pixels: largest accepted width*height, read from the header before decoding.
        budget: the memory shared with the server's other decodes.

    Raises:
        HTTPException: 413 larger than `max_upload`; otherwise the status of the decode error's
            kind (`DECODE_STATUS`): 400 empty or corrupt, 415 format, 413 size.

    Example:
        >>> data = open("cat.jpg", "rb").read()  # doctest: +SKIP
        >>> tensor = decode_upload(
        ...     data, Preprocessing(), 20_000_000, 10**8, DecodeBudget()
        ... )  # doctest: +SKIP
        >>> tensor.shape  # doctest: +SKIP
        torch.Size([3, 224, 224])
    """
    if len(data) > max_upload:
        raise HTTPException(
            413,
            f"the uploaded file is larger than --max-upload {max_upload:,} bytes; "
            "send a smaller image",
        )
    try:
        tensor, _, _ = decode_image(data, preprocessing, max_pixels, budget)
    except ImageDecodeError as err:
        detail = f"cannot use the uploaded image: {err}"
        if err.kind == "size":
            memory = budget.capacity / 1024**2
            detail += (
                f" (limits here: --max-pixels {max_pixels:,}, --decode-memory {memory:,.0f} MiB)"
            )
        raise HTTPException(DECODE_STATUS[err.kind], detail) from None
    return tensor


def read_indexed_file(path: str) -> bytes:
    """The bytes of an image named by the index (a local path or a URI such as s3://...).

    Raises:
        HTTPException: 404 when the file is gone or unreadable.
    """
    try:
        return read_image_bytes(path)
    except (OSError, ValueError) as err:
        raise HTTPException(404, f"the indexed image {path} cannot be read: {err}") from None


def make_thumbnail(data: bytes, size: int, max_pixels: int, budget: DecodeBudget) -> bytes:
    """A JPEG at most `size` pixels on its longer side, upright (EXIF) and in RGB.

    The file is opened like any upload (`read_header`: allowed formats only, at most
    `max_pixels`), and decoded while holding its estimated memory in `budget`.

    Args:
        data: the indexed file's bytes.
        size: longer side of the thumbnail, in pixels.
        max_pixels: the largest width*height decoded.
        budget: the memory shared with the server's other decodes.

    Returns:
        The JPEG's bytes.

    Raises:
        HTTPException: 404 when the indexed file is not a usable image (any more), or too large
            to decode within `max_pixels` or `budget`.

    Example:
        >>> data = open("cat.jpg", "rb").read()  # doctest: +SKIP
        >>> make_thumbnail(data, 192, 10**8, DecodeBudget())[:3]  # doctest: +SKIP
        b'\xff\xd8\xff'
    """
    # No warnings.catch_warnings() here: it is not thread-safe, and requests run in threads.
    try:
        image = read_header(data, max_pixels)
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
        width, height = image.size  # after draft: the size that will be decoded
        needed = width * height * THUMBNAIL_BYTES_PER_PIXEL + len(data)
        with budget.reserve(needed, f"a {width}x{height} thumbnail"):
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except (ImageDecodeError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise HTTPException(
            404, f"no thumbnail: the indexed file is not a usable image ({err})"
        ) from None
    return buffer.getvalue()


class ThumbnailCache:
    """Thumbnails by item id; the least recently used are dropped once the cache holds more
    than `max_bytes` (the newest is always kept). Safe to use from several threads.

    Example:
        >>> cache = ThumbnailCache(max_bytes=1000)
        >>> cache.put("cats/cat1.jpg", b"...")
        >>> cache.get("cats/cat1.jpg")
        b'...'
    """

    def __init__(self, max_bytes: int = THUMBNAIL_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._thumbnails: OrderedDict[str, bytes] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def get(self, item_id: str) -> bytes | None:
        with self._lock:
            if item_id not in self._thumbnails:
                return None
            self._thumbnails.move_to_end(item_id)
            return self._thumbnails[item_id]

    def put(self, item_id: str, data: bytes) -> None:
        with self._lock:
            if item_id not in self._thumbnails:  # another request may have made it meanwhile
                self._thumbnails[item_id] = data
                self._held += len(data)
            while self._held > self.max_bytes and len(self._thumbnails) > 1:
                _, dropped = self._thumbnails.popitem(last=False)
                self._held -= len(dropped)
