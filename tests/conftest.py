"""Shared test fixtures: generated images, embeddings in the project's Parquet schema."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.fs import resolve
from pipeline.provenance import Provenance
from pipeline.store import build_table, write_table_atomically

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CALTECH = SHARED / "datasets" / "caltech101" / "101_ObjectCategories"

# Ray refuses to spill objects to a disk over this fraction full (default 0.95), and CI
# machines' disks have been 97% full. With 0, every Ray the tests start (embedded, `ray start`
# nodes, the jobs' drivers) refuses to spill: a test that only passes by spilling fails on
# every machine, not only on a full one.
os.environ["RAY_local_fs_capacity_threshold"] = "0"

needs_caltech = pytest.mark.skipif(not CALTECH.is_dir(), reason="../shared/datasets is absent")


def jpeg_bytes(seed: int, size: tuple[int, int] = (96, 72), quality: int = 90) -> bytes:
    """A smooth, seeded, photo-like JPEG (gradients plus a blob) of `size` (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(8, 40)
        blob = 120 * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * r * r))
        channels.append(128 + 60 * (a * xs / width + b * ys / height) + c * blob)
    array = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_labelled_folder(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """Folders `class_i/img_j.jpg` of generated JPEGs; returns `root`."""
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            (folder / f"img_{j}.jpg").write_bytes(jpeg_bytes(seed=1000 * c + j))
    return root


def test_provenance(dim: int = 64, **changes) -> Provenance:
    """Provenance for generated vectors (random:0 weights, a made-up sha256)."""
    fields = dict(weights="random:0", weights_sha256="0" * 64, layer="fc7", dim=dim)
    fields.update(changes)
    return Provenance(**fields).stamped()


test_provenance.__test__ = False  # a helper, not a test


def clustered_vectors(
    rows: int, dim: int, clusters: int = 20, spread: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Embedding-like data: non-negative vectors around `clusters` centres; returns (x, labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(1.0, 1.0, size=(clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, size=rows)
    noise = rng.normal(0, spread, size=(rows, dim)).astype(np.float32)
    return np.maximum(centres[labels] + noise, 0), labels


def write_embeddings(
    folder: Path,
    vectors: np.ndarray,
    labels: list[str | None] | None = None,
    provenance: Provenance | None = None,
    shards: int = 1,
    errors: list[str | None] | None = None,
    id_prefix: str = "img",
    sha256s: list[str | None] | None = None,
    sizes: list[tuple[int, int]] | None = None,
) -> Path:
    """Write vectors as an extraction output (Parquet parts) in `folder`; returns `folder`."""
    provenance = provenance or test_provenance(dim=vectors.shape[1])
    rows = len(vectors)
    ids = [f"{id_prefix}_{i:06d}.jpg" for i in range(rows)]
    labels = labels if labels is not None else [None] * rows
    errors = errors if errors is not None else [None] * rows
    folder.mkdir(parents=True, exist_ok=True)
    fs, base = resolve(str(folder))
    for shard, part in enumerate(np.array_split(np.arange(rows), shards)):
        table = build_table(
            provenance,
            [ids[i] for i in part],
            [f"/images/{ids[i]}" for i in part],
            [labels[i] for i in part],
            vectors[part],
            [errors[i] for i in part],
            [sha256s[i] for i in part] if sha256s else None,
            [sizes[i][0] for i in part] if sizes else None,
            [sizes[i][1] for i in part] if sizes else None,
        )
        write_table_atomically(table, fs, f"{base}/part-{shard:05d}.parquet")
    return folder


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for a module's tests, started as `fc7 extract` starts its own."""
    from pipeline.extract import start_ray, stop_ray

    started = start_ray()
    yield
    if started:
        stop_ray()


@pytest.fixture
def labelled_images(tmp_path: Path) -> Path:
    """A folder of 3 classes x 4 generated JPEGs."""
    return write_labelled_folder(tmp_path / "images")


def png_bomb_bytes(width: int = 40000, height: int = 40000) -> bytes:
    """A valid PNG header claiming `width` x `height` pixels with almost no data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def save_image(array: np.ndarray, mode: str | None = None, **save_args) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, **save_args)
    return buffer.getvalue()


def hostile_corpus(root: Path) -> dict[str, str | None]:
    """Broken and odd files under `root`; returns {id: expected error prefix, or None if fine}."""
    photo = np.asarray(Image.open(io.BytesIO(jpeg_bytes(7, (120, 90)))))
    good = jpeg_bytes(3)
    large = jpeg_bytes(4, (320, 240))
    frames = [Image.fromarray(np.full((40, 50, 3), v, np.uint8)) for v in (30, 200)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = io.BytesIO()
    Image.fromarray(photo).save(rotated, format="JPEG", exif=exif.tobytes(), quality=95)
    sixteen = (np.linspace(0, 65535, 80 * 60).reshape(60, 80)).astype(np.uint16)
    files: dict[str, tuple[bytes, str | None]] = {
        "broken/empty.jpg": (b"", "empty file"),
        "broken/truncated.jpg": (large[: len(large) * 3 // 5], "corrupt or truncated JPEG"),
        "broken/text.jpg": (b"hello, I am plain text\n" * 5, "not an image"),
        "broken/page.jpg": (b"<!DOCTYPE html><html><body>404</body></html>", "not an image"),
        "broken/bomb.png": (png_bomb_bytes(), "too large"),
        "odd/cmyk.jpg": (save_image(photo, "CMYK", format="JPEG"), None),
        "odd/gray16.png": (save_image(sixteen, format="PNG"), None),
        "odd/rgba.png": (save_image(np.dstack([photo, photo[..., :1]]), format="PNG"), None),
        "odd/palette.png": (save_image(photo, "P", format="PNG"), None),
        "odd/animated.gif": (gif.getvalue(), None),
        "odd/photo.webp": (save_image(photo, format="WEBP"), None),
        "odd/photo.tiff": (save_image(photo, format="TIFF"), None),
        "odd/photo.BMP": (save_image(photo, format="BMP"), None),
        "odd/rotated.jpg": (rotated.getvalue(), None),
        "odd/ünïcødé 名前.jpg": (good, None),
        "top-level.JPEG": (good, None),
    }
    for name, (data, _) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "odd/folder.jpg").mkdir()  # a folder named like an image: walked, not read
    (root / "odd/folder.jpg/inside.png").write_bytes(save_image(photo, format="PNG"))
    (root / "odd/notes.txt").write_text("not an image extension: ignored")
    (root / "broken/dangling.jpg").symlink_to(root / "does-not-exist.jpg")
    expected = {name: error for name, (_, error) in files.items()}
    expected["odd/folder.jpg/inside.png"] = None
    expected["broken/dangling.jpg"] = "cannot read file"
    return expected


EPS_BYTES = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
)


def attack_corpus(root: Path) -> dict[str, str | None]:
    """Files meant to stop a job, eat memory or hang a reader, under `root`; returns {id:
    expected error prefix, or None when the file is a valid image that must be embedded}.

    Cheap to write (under 300 KB in all), expensive to decode: thin and tall strips whose resize
    would take gigabytes, 100-megapixel 1-bit and 16-bit PNGs, a FIFO, a link to /dev/zero, an
    EPS file (Pillow would run Ghostscript on it).
    """
    files = {
        "attack/thin.png": (Image.new("L", (2, 1_000_000)), "extreme aspect ratio"),
        "attack/tall.png": (Image.new("L", (100_000, 4)), "extreme aspect ratio"),
        "attack/bits.png": (Image.new("1", (10_000, 10_000), 1), None),
        "attack/deep.png": (Image.new("I;16", (10_000, 10_000), 40_000), None),
    }
    (root / "attack").mkdir(parents=True, exist_ok=True)
    for name, (image, _) in files.items():
        image.save(root / name)
    (root / "attack/vector.jpg").write_bytes(EPS_BYTES)
    os.mkfifo(root / "attack/camera.jpg")
    (root / "attack/zero.jpg").symlink_to("/dev/zero")
    expected = {name: error for name, (_, error) in files.items()}
    expected["attack/vector.jpg"] = "not an image"
    expected["attack/camera.jpg"] = "not a regular file: a FIFO"
    expected["attack/zero.jpg"] = "not a regular file: a character device"
    return expected
