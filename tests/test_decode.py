import io
import threading

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from conftest import attack_corpus, hostile_corpus, jpeg_bytes, png_bomb_bytes
from PIL import Image, ImageOps

from pipeline.decode import DecodeBudget, ImageDecodeError, decode_image
from pipeline.provenance import Preprocessing
from pipeline.sources import InputReadError, read_image_bytes


def test_hostile_corpus_gives_tensors_or_named_errors(tmp_path):
    expected = hostile_corpus(tmp_path) | attack_corpus(tmp_path)
    for name, error in expected.items():
        try:  # as a worker does it: read (regular files only), then decode
            tensor, width, height = decode_image(
                read_image_bytes(str(tmp_path / name)), Preprocessing()
            )
        except (InputReadError, ImageDecodeError) as err:
            assert error is not None and str(err).startswith(error), (name, str(err))
        else:
            assert error is None, name
            assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.uint8, name
            assert width > 0 and height > 0


def test_reads_stop_at_max_bytes_and_at_non_regular_files(tmp_path):
    (tmp_path / "big.jpg").write_bytes(jpeg_bytes(1, (200, 150)))
    size = (tmp_path / "big.jpg").stat().st_size
    assert len(read_image_bytes(str(tmp_path / "big.jpg"), max_bytes=size)) == size
    with pytest.raises(InputReadError, match=f"file too large: {size:,} bytes exceeds"):
        read_image_bytes(str(tmp_path / "big.jpg"), max_bytes=size - 1)
    for device, kind in [("/dev/urandom", "a character device"), (str(tmp_path), "a directory")]:
        with pytest.raises(InputReadError, match=f"not a regular file: {kind}"):
            read_image_bytes(device)


def test_gray_and_sixteen_bit_images_equal_the_rgb_conversion_they_replace():
    # Grayscale is resized as one channel, 16-bit converted a block at a time: the same numbers
    # as converting the whole image to 8-bit RGB first, as the code did before.
    rng = np.random.default_rng(3)
    deep = (rng.random((300, 410)) * 65535).astype(np.uint16)
    gray = (rng.random((333, 250)) * 255).astype(np.uint8)
    for array in (deep, gray):
        data = save_png(array)
        eight = np.clip(array / (257.0 if array.max() > 255 else 1.0) + 0.5, 0, 255)
        rgb = torch.from_numpy(np.repeat(eight.astype(np.uint8)[None], 3, axis=0))
        reference = F.center_crop(F.resize(rgb, [256], antialias=True), [224])
        assert torch.equal(decode_image(data, Preprocessing())[0], reference)


def test_the_budget_refuses_what_can_never_fit_and_releases_what_it_held():
    budget = DecodeBudget(64 * 1024**2)
    with pytest.raises(ImageDecodeError, match="too large to decode: a 4000x3000 image needs"):
        decode_image(save_png(np.zeros((3000, 4000, 3), np.uint8)), Preprocessing(), budget=budget)
    assert budget._held == 0  # a refusal holds nothing
    tensor, _, _ = decode_image(jpeg_bytes(2, (640, 480)), Preprocessing(), budget=budget)
    assert tensor.shape == (3, 224, 224) and budget._held == 0


def test_the_budget_makes_a_decode_wait_while_others_hold_too_much():
    budget = DecodeBudget(100)
    events = []

    def second() -> None:
        with budget.reserve(60, "second"):
            events.append("second in")

    with budget.reserve(60, "first"):
        waiting = threading.Thread(target=second)
        waiting.start()
        waiting.join(0.3)  # it must still be waiting: 60 + 60 > 100
        events.append("first out")
    waiting.join(5)
    assert events == ["first out", "second in"]
    with budget.reserve(50, "a"), budget.reserve(50, "b"):  # 100 fits exactly
        pass


def save_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bomb_is_refused_from_the_header_with_its_size():
    with pytest.raises(ImageDecodeError, match="40000x40000 = 1,600,000,000 pixels"):
        decode_image(png_bomb_bytes(), Preprocessing())
    with pytest.raises(ImageDecodeError, match="exceeds max_pixels 5,000"):
        decode_image(jpeg_bytes(0, (100, 80)), Preprocessing(), max_pixels=5000)


def _pil_reference(data: bytes) -> torch.Tensor:
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    return F.center_crop(F.resize(tensor, [256], antialias=True), [224])


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_like_pillow(orientation):
    photo = Image.open(io.BytesIO(jpeg_bytes(5, (160, 90))))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    ours, width, height = decode_image(buffer.getvalue(), Preprocessing())
    reference = _pil_reference(buffer.getvalue())
    assert (width, height) == (160, 90)  # the file's own size, before orientation
    difference = (ours.float() - reference.float()).abs().mean().item()
    assert difference < 2.0  # same orientation: only decoder rounding differs


def test_sixteen_bit_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256 * 256).reshape(256, 256).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    tensor, _, _ = decode_image(buffer.getvalue(), Preprocessing())
    # A clipped conversion would be almost all 255; a scaled one keeps the ramp.
    assert 100 < tensor.float().mean().item() < 155
    assert tensor.min().item() < 30 and tensor.max().item() > 225
