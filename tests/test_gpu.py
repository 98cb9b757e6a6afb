"""JPEG decoding on the GPU (pipeline.gpu) and extraction on CUDA.

The first test runs everywhere: on the CPU device the batched decoder must give exactly what the
CPU path gives, files and errors alike. The others need CUDA (marked `gpu`, skipped without it;
`bench/gpu_check.sh` runs them on a GPU machine).
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, hostile_corpus

from jobs.extract import main as extract
from pipeline.decode import ImageDecodeError, decode_image
from pipeline.gpu import GPU_BATCH_PIXELS, GpuJpegDecoder, _chunks_by_pixels
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
        files[path.name] = path.read_bytes()
    return files


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
def test_extraction_on_cuda_equals_the_cpu_run(tmp_path):
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
