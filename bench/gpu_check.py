"""Throughput of extraction on one GPU, and of FAISS on it; run by bench/gpu_check.sh.

Prints images/s on synthetic 500x375 JPEGs (smooth random scenes, quality 90) for
  (a) CPU decode (a thread per spare core) + the model on the GPU (fp16, channels-last);
  (b) GPU decode (nvJPEG, pipeline.gpu) + the model on the GPU;
  (c) (b) with two model replicas on the GPU, each in its own thread and CUDA stream;
and the ratios b/a and c/b; then FAISS build and search times on the GPU against the CPU.
Without CUDA it says so, skips (b), (c) and FAISS on the GPU, and times (a) with the model on
the CPU on a few images, so that the script itself is checked anywhere.

    python bench/gpu_check.py [--images 3000] [--batch-size 128]
"""

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision.io import encode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.decode import decode_image  # noqa: E402
from pipeline.gpu import GpuJpegDecoder  # noqa: E402
from pipeline.model import Embedder, load_weights  # noqa: E402
from pipeline.provenance import Preprocessing  # noqa: E402


def synthetic_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """500x375 JPEGs of smooth random scenes with some noise (like photos, not like static)."""
    generator = torch.Generator().manual_seed(seed)
    files = []
    for _ in range(count):
        coarse = torch.rand(1, 3, 12, 16, generator=generator)
        image = nnf.interpolate(coarse, size=(375, 500), mode="bicubic", align_corners=False)[0]
        image = image + 0.04 * torch.randn(image.shape, generator=generator)
        pixels = (image.clamp(0, 1) * 255).to(torch.uint8)
        files.append(bytes(encode_jpeg(pixels, quality=90).numpy()))
    return files


def batches(files: list[bytes], size: int):
    return [files[i : i + size] for i in range(0, len(files), size)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_decode_then_model(files, batch_size, embedder, threads) -> float:
    preprocessing = Preprocessing()
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        for batch in batches(files, batch_size):
            tensors = list(pool.map(lambda d: decode_image(d, preprocessing)[0], batch))
            embedder(torch.stack(tensors))
        synchronize(embedder.device)
    return len(files) / (time.perf_counter() - started)


def gpu_decode_then_model(files, batch_size, embedders) -> float:
    """Each embedder (replica) in its own thread and CUDA stream, taking batches in turn."""
    work = batches(files, batch_size)
    device = embedders[0].device

    def replica(index: int) -> None:
        decoder = GpuJpegDecoder(Preprocessing(), device)
        with torch.cuda.stream(torch.cuda.Stream(device)):
            for batch in work[index :: len(embedders)]:
                crops = [r.tensor for r in decoder.decode(batch)]
                embedders[index](torch.stack(crops))

    started = time.perf_counter()
    threads = [threading.Thread(target=replica, args=(i,)) for i in range(len(embedders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    synchronize(device)
    return len(files) / (time.perf_counter() - started)


def faiss_figures(on_gpu: bool, rows: int, queries: int) -> None:
    try:
        from pipeline.index.faiss_env import faiss
    except ImportError as err:
        print(f"FAISS: skipped, not importable here ({err})")
        return
    rng = np.random.default_rng(0)
    base = rng.random((rows, 4096), dtype=np.float32)
    query = base[rng.choice(rows, queries, replace=False)]
    faiss.normalize_L2(base)
    faiss.normalize_L2(query)
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    print(f"FAISS {faiss.__version__}: {rows:,} x 4096 float32, {queries:,} queries, k=10; "
          f"GPUs seen by FAISS: {gpus}")
    timings = {}
    kinds = ("Flat", f"IVF{1024 if rows >= 100_000 else 128},Flat")  # 39+ points per list
    for where in ["cpu", "gpu"] if on_gpu and gpus else ["cpu"]:
        for kind in kinds:
            index = faiss.index_factory(4096, kind, faiss.METRIC_INNER_PRODUCT)
            if where == "gpu":
                resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(resources, 0, index)
            started = time.perf_counter()
            if not index.is_trained:
                index.train(base[: min(rows, 64 * 1024)])
            index.add(base)
            built = time.perf_counter() - started
            if kind.startswith("IVF"):
                faiss.ParameterSpace().set_index_parameter(index, "nprobe", 32)
            started = time.perf_counter()
            index.search(query, 10)
            searched = time.perf_counter() - started
            timings[(where, kind)] = (built, searched)
            print(f"  {where} {kind:<14} build {built:7.2f} s   search {searched:7.3f} s "
                  f"({queries / searched:,.0f} queries/s)")
    for kind in kinds:
        if ("gpu", kind) in timings:
            cpu, gpu = timings[("cpu", kind)], timings[("gpu", kind)]
            print(f"  {kind}: GPU/CPU speed-up, build {cpu[0] / gpu[0]:.1f}x, search "
                  f"{cpu[1] / gpu[1]:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="JPEGs on a GPU (default 3000)")
    parser.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
    parser.add_argument("--faiss-rows", type=int, default=200_000,
                        help="vectors for the FAISS figures on a GPU (default 200,000)")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    cores = len(os.sched_getaffinity(0))
    print(f"torch {torch.__version__}, {cores} CPU cores, CUDA: "
          + (torch.cuda.get_device_name(0) if on_gpu else "none (GPU parts skipped)"))
    count = args.images if on_gpu else 48
    files = synthetic_jpegs(count)
    print(f"{count} synthetic 500x375 JPEGs, {sum(map(len, files)) / count / 1024:.0f} KiB "
          f"each on average; batch {args.batch_size}")
    device = "cuda" if on_gpu else "cpu"
    weights = load_weights("random:0")
    embedder = Embedder(weights, device=device, precision="fp16" if on_gpu else "fp32")
    embedder(torch.zeros(2, 3, 224, 224, dtype=torch.uint8))  # warm-up: kernels, allocator
    a = cpu_decode_then_model(files, args.batch_size, embedder, max(1, cores - 1))
    print(f"(a) CPU decode ({max(1, cores - 1)} threads) + model on {device}: {a:8.1f} img/s")
    if not on_gpu:
        print("(b), (c): skipped, no CUDA")
        faiss_figures(False, 20_000, 1_000)
        return
    GpuJpegDecoder(Preprocessing(), embedder.device).decode(files[:8])  # warm-up: nvJPEG
    b = gpu_decode_then_model(files, args.batch_size, [embedder])
    print(f"(b) GPU decode + model on GPU, one replica:          {b:8.1f} img/s   b/a {b / a:.2f}")
    second = Embedder(weights, device=device, precision="fp16")
    c = gpu_decode_then_model(files, args.batch_size, [embedder, second])
    print(f"(c) GPU decode + model on GPU, two replicas:         {c:8.1f} img/s   c/b {c / b:.2f}")
    faiss_figures(True, args.faiss_rows, 10_000)


if __name__ == "__main__":
    main()
