"""Throughput of extraction on one GPU, and of FAISS on it; run by bench/gpu_check.sh.

Prints a table of images/s on synthetic 500x375 JPEGs (smooth random scenes, quality 90):
  model only      the model (fp16 autocast, channels-last) on crops already on the GPU;
  GPU decode      nvJPEG + resize + crop (pipeline.gpu), no model;
  (a)             CPU decode (a thread per spare core, running ahead) + the model on the GPU;
  (b) 1 replica   GPU decode + the model, one thread;
  (b) 2 replicas  the same in two threads, each with its own model and CUDA stream;
then FAISS build and search on the GPU against the CPU (IndexFlatIP, IVF), when FAISS is
importable (CPU searches use at most 1,000 queries, and report queries/s).

Needs torch and torchvision only. Without the pipeline's own dependencies (pydantic, Pillow,
PyYAML) it says what is missing and times torchvision's decoder and AlexNet directly, the same
operations. Without CUDA it says so, skips the GPU rows, and times (a) with the model on the
CPU on a few images, so that the script itself is checked anywhere.

    python bench/gpu_check.py [--images 3000] [--batch-size 128] [--faiss-rows 200000]
    python bench/gpu_check.py --checks     # the gpu tests' checks, for a machine without pytest
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
import torchvision.transforms.v2.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    from pipeline.decode import decode_image
    from pipeline.gpu import GpuJpegDecoder
    from pipeline.model import Embedder, load_weights
    from pipeline.provenance import Preprocessing

    MISSING = None
except ImportError as err:  # a bare GPU image: torch and torchvision, not our dependencies
    MISSING = f"{err.name or err}"


def synthetic_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """500x375 JPEGs of smooth random scenes with some noise (like photos, not like static)."""

    def one(index: int) -> bytes:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        coarse = torch.rand(1, 3, 12, 16, generator=generator)
        image = nnf.interpolate(coarse, size=(375, 500), mode="bicubic", align_corners=False)[0]
        image = image + 0.04 * torch.randn(image.shape, generator=generator)
        return bytes(encode_jpeg((image.clamp(0, 1) * 255).to(torch.uint8), quality=90).numpy())

    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, range(count)))


class BareDecoder:
    """torchvision's decode_jpeg, resize and crop: pipeline.gpu's operations, for a machine
    where the pipeline cannot be imported (no header checks, JPEGs only)."""

    def __init__(self, device):
        self.device = torch.device(device)

    def decode(self, files: list[bytes]) -> list:
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        return [_Crop(crop(image)) for image in images]


class _Crop:
    def __init__(self, tensor):
        self.tensor = tensor


def crop(image: torch.Tensor) -> torch.Tensor:
    return F.center_crop(F.resize(image, [256], antialias=True), [224])


class BareEmbedder:
    """AlexNet (random weights) to fc7 in fp16 autocast and channels-last, as pipeline.model."""

    def __init__(self, device: str):
        from torchvision.models import alexnet

        network = alexnet(weights=None)
        self.device = torch.device(device)
        self.network = torch.nn.Sequential(
            network.features, network.avgpool, torch.nn.Flatten(1), *network.classifier[:6]
        ).eval().to(self.device, memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        on_gpu = self.device.type == "cuda"
        if on_gpu and not images.is_cuda:
            images = images.pin_memory()
        images = images.to(self.device, non_blocking=on_gpu)
        images = images.contiguous(memory_format=torch.channels_last).float().div_(255)
        with torch.autocast("cuda", dtype=torch.float16, enabled=on_gpu):
            return self.network(images).float().cpu().numpy()


def cpu_decoder():
    if MISSING:
        return lambda data: crop(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                             mode=ImageReadMode.RGB))
    preprocessing = Preprocessing()
    return lambda data: decode_image(data, preprocessing)[0]


def gpu_decoder(device):
    return BareDecoder(device) if MISSING else GpuJpegDecoder(Preprocessing(), device)


def embedder(device: str):
    if MISSING:
        return BareEmbedder(device)
    return Embedder(load_weights("random:0"), device=device,
                    precision="fp16" if device == "cuda" else "fp32")


def batches(files: list, size: int) -> list:
    return [files[i : i + size] for i in range(0, len(files), size)]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(run) -> float:
    synchronize()
    started = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - started


def cpu_decode_then_model(files, batch_size, model, threads) -> float:
    """map() submits every decode at once, so decoding runs ahead while the model works."""
    decode = cpu_decoder()

    def run():
        with ThreadPoolExecutor(threads) as pool:
            crops = pool.map(decode, files)
            for batch in batches(files, batch_size):
                model(torch.stack([next(crops) for _ in batch]))

    return len(files) / timed(run)


def gpu_decode_then_model(files, batch_size, models) -> float:
    """Each model (replica) in its own thread and CUDA stream, taking batches in turn."""
    work = batches(files, batch_size)

    def replica(index: int) -> None:
        decoder = gpu_decoder(models[index].device)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for batch in work[index :: len(models)]:
                crops = [r.tensor for r in decoder.decode(batch)]
                models[index](torch.stack(crops))
        stream.synchronize()

    def run():
        threads = [threading.Thread(target=replica, args=(i,)) for i in range(len(models))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return len(files) / timed(run)


def gpu_decode_only(files, batch_size) -> float:
    decoder = gpu_decoder(torch.device("cuda"))
    return len(files) / timed(lambda: [decoder.decode(b) for b in batches(files, batch_size)])


def model_only(files, batch_size, model) -> float:
    crops = torch.zeros(batch_size, 3, 224, 224, dtype=torch.uint8, device=model.device)
    runs = max(1, len(files) // batch_size)
    return runs * batch_size / timed(lambda: [model(crops) for _ in range(runs)])


def row(name: str, where: str, images: int, rate: float | None, note: str = "") -> None:
    figure = f"{rate:10,.0f}" if rate is not None else f"{'-':>10}"
    print(f"  {name:<16} {where:<34} {images:>7,} {figure}   {note}")


def throughput(args, on_gpu: bool, cores: int) -> None:
    count = args.images if on_gpu else 48
    files = synthetic_jpegs(count)
    print(f"{count:,} synthetic 500x375 JPEGs, {sum(map(len, files)) / count / 1024:.0f} KiB on "
          f"average; batch {args.batch_size}\n")
    print(f"  {'run':<16} {'decode + model':<34} {'images':>7} {'images/s':>10}   note")
    threads = max(1, cores - 1)
    device = "cuda" if on_gpu else "cpu"
    first = embedder(device)
    first(torch.zeros(2, 3, 224, 224, dtype=torch.uint8))  # warm-up: kernels, allocator
    if on_gpu:
        row("model only", "crops on the GPU, fp16", count,
            model_only(files, args.batch_size, first))
        gpu_decoder(torch.device("cuda")).decode(files[:8])  # warm-up: nvJPEG's state
        row("GPU decode", "nvJPEG + resize + crop, no model", count,
            gpu_decode_only(files, args.batch_size))
    a = cpu_decode_then_model(files, args.batch_size, first, threads)
    row("(a)", f"CPU ({threads} threads) + model on {device}", count, a)
    if not on_gpu:
        row("(b) 1 replica", "GPU + model on GPU", count, None, "skipped: no CUDA")
        row("(b) 2 replicas", "GPU + model on GPU", count, None, "skipped: no CUDA")
        return
    b1 = gpu_decode_then_model(files, args.batch_size, [first])
    row("(b) 1 replica", "GPU + model on GPU", count, b1, f"b/a {b1 / a:.2f}")
    second = embedder(device)
    second(torch.zeros(2, 3, 224, 224, dtype=torch.uint8))
    b2 = gpu_decode_then_model(files, args.batch_size, [first, second])
    row("(b) 2 replicas", "GPU + model on GPU, 2 streams", count, b2, f"vs 1 replica {b2 / b1:.2f}")
    best = max((a, "(a) CPU decode"), (b1, "(b) one replica"), (b2, "(b) two replicas"))
    print(f"\n  fastest: {best[1]} ({best[0]:,.0f} images/s)")


def faiss_figures(on_gpu: bool, rows: int, queries: int, cpu_queries: int) -> None:
    try:
        # Through the pipeline, which sets OpenBLAS up before FAISS loads (and needs pydantic).
        from pipeline.index.faiss_env import faiss
    except ImportError as err:
        print(f"FAISS: skipped, not importable here ({err})")
        return
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    print(f"FAISS {faiss.__version__}: {rows:,} x 4096 float32 (random, normalised), k=10, "
          f"nprobe 32; GPUs seen by FAISS: {gpus}"
          + ("" if gpus or not on_gpu else " (a CPU-only build: GPU figures skipped)"))
    rng = np.random.default_rng(0)
    base = rng.random((rows, 4096), dtype=np.float32)
    query = base[rng.choice(rows, queries, replace=False)]
    faiss.normalize_L2(base)
    faiss.normalize_L2(query)
    print(f"\n  {'where':<5} {'index':<14} {'build s':>8} {'queries':>8} {'search s':>9} "
          f"{'queries/s':>10}")
    timings = {}
    kinds = ("Flat", f"IVF{1024 if rows >= 100_000 else 128},Flat")  # 39+ points per list
    resources = faiss.StandardGpuResources() if on_gpu and gpus else None
    for where in ["cpu", "gpu"] if resources else ["cpu"]:
        for kind in kinds:
            index = faiss.index_factory(4096, kind, faiss.METRIC_INNER_PRODUCT)
            if where == "gpu":
                index = faiss.index_cpu_to_gpu(resources, 0, index)
            started = time.perf_counter()
            if not index.is_trained:
                index.train(base[: min(rows, 64 * 1024)])
            index.add(base)
            built = time.perf_counter() - started
            if kind.startswith("IVF"):
                faiss.ParameterSpace().set_index_parameter(index, "nprobe", 32)
            asked = query if where == "gpu" else query[:cpu_queries]
            started = time.perf_counter()
            index.search(asked, 10)
            searched = time.perf_counter() - started
            timings[(where, kind)] = (built, len(asked) / searched)
            print(f"  {where:<5} {kind:<14} {built:8.2f} {len(asked):8,} {searched:9.3f} "
                  f"{len(asked) / searched:10,.0f}")
            del index
    for kind in kinds:
        if ("gpu", kind) in timings:
            cpu, gpu = timings[("cpu", kind)], timings[("gpu", kind)]
            print(f"  {kind}: GPU against CPU, build {cpu[0] / gpu[0]:.1f}x faster, search "
                  f"{gpu[1] / cpu[1]:.1f}x the queries/s")


def checks() -> int:
    """The gpu tests' main checks without pytest: GPU crops against the CPU path on the bundled
    photos, a corrupt file in a batch, a PNG through the CPU fallback."""
    if MISSING:
        print(f"checks: skipped, the pipeline cannot be imported ({MISSING} is missing)")
        return 1
    if not torch.cuda.is_available():
        print("checks: skipped, no CUDA")
        return 0
    import io

    from PIL import Image

    preprocessing = Preprocessing()
    files = {p.relative_to(REPO).as_posix(): p.read_bytes()
             for p in sorted((REPO / "examples/images").rglob("*.jpg"))}
    photo = Image.open(io.BytesIO(next(iter(files.values()))))
    png = io.BytesIO()
    photo.save(png, format="PNG")
    files["a PNG"] = png.getvalue()
    corrupt = bytearray(synthetic_jpegs(1)[0])  # no EXIF thumbnail with tables of its own
    dht = corrupt.find(b"\xff\xc4")
    corrupt[dht + 4] = 0x1F  # Huffman table index 15: no decoder accepts it
    files["a corrupt JPEG"] = bytes(corrupt)
    results = GpuJpegDecoder(preprocessing, torch.device("cuda")).decode(list(files.values()))
    model = embedder("cuda")
    failed = 0
    for (name, data), result in zip(files.items(), results, strict=True):
        if name == "a corrupt JPEG":
            ok = result.tensor is None and result.error.startswith("corrupt or truncated JPEG")
            detail = result.error
        elif result.error is not None:
            ok, detail = False, result.error
        else:
            expected = decode_image(data, preprocessing)[0]
            difference = (result.tensor.cpu().float() - expected.float()).abs().mean().item()
            a, b = model(result.tensor[None])[0], model(expected[None])[0]
            cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            exact = name == "a PNG"
            ok = (difference == 0 if exact else difference < 2.0) and cosine > 0.999
            detail = f"mean abs difference {difference:.3f}, cosine {cosine:.5f}"
        failed += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    print(f"checks: {len(files) - failed} passed, {failed} failed")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000,
                        help="JPEGs on a GPU; 48 without one (default: 3000)")
    parser.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
    parser.add_argument("--faiss-rows", type=int, default=200_000,
                        help="vectors for the FAISS figures; 20,000 without a GPU "
                             "(default: 200000)")
    parser.add_argument("--checks", action="store_true",
                        help="run the gpu tests' checks directly, then stop (default: off)")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    if args.checks:
        return checks()
    cores = len(os.sched_getaffinity(0))
    import torchvision

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {cores} CPU "
          f"cores, CUDA: " + (torch.cuda.get_device_name(0) if on_gpu
                              else "none (the GPU rows are skipped)"))
    if MISSING:
        print(f"The pipeline cannot be imported ({MISSING} is missing): timing torchvision's "
              f"decoder and AlexNet directly, the same operations without header checks")
    print()
    throughput(args, on_gpu, cores)
    print()
    if on_gpu:
        faiss_figures(True, args.faiss_rows, 10_000, 1_000)
    else:
        faiss_figures(False, 20_000, 200, 200)
    return 0


if __name__ == "__main__":
    sys.exit(main())
