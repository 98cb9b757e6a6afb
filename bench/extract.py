"""Extraction throughput on ~2,000 real Caltech-101 photos, three ways, in one run:

  (a) naive baseline: torchvision ImageFolder + DataLoader + the stock fp32 model;
  (b) the project's own decode and model code in a single-process loop, no Ray;
  (c) `fc7 extract` through Ray (a subprocess, as a user runs it);
  (d) for reference, the same decode and model as a plain Ray Data pipeline (read, decode with
      map_batches tasks, embed in one actor, write_parquet), the design fc7 does not use.

Prints images/s and the ratios c/a, c/b and c/d. Random weights (the speed is the same).

    python bench/extract.py [--per-class 20] [--workers 2]
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.models import AlexNet_Weights, alexnet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.decode import decode_image  # noqa: E402
from pipeline.model import Embedder, load_weights  # noqa: E402
from pipeline.provenance import Preprocessing  # noqa: E402

CALTECH = REPO.parent / "shared/datasets/caltech101/101_ObjectCategories"


def chosen_photos(per_class: int) -> list[Path]:
    return [p for d in sorted(CALTECH.iterdir()) for p in sorted(d.glob("*.jpg"))[:per_class]]


def naive(files: list[Path], workers: int, batch: int) -> float:
    keep = {str(p) for p in files}
    data = ImageFolder(str(CALTECH), transform=AlexNet_Weights.IMAGENET1K_V1.transforms(),
                       is_valid_file=lambda path: path in keep)
    model = alexnet(weights=None).eval()
    model.load_state_dict(load_weights("random:0").state_dict)
    fc7 = torch.nn.Sequential(model.features, model.avgpool, torch.nn.Flatten(1),
                              *model.classifier[:6])
    started = time.perf_counter()
    with torch.inference_mode():
        for images, _ in DataLoader(data, batch_size=batch, num_workers=workers):
            fc7(images)
    return len(data) / (time.perf_counter() - started)


def own_loop(files: list[Path], batch: int) -> float:
    embedder = Embedder(load_weights("random:0"), "fc7", device="cpu")
    started = time.perf_counter()
    for start in range(0, len(files), batch):
        tensors = [decode_image(p.read_bytes(), embedder.preprocessing)[0]
                   for p in files[start : start + batch]]
        embedder(torch.stack(tensors))
    return len(files) / (time.perf_counter() - started)


def through_ray(files: list[Path], batch: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as scratch:
        manifest = Path(scratch) / "photos.txt"
        manifest.write_text("\n".join(map(str, files)))
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(REPO / "jobs/extract.py"), str(manifest), "--out",
             f"{scratch}/out", "--weights", "random:0", "--batch-size", str(batch)],
            capture_output=True, text=True, check=True,
        )
        wall = len(files) / (time.perf_counter() - started)
    print(done.stdout)
    steady = float(re.search(r"([\d.]+) images/s once the workers", done.stdout).group(1))
    return wall, steady


def ray_data(files: list[Path], batch: int) -> float:
    import numpy as np
    import ray

    class Embed:
        def __init__(self):
            # Ray sets OMP_NUM_THREADS to the actor's CPUs (1); let torch use every core.
            torch.set_num_threads(os.cpu_count())
            self.embedder = Embedder(load_weights("random:0"), "fc7", device="cpu")

        def __call__(self, rows: dict) -> dict:
            return {"path": rows["path"], "embedding": list(self.embedder(
                torch.from_numpy(np.stack(rows["image"]))))}

    def decode(rows: dict) -> dict:
        images = [decode_image(Path(p).read_bytes(), Preprocessing())[0].numpy()
                  for p in rows["path"]]
        return {"path": rows["path"], "image": images}

    ray.init(include_dashboard=False, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        (ray.data.from_items([{"path": str(p)} for p in files])
         .map_batches(decode, batch_size=batch)
         .map_batches(Embed, batch_size=batch, concurrency=1, num_cpus=1)
         .write_parquet(scratch))
        seconds = time.perf_counter() - started
    ray.shutdown()
    return len(files) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=20,
                        help="photos per class (default: 20, about 2,000 in all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="DataLoader workers for the baseline (default: CPU count)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    args = parser.parse_args()
    if not CALTECH.is_dir():
        sys.exit(f"{CALTECH} is absent: this benchmark needs ../shared/datasets")
    files = chosen_photos(args.per_class)
    print(f"{len(files)} photos, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    a = naive(files, args.workers, args.batch_size)
    print(f"(a) ImageFolder + DataLoader({args.workers} workers) + fp32 model: {a:7.1f} img/s")
    b = own_loop(files, args.batch_size)
    print(f"(b) own decode + model, one process, no Ray:       {b:7.1f} img/s")
    c_wall, c_steady = through_ray(files, args.batch_size)
    print(f"(c) fc7 extract through Ray, whole command:         {c_wall:7.1f} img/s")
    print(f"(c) fc7 extract through Ray, once workers are up:   {c_steady:7.1f} img/s")
    d = ray_data(files, args.batch_size)
    print(f"(d) plain Ray Data pipeline, after ray.init:       {d:7.1f} img/s")
    print(f"c/a = {c_steady / a:.2f} (whole command {c_wall / a:.2f}); "
          f"c/b = {c_steady / b:.2f} (whole command {c_wall / b:.2f}); c/d = {c_steady / d:.2f}")


if __name__ == "__main__":
    main()
