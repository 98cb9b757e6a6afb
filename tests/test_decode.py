import io

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from conftest import hostile_corpus, jpeg_bytes, png_bomb_bytes
from PIL import Image, ImageOps

from pipeline.decode import ImageDecodeError, decode_image
from pipeline.provenance import Preprocessing


def test_hostile_corpus_gives_tensors_or_named_errors(tmp_path):
    expected = hostile_corpus(tmp_path)
    for name, error in expected.items():
        path = tmp_path / name
        if not path.exists():  # the dangling link: a read error, not a decode error
            continue
        if error is None:
            tensor, width, height = decode_image(path.read_bytes(), Preprocessing())
            assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.uint8, name
            assert width > 0 and height > 0
        else:
            with pytest.raises(ImageDecodeError, match=error):
                decode_image(path.read_bytes(), Preprocessing())


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
