"""JPEG decoding on the GPU (pipeline.gpu) and extraction on CUDA.

The unmarked tests run everywhere: routing, batching, and on the CPU device the batched decoder
must give exactly what the CPU path gives, files and errors alike, also when one corrupt file
fails a batch. The others need CUDA (marked `gpu`, skipped without it; `bench/gpu_check.sh` runs
them on a GPU machine).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, hostile_corpus, jpeg_bytes, save_image
from PIL import Image

from pipeline.decode import ImageDecodeError, decode_image, read_header
from pipeline.gpu import GPU_BATCH_PIXELS, GpuJpegDecoder, _chunks_by_pixels, route
from pipeline.model import Embedder, load_weights
from pipeline.provenance import Preprocessing
from pipeline.store import embeddings_to_numpy

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def corpus(tmp_path) -> dict[str, bytes]:
    """Bundled photos and the hostile corpus's regular files, by name."""
    hostile_corpus(tmp_path)
    files = {p.relative_to(tmp_path).as_posix(): p.read_bytes()
             for p in sorted(tmp_path.rglob("*")) if p.is_file() and not p.is_symlink()
             and p.suffix != ".txt"}
    for path in sorted((REPO / "examples/images").rglob("*.jpg")):
        files[path.relative_to(REPO / "examples").as_posix()] = path.read_bytes()
    return files


def bad_huffman_table(seed: int) -> bytes:
    """A JPEG whose header reads and that ends like a whole file, with a Huffman table that no
    decoder accepts (index 15): it fails a batched decode."""
    data = bytearray(jpeg_bytes(seed))
    dht = data.find(b"\xff\xc4")
    data[dht + 4] = 0x1F
    return bytes(data)


def mixed_batch() -> list[bytes]:
    """Same-size and other-size JPEGs, a corrupt one, a PNG, an oriented JPEG, a truncated one."""
    photo = np.asarray(Image.open(REPO / "examples/images/dalmatian/image_0001.jpg"))
    exif = Image.Exif()
    exif[0x0112] = 8
    large = jpeg_bytes(9, (500, 375))
    return [
        jpeg_bytes(1), jpeg_bytes(2), bad_huffman_table(3), jpeg_bytes(4, (300, 200)),
        save_image(photo, format="PNG"), save_image(photo, format="JPEG", exif=exif.tobytes()),
        large[: len(large) // 2], jpeg_bytes(5),
        (REPO / "examples/images/sunflower/image_0002.jpg").read_bytes(),
    ]


def cpu_path(data: bytes):
    try:
        return decode_image(data, Preprocessing())
    except ImageDecodeError as err:
        return str(err)


def test_the_batched_decoder_on_the_cpu_device_equals_the_cpu_path(tmp_path):
    files = corpus(tmp_path)
    decoder = GpuJpegDecoder(Preprocessing(), torch.device("cpu"))
    results = decoder.decode(list(files.values()))
    assert len(results) == len(files)
    for (name, data), result in zip(files.items(), results, strict=True):
        expected = cpu_path(data)
        if isinstance(expected, str):  # refused from the header, or corrupt (batch retried)
            assert result.tensor is None and result.error == expected, name
        else:
            tensor, width, height = expected
            assert result.error is None and (result.width, result.height) == (width, height)
            assert torch.equal(result.tensor, tensor), name
    assert any(r.error and r.error.startswith("corrupt or truncated JPEG") for r in results)


def test_files_are_routed_by_their_header(tmp_path):
    files = corpus(tmp_path)
    routes = {name: route(data)[0] for name, data in files.items()}
    assert routes["images/airplanes/image_0001.jpg"] == routes["top-level.JPEG"] == "gpu"
    for name in ("odd/cmyk.jpg", "odd/rotated.jpg", "broken/truncated.jpg", "odd/rgba.png",
                 "odd/photo.webp", "odd/animated.gif"):
        assert routes[name] == "cpu", name  # what nvJPEG does not decode as the CPU path does
    for name in ("broken/empty.jpg", "broken/text.jpg", "broken/bomb.png"):
        with pytest.raises(ImageDecodeError) as refused:
            read_header(files[name])
        assert route(files[name]) == ("error", str(refused.value)), name
    assert route(jpeg_bytes(1), max_pixels=96 * 72 - 1)[1].startswith("too large")
    assert route(jpeg_bytes(1) + b"\0\n")[0] == "gpu"  # padding after the end marker


def test_one_corrupt_file_fails_only_itself_and_workers_change_nothing():
    files = mixed_batch()
    alone = GpuJpegDecoder(Preprocessing(), torch.device("cpu")).decode(files)
    with ThreadPoolExecutor(3) as pool:
        pooled = GpuJpegDecoder(Preprocessing(), "cpu", executor=pool).decode(files)
    errors = [r.error.split(":")[0] if r.error else None for r in alone]
    assert errors == [None, None, "corrupt or truncated JPEG", None, None, None,
                      "corrupt or truncated JPEG", None, None]
    for data, a, b in zip(files, alone, pooled, strict=True):
        expected = cpu_path(data)
        assert a.error == b.error == (expected if isinstance(expected, str) else None)
        if a.error is None:
            assert torch.equal(a.tensor, expected[0]) and torch.equal(b.tensor, expected[0])
            assert (a.width, a.height) == expected[1:]


def test_gpu_batches_are_bounded_by_pixels_not_by_count():
    items = [(i, b"", 4000, 3000) for i in range(5)]  # 12-megapixel photos
    chunks = list(_chunks_by_pixels(items, 25_000_000))
    assert [[item[0] for item in chunk] for chunk in chunks] == [[0, 1], [2, 3], [4]]
    assert [len(c) for c in _chunks_by_pixels(items[:1], 1)] == [1]  # one alone may exceed
    assert GPU_BATCH_PIXELS // (4000 * 3000) >= 16  # a useful batch of such photos per call


@pytest.mark.gpu
@needs_cuda
def test_gpu_crops_match_the_cpu_path(tmp_path):
    files = corpus(tmp_path)
    decoder = GpuJpegDecoder(Preprocessing(), torch.device("cuda"))
    results = decoder.decode(list(files.values()))
    embedder = Embedder(load_weights("random:0"), device="cuda", precision="fp32")
    for (name, data), result in zip(files.items(), results, strict=True):
        expected = cpu_path(data)
        if isinstance(expected, str):
            assert result.tensor is None and result.error.split(":")[0] == expected.split(":")[0]
            continue
        assert result.tensor.is_cuda, name
        difference = (result.tensor.float() - expected[0].cuda().float()).abs().mean().item()
        assert difference < 2.0, (name, difference)  # nvJPEG's IDCT is not libjpeg-turbo's
        a, b = embedder(result.tensor[None])[0], embedder(expected[0][None])[0]
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999, name


@pytest.mark.gpu
@needs_cuda
def test_on_the_gpu_a_corrupt_file_fails_only_itself_and_fallbacks_are_exact():
    files = mixed_batch()
    results = GpuJpegDecoder(Preprocessing(), torch.device("cuda")).decode(files)
    errors = [r.error.split(":")[0] if r.error else None for r in results]
    # If nvJPEG ever decodes the bad Huffman table, the batch fallback is not exercised here.
    assert errors == [None, None, "corrupt or truncated JPEG", None, None, None,
                      "corrupt or truncated JPEG", None, None], [r.error for r in results]
    for position, (data, result) in enumerate(zip(files, results, strict=True)):
        if result.error is None:
            expected, width, height = cpu_path(data)
            assert result.tensor.is_cuda and result.tensor.shape == (3, 224, 224)
            assert (result.width, result.height) == (width, height)
            if position in (4, 5):  # PNG and oriented JPEG: the CPU path, pinned and copied
                assert torch.equal(result.tensor.cpu(), expected), position
            else:
                assert (result.tensor.cpu().float() - expected.float()).abs().mean() < 2.0


@pytest.mark.gpu
@needs_cuda
def test_decoders_in_threads_with_their_own_streams_agree():
    files = [jpeg_bytes(seed, (500, 375)) for seed in range(48)]
    alone = [r.tensor.cpu() for r in GpuJpegDecoder(Preprocessing(), "cuda").decode(files)]
    outputs: dict[int, list[torch.Tensor]] = {}

    def replica(index: int) -> None:
        decoder = GpuJpegDecoder(Preprocessing(), torch.device("cuda"))
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            crops = [r.tensor for r in decoder.decode(files[index::2])]
            stacked = torch.stack(crops).float().sum()  # work queued on this stream
        stream.synchronize()
        assert torch.isfinite(stacked)
        outputs[index] = [crop.cpu() for crop in crops]

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(a, b) for a, b in zip(alone[0::2], outputs[0], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(alone[1::2], outputs[1], strict=True))


@pytest.mark.gpu
@needs_cuda
def test_extraction_on_cuda_equals_the_cpu_run(tmp_path):
    pytest.importorskip("tqdm", reason="the extract job needs tqdm")  # bare GPU images lack it
    from jobs.extract import main as extract

    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / device
        assert extract([str(REPO / "examples/images"), "--out", str(outs[device]), "--weights",
                        "random:0", "--device", device, "--runner", "local"]) == 0
    cpu = pq.read_table(outs["cpu"]).sort_by("id")
    gpu = pq.read_table(outs["cuda"]).sort_by("id")
    assert cpu["id"].equals(gpu["id"]) and gpu["error"].null_count == gpu.num_rows
    a, b = embeddings_to_numpy(cpu["embedding"]), embeddings_to_numpy(gpu["embedding"])
    cosines = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosines.min() > 0.995, cosines  # fp16 autocast and nvJPEG against fp32 on the CPU
