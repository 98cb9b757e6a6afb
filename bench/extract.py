"""Extraction speed on ~2,000 real Caltech-101 photos, in one run, against a naive script:

  (a) the naive script a user would write (ImageFolder + DataLoader + stock AlexNet, fp32,
      embeddings saved with numpy), run as a whole process: whole-process and steady-state
      images/s (steady: after its first batch);
  (b) the project's own decode and model code in a single-process loop (steady state);
  (c) `fc7 extract` fp32, as a user runs it (a subprocess): whole command and steady state;
  (d) `fc7 extract --precision int8`: whole command with the int8 model built (a fresh cache),
      whole command with it cached (a second output over the same photos), and steady state;
  (e) with --ray, `fc7 extract --runner ray` (the embedded local Ray) for reference;
  (f) the 12 bundled example photos: the whole `fc7 extract` against the time a bare
      `import torch, torchvision, pyarrow` takes, i.e. what fc7 adds to its imports.

Every ratio is printed against (a): steady over steady, whole over whole. Random weights (the
speed is the same as ImageNet's; the int8 fidelity figures are not: see the printed gate).

With --model, instead, each named backbone (`all`: every one fc7 offers) at its default layer:
the naive script with that torchvision network and its weights' transforms, against
`fc7 extract --model`, steady state and whole command, with the ratio.

    python bench/extract.py [--per-class 20] [--ray]
    python bench/extract.py --model all --per-class 5
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.decode import decode_image  # noqa: E402
from pipeline.model import Embedder, load_weights  # noqa: E402
from pipeline.provenance import MODEL_LAYERS  # noqa: E402

CALTECH = REPO.parent / "shared/datasets/caltech101/101_ObjectCategories"

# What a user writes without fc7, timed from the interpreter's start to its end: AlexNet to
# fc7, or (argv[4]) any torchvision network whole, its last layer costing little next to the
# convolutions; each with its ImageNet weights' transforms.
NAIVE_ALEXNET = """
import sys, time, numpy as np, torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.models import AlexNet_Weights, alexnet
model = alexnet().eval()
model.classifier = model.classifier[:6]  # fc7, after its ReLU
data = ImageFolder(sys.argv[1], transform=AlexNet_Weights.IMAGENET1K_V1.transforms())
"""
NAIVE_ANY = """
import sys, time, numpy as np, torch, torchvision
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
model = torchvision.models.get_model(sys.argv[4]).eval()
transform = torchvision.models.get_model_weights(sys.argv[4]).DEFAULT.transforms()
data = ImageFolder(sys.argv[1], transform=transform)
"""
NAIVE_LOOP = """
vectors = []
with torch.inference_mode():
    for i, (images, _) in enumerate(DataLoader(data, batch_size=64, num_workers=int(sys.argv[3]))):
        vectors.append(model(images).numpy())
        if i == 0:
            started, first = time.perf_counter(), len(images)
steady = (len(data) - first) / (time.perf_counter() - started)
np.save(sys.argv[2], np.concatenate(vectors))
print(f"steady {steady:.1f}")
"""


def chosen_photos(per_class: int) -> list[Path]:
    return [p for d in sorted(CALTECH.iterdir()) for p in sorted(d.glob("*.jpg"))[:per_class]]


def as_folder(files: list[Path], root: Path) -> Path:
    """The photos as an ImageFolder tree of symlinks (what the naive script and fc7 read)."""
    for path in files:
        link = root / path.parent.name / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return root


def naive(folder: Path, scratch: Path, workers: int, model: str = "") -> tuple[float, float]:
    script = scratch / "naive.py"
    script.write_text((NAIVE_ANY if model else NAIVE_ALEXNET) + NAIVE_LOOP)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), str(folder), str(scratch / "naive.npy"),
                           str(workers), model], capture_output=True, text=True, check=True)
    whole = time.perf_counter() - started
    return whole, float(re.search(r"steady ([\d.]+)", done.stdout).group(1))


def own_loop(files: list[Path], batch: int) -> float:
    embedder = Embedder(load_weights("random:0"), "fc7", device="cpu")
    started = time.perf_counter()
    for start in range(0, len(files), batch):
        tensors = [decode_image(p.read_bytes(), embedder.preprocessing)[0]
                   for p in files[start : start + batch]]
        embedder(torch.stack(tensors))
    return len(files) / (time.perf_counter() - started)


def fc7_extract(folder: Path, out: Path, *options: str, env: dict | None = None):
    """(seconds for the whole command, steady images/s, its output) of one `fc7 extract`."""
    command = [sys.executable, "-m", "jobs.cli", "extract", str(folder), "--out", str(out),
               "--weights", "random:0", *options]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})})
    whole = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    steady = float(re.search(r"([\d.]+) images/s once the workers", done.stdout).group(1))
    return whole, steady, done.stdout


def bundled_example(scratch: Path) -> tuple[float, float]:
    """(seconds to import torch, torchvision and pyarrow; seconds of the whole `fc7 extract`
    of the 12 bundled photos), each the best of three runs."""
    imports, whole = [], []
    for attempt in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, torchvision, pyarrow"], check=True)
        imports.append(time.perf_counter() - started)
        whole.append(fc7_extract(REPO / "examples/images", scratch / f"example-{attempt}")[0])
    return min(imports), min(whole)


def per_backbone(models: list[str], files: list[Path], args: argparse.Namespace) -> None:
    """Each model at its default layer: the naive script against `fc7 extract --model`."""
    count = len(files)
    table = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        folder = as_folder(files, scratch / "photos")
        for model in models:
            layer = next(iter(MODEL_LAYERS[model]))
            naive_whole, naive_steady = naive(folder, scratch, args.workers, model)
            whole, steady, _ = fc7_extract(folder, scratch / model, "--model", model,
                                           "--batch-size", str(args.batch_size))
            table.append((model, layer, MODEL_LAYERS[model][layer], naive_steady, steady,
                          count / naive_whole, count / whole))
            print(f"{model}: naive {naive_steady:.1f} img/s steady ({naive_whole:.1f} s whole), "
                  f"fc7 extract {steady:.1f} img/s steady ({whole:.1f} s whole)", flush=True)
    print(f"\n{'model':<16} {'layer':<8} {'width':>6}  {'naive':>7}  {'fc7':>7}  ratio  "
          f"(steady img/s; whole command: naive, fc7, ratio)")
    for model, layer, width, naive_steady, steady, naive_whole, whole in table:
        print(f"{model:<16} {layer:<8} {width:>6}  {naive_steady:7.1f}  {steady:7.1f}  "
              f"{steady / naive_steady:4.2f}x  ({naive_whole:.1f}, {whole:.1f}, "
              f"{whole / naive_whole:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=20,
                        help="photos per class (default: 20, about 2,000 in all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="DataLoader workers of the naive script (default: CPU count)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    parser.add_argument("--ray", action="store_true", help="also time --runner ray")
    parser.add_argument("--model", action="append", choices=[*MODEL_LAYERS, "all"],
                        help="time these backbones instead (repeat it, or 'all')")
    args = parser.parse_args()
    if not CALTECH.is_dir():
        sys.exit(f"{CALTECH} is absent: this benchmark needs ../shared/datasets")
    files = chosen_photos(args.per_class)
    count = len(files)
    print(f"{count} photos, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if args.model:
        per_backbone(list(MODEL_LAYERS) if "all" in args.model else args.model, files, args)
        return
    rows = []  # (label, images/s, steady or whole)

    def show(label: str, per_second: float, kind: str) -> None:
        rows.append((label, per_second, kind))
        print(f"{label:<58} {per_second:7.1f} img/s", flush=True)

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        folder = as_folder(files, scratch / "photos")
        whole, steady = naive(folder, scratch, args.workers)
        show(f"(a) naive script, whole process ({whole:.1f} s)", count / whole, "whole")
        show("(a) naive script, steady state", steady, "steady")
        show("(b) own decode + model loop, one process", own_loop(files, args.batch_size),
             "steady")
        batch = ("--batch-size", str(args.batch_size))
        whole, steady, _ = fc7_extract(folder, scratch / "fp32", *batch)
        show(f"(c) fc7 extract fp32, whole command ({whole:.1f} s)", count / whole, "whole")
        show("(c) fc7 extract fp32, steady state", steady, "steady")
        cache = {"FC7_CACHE": str(scratch / "cache")}
        whole, steady, printed = fc7_extract(folder, scratch / "int8", *batch, "--precision",
                                             "int8", env=cache)
        gate = [line for line in printed.splitlines() if "cosine" in line]
        show(f"(d) fc7 extract int8, whole, model built ({whole:.1f} s)", count / whole, "whole")
        whole, steady, _ = fc7_extract(folder, scratch / "int8-again", *batch, "--precision",
                                       "int8", env=cache)
        show(f"(d) fc7 extract int8, whole, model cached ({whole:.1f} s)", count / whole,
             "whole")
        show("(d) fc7 extract int8, steady state", steady, "steady")
        if args.ray:
            whole, steady, _ = fc7_extract(folder, scratch / "ray", *batch, "--runner", "ray")
            show(f"(e) fc7 extract --runner ray, whole ({whole:.1f} s)", count / whole, "whole")
            show("(e) fc7 extract --runner ray, steady state", steady, "steady")
        imports, whole = bundled_example(scratch)
    print(f"\n(f) 12 bundled photos: fc7 extract {whole:.2f} s, the imports alone {imports:.2f}"
          f" s: {whole - imports:.2f} s of fc7's own")
    print("\nint8 gate (random weights):", *gate, sep="\n  ")
    baseline = {kind: per_second for label, per_second, kind in rows[:2]}
    print("\nratios against (a), steady over steady and whole over whole:")
    for label, per_second, kind in rows[2:]:
        print(f"  {label:<58} {per_second / baseline[kind]:5.2f}x")


if __name__ == "__main__":
    main()
