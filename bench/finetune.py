"""Benchmark `fc7 finetune` on Caltech-101: fc7 before and after training the fully connected
layers, and the time per epoch of its two paths and of one against two Ray Train workers.

Everything runs through the user's commands (`fc7 extract`, `fc7 finetune`, as subprocesses):

1. the DeCAF split (`bench/caltech101.py`'s `decaf_splits`, seeded): `--per-class` images of
   every class to train on, all the others to test on, written as train.csv and test.csv
   manifests (path, label, id);
2. before: fc7 of both splits with the base `--weights`; a linear probe (`fc7 train`'s
   logreg pipeline, `pipeline.classify.build_pipeline`: L2-normalised vectors, scikit-learn
   LogisticRegression, C=`--C`; `--probe standard` standardises instead) fitted on the train
   split and scored on the test split; and retrieval precision@10 on the test split (each test
   image queries the other test images by exact cosine, numpy; relevant = same label);
3. fine-tune on the fast path: pool5 of the train split (`fc7 extract --layer pool5`), then
   `fc7 finetune train.csv --embeddings POOL5 --path embeddings --freeze features --augment
   none` for `--epochs`; fc7 of both splits with `--weights DIR/model.pt`; after: the same probe
   and precision@10. The fine-tune holds out its own validation split from the train split
   (its `--val-fraction`, 0.2 by default): the test split is never seen before the probe;
4. seconds per epoch (the manifest's curves: the training pass plus the validation pass):
   the same fine-tune from the images (`--path images`: decoded once, then the frozen
   convolutions run on every batch of every epoch) and with
   `--num-workers 2`, `--compare-epochs` epochs each, against the fast path with one worker.
   Their first epochs run at the same learning rate, so the image path's epoch-1 validation
   loss should match the fast path's (up to float summation order): a check that both trained
   the same thing. Two workers draw their dropout masks per worker, so theirs differs by that.

    python bench/finetune.py                          # all 101 classes, random:0 weights
    python bench/finetune.py --classes 5              # smoke run, about 5 minutes on 2 cores
    python bench/finetune.py --weights imagenet       # real transfer learning
    python bench/finetune.py --keep out/bench-finetune --skip-image-path

With `--weights random:0` (the default: the ImageNet weights cannot be downloaded everywhere) the
base network is a seeded RANDOM AlexNet: "before" is a floor, and "after" shows what training the
fully connected layers (on frozen random convolutions) buys. With `--weights imagenet` it is a
real transfer-learning comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from caltech101 import decaf_splits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from jobs.cli import COMMANDS  # noqa: E402
from pipeline.classify import TrainConfig, build_pipeline, read_labelled  # noqa: E402
from pipeline.sources import iter_inputs  # noqa: E402
from pipeline.store import EmbeddingDataset  # noqa: E402

DATASET = REPO.parent / "shared" / "datasets" / "caltech101" / "101_ObjectCategories"
# `fc7 finetune` once the console script has it, its job module until then
FINETUNE = ["jobs.cli", "finetune"] if "finetune" in COMMANDS else ["jobs.finetune"]
K = 10  # precision@K
BLOCK = 1024  # query rows per matrix product
# Ray's colour codes and the "(RayTrainWorker pid=N) " prefix of the workers' lines
COLOUR = re.compile(r"\x1b\[[0-9;]*m")
WORKER = re.compile(r"^\(\w+ pid=\d+(, ip=[\d.]+)?\) ")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/finetune.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset", default=str(DATASET), help=f"Caltech-101 class folders (default: {DATASET})"
    )
    parser.add_argument(
        "--weights",
        default="random:0",
        help="base weights: random:SEED, imagenet or a file (default: random:0)",
    )
    parser.add_argument(
        "--epochs", type=int, default=8, help="epochs of the fast-path fine-tune (default: 8)"
    )
    parser.add_argument(
        "--compare-epochs",
        type=int,
        default=2,
        help="epochs of the image-path and two-worker runs, timed only (default: 2)",
    )
    parser.add_argument(
        "--per-class", type=int, default=30, help="training images per class (default: 30)"
    )
    parser.add_argument(
        "--classes",
        type=int,
        default=None,
        help="use N classes (seeded sample) for a smoke run (default: all)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="fc7 finetune --batch-size (default: 32)"
    )
    parser.add_argument("--lr", type=float, default=0.01, help="fc7 finetune --lr (default: 0.01)")
    parser.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="fc7 finetune --dropout; none: fc7 finetune's own default (default: none)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="fc7 finetune --weight-decay; none: fc7 finetune's own default (default: none)",
    )
    parser.add_argument(
        "--probe",
        choices=["l2", "standard"],
        default="l2",
        help="linear probe: fc7 train's logreg pipeline (L2-normalised vectors) or "
        "standardised vectors, both scikit-learn LogisticRegression (default: l2)",
    )
    parser.add_argument(
        "--C", type=float, default=1.0, help="C of the probe's logistic regression (default: 1.0)"
    )
    parser.add_argument(
        "--extract-batch-size",
        type=int,
        default=64,
        help="fc7 extract --batch-size (default: 64)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the split and the fine-tunes (default: 0)"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep manifests, embeddings, fine-tunes, logs and results.json in DIR; a rerun "
        "reuses its base extractions (default: a temporary folder, deleted)",
    )
    parser.add_argument(
        "--skip-image-path",
        action="store_true",
        help="leave out the image-path timing run (default: off)",
    )
    parser.add_argument(
        "--skip-workers",
        action="store_true",
        help="leave out the two-worker timing run (default: off)",
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "compare_epochs", "per_class", "classes", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# -- running fc7 -------------------------------------------------------------------------------


def run(module: list[str], argv: list[str], log: Path) -> float:
    """Run `python -m MODULE ARGV` in its own process; its stdout printed (indented), its
    stderr kept in `log`.

    Returns:
        The wall-clock seconds it took.
    """
    shown = "fc7 " + " ".join(module[1:]) if module[0] == "jobs.cli" else f"python -m {module[0]}"
    print(f"$ {shown} {' '.join(argv)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", *module, *argv],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    wall = time.perf_counter() - started
    lines = [
        WORKER.sub("", COLOUR.sub("", line)) for line in done.stdout.splitlines() if line.strip()
    ]
    if lines:
        print("  " + "\n  ".join(lines), flush=True)
    if done.returncode != 0:
        print(log.read_text()[-5000:], file=sys.stderr)
        raise SystemExit(f"{shown} failed (exit {done.returncode}); log: {log}")
    print(f"  ({wall:.0f} s)", flush=True)
    return wall


def extract(
    args: argparse.Namespace, manifest: Path, out: Path, weights: str, layer: str = "fc7",
    overwrite: bool = False,
) -> float:
    """`fc7 extract` of `manifest` into `out` (resumes: a finished output has nothing to do)."""
    argv = [str(manifest), "--out", str(out), "--weights", weights, "--layer", layer]
    argv += ["--batch-size", str(args.extract_batch_size)]
    return run(["jobs.cli", "extract"], argv + (["--overwrite"] if overwrite else []),
               out.parent / f"{out.name}.log")


@dataclass
class Finetune:
    """One `fc7 finetune` run: its manifest and wall-clock seconds."""

    name: str
    manifest: dict
    wall: float

    @property
    def curves(self) -> list[dict]:
        return self.manifest["curves"]

    @property
    def epoch_seconds(self) -> list[float]:
        return [row["seconds"] for row in self.curves]

    @property
    def median_epoch(self) -> float:
        return statistics.median(self.epoch_seconds)

    @property
    def best(self) -> dict:
        return self.curves[self.manifest["best_epoch"] - 1]


def finetune(
    args: argparse.Namespace, train: Path, out: Path, epochs: int, extra: list[str]
) -> Finetune:
    """`fc7 finetune` of the train split into `out`, always trained afresh (--overwrite)."""
    argv = [
        str(train), "--out", str(out), "--weights", args.weights, "--freeze", "features",
        "--augment", "none", "--epochs", str(epochs), "--batch-size", str(args.batch_size),
        "--lr", str(args.lr), "--seed", str(args.seed), "--overwrite", *extra,
    ]
    for name in ("dropout", "weight_decay"):
        if getattr(args, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    wall = run(FINETUNE, argv, out.parent / f"{out.name}.log")
    manifest = json.loads((out / "manifest.json").read_text())
    return Finetune(out.name, manifest, wall)


# -- the split ---------------------------------------------------------------------------------


def write_split(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """train.csv and test.csv (path, label, id): the DeCAF split of the (chosen) classes."""
    inputs = list(iter_inputs(args.dataset))  # sorted, as fc7 extract lists the folder
    classes = sorted({item.label for item in inputs if item.label})
    if args.classes:
        rng = np.random.default_rng(args.seed)
        chosen = rng.choice(classes, size=min(args.classes, len(classes)), replace=False)
        classes = sorted(str(c) for c in chosen)
        inputs = [item for item in inputs if item.label in set(classes)]
    labels = np.array([item.label for item in inputs], dtype=object)
    train, test = decaf_splits(labels, args.per_class, args.seed)
    folder = work / f"split-c{args.classes or 'all'}-p{args.per_class}-s{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("train", train), ("test", test)):
        path = folder / f"{name}.csv"
        with open(path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["path", "label", "id"])
            writer.writerows([inputs[i].path, inputs[i].label, inputs[i].id] for i in rows)
        paths.append(path)
    counts = np.unique(labels[test], return_counts=True)[1]
    print(
        f"split: {len(classes)} classes, {len(train)} train ({args.per_class} per class, seed "
        f"{args.seed}), {len(test)} test (per class {counts.min()} to {counts.max()}); "
        f"manifests in {folder}"
    )
    if min(np.unique(labels, return_counts=True)[1]) <= args.per_class:
        print(f"  note: some classes have no more than {args.per_class} images: nothing of "
              f"theirs to test on")
    return paths[0], paths[1]


# -- figures -----------------------------------------------------------------------------------


def read(uri: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(vectors, labels, failed rows) of an extraction output."""
    rows = read_labelled(EmbeddingDataset.open(str(uri)), "label", 8192)
    return rows.vectors, rows.labels, rows.skipped_errors


def probe(args: argparse.Namespace, train: Path, test: Path) -> dict:
    """Accuracy on the test split of a logistic regression fitted on the train split."""
    x_train, y_train, failed_train = read(train)
    x_test, y_test, failed_test = read(test)
    if args.probe == "l2":
        config = TrainConfig(
            embeddings="-", out="-", classifier="logreg", C=args.C, seed=args.seed
        )
        model = build_pipeline(config)
    else:
        model = make_pipeline(
            StandardScaler(), LogisticRegression(C=args.C, max_iter=1000, random_state=args.seed)
        )
    started = time.perf_counter()
    model.fit(x_train, y_train)
    accuracy = float((model.predict(x_test) == y_test).mean())
    names, counts = np.unique(y_test, return_counts=True)
    return {
        "accuracy": accuracy,
        "majority": float(counts.max() / counts.sum()),
        "seconds": time.perf_counter() - started,
        "failed": failed_train + failed_test,
        **precision_at_k(x_test, y_test),
    }


def precision_at_k(x: np.ndarray, labels: np.ndarray, k: int = K) -> dict:
    """Mean precision@k of every row querying all the others by exact cosine (numpy); the
    same averaged per class first (Caltech's test split runs from 1 to 770 images a class, so
    the plain mean is mostly airplanes, motorbikes and faces); and the best any ranking could
    score (classes with fewer than k other rows cap it)."""
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    codes = np.unique(labels, return_inverse=True)[1]
    hits = np.empty(len(x))
    for at in range(0, len(x), BLOCK):
        rows = np.arange(at, min(at + BLOCK, len(x)))
        similarity = unit[rows] @ unit.T
        similarity[np.arange(len(rows)), rows] = -np.inf  # not itself
        top = np.argpartition(-similarity, k, axis=1)[:, :k]
        hits[rows] = (codes[top] == codes[rows, None]).mean(axis=1)
    same = np.bincount(codes)[codes] - 1
    per_class = np.bincount(codes, weights=hits) / np.bincount(codes)
    return {"p_at_k": float(hits.mean()), "p_at_k_macro": float(per_class.mean()),
            "p_at_k_ceiling": float(np.minimum(same, k).mean() / k)}


def describe(r: dict) -> str:
    return (
        f"probe accuracy {r['accuracy']:.4f} (majority class {r['majority']:.4f}; fit "
        f"{r['seconds']:.1f} s), test P@{K} {r['p_at_k']:.4f} (ceiling {r['p_at_k_ceiling']:.4f}), "
        f"class-averaged {r['p_at_k_macro']:.4f}"
        + (f"; {r['failed']} rows failed extraction, left out" if r["failed"] else "")
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def curves_line(run: Finetune) -> str:
    m = run.manifest
    return (
        f"  {run.name}: path {m['path']['taken']}, {m['num_workers']} worker(s), "
        f"{m['epochs_run']} epoch(s){' (stopped early)' if m['stopped_early'] else ''}; s/epoch "
        + ", ".join(f"{s:.1f}" for s in run.epoch_seconds)
        + f" (median {run.median_epoch:.1f}); epoch-1 val loss {run.curves[0]['val_loss']:.4f}; "
        f"wall {run.wall:.0f} s"
    )


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not Path(args.dataset).is_dir():
        print(f"no dataset at {args.dataset} (pass --dataset); nothing to do", file=sys.stderr)
        return 1
    started = time.perf_counter()
    random = args.weights.startswith("random")
    print(
        f"== fc7 finetune on Caltech-101, base weights {args.weights}: "
        + (
            "a seeded RANDOM AlexNet (the ImageNet weights are not available offline).\n"
            "   'before' is a floor (random fc7); 'after' shows what training the fully "
            "connected layers\n   on frozen random convolutions buys. --weights imagenet makes "
            "it a real transfer-learning comparison."
            if random
            else "transfer learning: 'before' is the base network's fc7, 'after' the fine-tuned "
            "one's."
        ),
        flush=True,
    )
    work = args.keep or Path(tempfile.mkdtemp(prefix="fc7-finetune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = bench(args, work)
    except BaseException:
        if args.keep is None:
            print(f"left {work} (logs, outputs) for inspection; delete it when done",
                  file=sys.stderr)
        raise
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s"
          + (f"; outputs and results.json in {work}" if args.keep else ""))
    if args.keep:
        (work / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


def bench(args: argparse.Namespace, work: Path) -> dict:
    train, test = write_split(args, work)
    tag = args.weights.replace(":", "-").replace("/", "_")
    base = work / f"{train.parent.name}-{tag}"
    runs = work / f"runs-{train.parent.name}-{tag}"
    random = args.weights.startswith("random")

    print("\n== 1. before: fc7 of the base weights")
    walls = {"extract fc7 (base)": extract(args, train, base / "fc7-train", args.weights)}
    walls["extract fc7 (base)"] += extract(args, test, base / "fc7-test", args.weights)
    before = probe(args, base / "fc7-train", base / "fc7-test")
    print(f"before: {describe(before)}")

    print(f"\n== 2. fine-tune on the fast path (pool5 embeddings, frozen convolutions), "
          f"{args.epochs} epochs")
    walls["extract pool5 (base)"] = extract(args, train, base / "pool5-train", args.weights,
                                            "pool5")
    pool5 = ["--path", "embeddings", "--embeddings", str(base / "pool5-train")]
    fast = finetune(args, train, runs / "fast-1worker", args.epochs, pool5)
    walls["finetune fast path"] = fast.wall
    model = runs / "fast-1worker" / "model.pt"
    walls["extract fc7 (fine-tuned)"] = extract(args, train, runs / "fc7-train", str(model),
                                                overwrite=True)
    walls["extract fc7 (fine-tuned)"] += extract(args, test, runs / "fc7-test", str(model),
                                                 overwrite=True)
    after = probe(args, runs / "fc7-train", runs / "fc7-test")
    print(f"after:  {describe(after)}")
    best = fast.best
    print(
        f"fine-tune's own validation split ({fast.manifest['data']['val']} images of the train "
        f"split): best epoch {fast.manifest['best_epoch']}, val accuracy "
        f"{best['val_accuracy']:.4f} (chance {1 / len(fast.manifest['classes']):.4f}), train "
        f"accuracy {best['train_accuracy']:.4f}"
    )

    print(f"\n== 3. time per epoch, {args.compare_epochs} epoch(s) each, same hyper-parameters")
    compared = {"fast-1worker": fast}
    if not args.skip_image_path:
        compared["images-1worker"] = finetune(
            args, train, runs / "images-1worker", args.compare_epochs, ["--path", "images"]
        )
    if not args.skip_workers:
        compared["fast-2workers"] = finetune(
            args, train, runs / "fast-2workers", args.compare_epochs,
            [*pool5, "--num-workers", "2"],
        )
    for r in compared.values():
        print(curves_line(r))
    # Epoch 1 runs at the same learning rate in every run. From images or from pool5, one
    # worker draws the same order and dropout masks: the losses should agree up to float
    # summation order. Two workers draw dropout masks per rank, so they differ by that noise
    # unless --dropout 0.
    first = fast.curves[0]["val_loss"]
    for name, r in compared.items():
        if name != "fast-1worker":
            why = ("same order and dropout: should be near 0" if r.manifest["num_workers"] == 1
                   else "dropout masks differ per worker unless --dropout 0")
            print(f"epoch-1 val loss, {name} - fast-1worker: "
                  f"{r.curves[0]['val_loss'] - first:+.2e} ({why})")

    print("\n== Summary")
    print(f"Caltech-101, {args.classes or 'all'} classes, {args.per_class} train/class, seed "
          f"{args.seed}, base weights {args.weights}" + (" (RANDOM)" if random else "")
          + f"; probe: {probe_name(args)}")
    print("| figure | before | after | after / before |")
    print("|---|---|---|---|")
    print(f"| linear-probe accuracy (test split) | {before['accuracy']:.4f} | "
          f"{after['accuracy']:.4f} | {ratio(after['accuracy'], before['accuracy'])} |")
    print(f"| precision@{K} (test queries test, cosine) | {before['p_at_k']:.4f} | "
          f"{after['p_at_k']:.4f} | {ratio(after['p_at_k'], before['p_at_k'])} |")
    print(f"| precision@{K}, averaged per class | {before['p_at_k_macro']:.4f} | "
          f"{after['p_at_k_macro']:.4f} | {ratio(after['p_at_k_macro'], before['p_at_k_macro'])} |")
    print(f"| fine-tune val accuracy (best epoch {fast.manifest['best_epoch']}) | - | "
          f"{best['val_accuracy']:.4f} | - |")
    print(f"(probe: majority class {before['majority']:.4f}; P@{K}: ceiling "
          f"{before['p_at_k_ceiling']:.4f}; val accuracy: chance "
          f"{1 / len(fast.manifest['classes']):.4f})")
    print("\n| fine-tune run | path | workers | epochs | s/epoch (median) | x fast 1 worker | "
          "wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in compared.items():
        print(f"| {name} | {r.manifest['path']['taken']} | {r.manifest['num_workers']} | "
              f"{r.manifest['epochs_run']} | {r.median_epoch:.2f} | "
              f"{ratio(r.median_epoch, fast.median_epoch)} | {r.wall:.0f} |")
    print("x fast 1 worker: the run's seconds per epoch / the fast path's with one worker "
          "(above 1: slower); wall s includes starting Ray and loading (decoding) the data")
    print("\n| step | wall s |\n|---|---|")
    for name, seconds in walls.items():
        print(f"| {name} | {seconds:.0f} |")
    if random:
        print("\nbase weights are random: 'before' is a floor, and 'after' measures what "
              "training fc6, fc7 and a head on frozen random convolutions buys, not transfer "
              "learning")
    return {
        "args": vars(args),
        "before": before,
        "after": after,
        "finetune": {name: {"manifest": r.manifest, "wall_seconds": r.wall}
                     for name, r in compared.items()},
        "wall_seconds": walls,
    }


def probe_name(args: argparse.Namespace) -> str:
    if args.probe == "l2":
        return f"L2-normalised fc7, LogisticRegression(C={args.C:g}) (fc7 train's logreg)"
    return f"standardised fc7, LogisticRegression(C={args.C:g})"


if __name__ == "__main__":
    sys.exit(main())
