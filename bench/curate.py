"""Benchmark `fc7 duplicates` and `fc7 audit` on Caltech-101 with planted ground truth.

Builds a collection whose answers are known, from the real photos:
- near-duplicates: `--originals` photos (seeded) each copied six ways, one sub-folder per
  transformation: half size, JPEG quality 30, centre crop to 90%, brightness x1.3, half size
  at quality 30, crop plus brightness (copies other than the q30 ones are saved at quality
  95, itself a mild re-encode); plus `--exact` photos copied byte for byte;
- label errors: `--flip` of the training rows (none of them in a planted group) get another
  class's label in the manifest;
- leakage: a test split of `--leaks` copies of training photos (the six transformations and
  byte copies, in turn) and `--unrelated` photos held out of the training split.

Each copy keeps its original's label and is listed as `class/dup-<transform>-<photo>.jpg`
(`class/leak-...` in the test split); `pairs.csv` and `flips.csv` in the data folder hold the
ground truth. Caltech's own Faces_easy/image_N (a tighter crop of the photo Faces/image_N)
counts as a true duplicate of it too; other duplicates Caltech holds count as false. Both
splits are extracted with `fc7 extract` (cached: a rerun resumes and finds nothing to do).

Then, each figure next to a baseline measured in the same run:
1. duplicates: the cosine similarities of every (copy, original) pair and of every image's
   nearest non-duplicate, from an exact numpy oracle over the stored vectors; precision and
   recall per transformation over a sweep of thresholds, and the threshold the data suggests
   (best F1); then `fc7 duplicates` at its default threshold and at the suggested one, scored
   on its groups against the oracle's pair recall at the same threshold;
2. `fc7 audit --test --threshold SUGGESTED`: label issues (precision@k against a random
   ranking, k = flips) and leaks found, next to the numpy oracle's leaks;
3. `fc7 audit --neighbours datalab` (cleanlab building its own scikit-learn k-NN graph: the
   baseline) against `--neighbours faiss` (FAISS's exact graph) and `--index` (the graph from
   an `fc7 index --kind auto`, whose build is counted) on the same `--audit-rows` features:
   time of each, the ratios, and how far their findings agree. Caltech has about 9,900 rows
   here; the rest are SYNTHETIC copies of its vectors with seeded Gaussian jitter, written as
   an fc7 extraction output with the source's provenance.

    python bench/curate.py                                       # full run, random:0 weights
    python bench/curate.py --images 600 --originals 20 --exact 10 --leaks 14 --unrelated 10 \\
        --audit-rows 3000                                        # small development run
    python bench/curate.py --weights imagenet                    # the real features

With `--weights random:0` (the default: the ImageNet weights cannot be downloaded everywhere)
the features are those of a seeded random AlexNet: the figures measure the curation machinery
on weak features, not what ImageNet features give.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.sparse.csgraph
from PIL import Image, ImageEnhance

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.fs import resolve  # noqa: E402
from pipeline.store import (  # noqa: E402
    EmbeddingDataset,
    build_table,
    embeddings_to_numpy,
    write_table_atomically,
)

DATASET = REPO.parent / "shared" / "datasets" / "caltech101" / "101_ObjectCategories"
TRANSFORMS = ["half", "q30", "crop90", "bright130", "half_q30", "crop90_bright130"]
KINDS = [*TRANSFORMS, "exact"]
# Caltech's own near-duplicates, counted as true pairs: Faces_easy/image_N.jpg is a tighter
# crop of the same photo as Faces/image_N.jpg.
FACES = "faces_easy"
TRUTH_KINDS = [*KINDS, FACES]
THRESHOLDS = [0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999]
# Histogram of pair similarities over [-1, 1]: thresholds resolved to 1e-5.
BINS = 200_000
BLOCK = 512  # oracle rows per matrix product
QUANTILES = (0.0, 0.05, 0.5, 0.95, 1.0)
FACES_NAME = re.compile(r"image_\d+\.jpg")
# fc7's default near-duplicate and leak threshold, for the oracle's figures at it.
DEFAULT_LEAK = 0.95


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/curate.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset", default=str(DATASET), help=f"Caltech-101 class folders (default: {DATASET})"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/fc7-curate-bench"),
        help="folder for the images, embeddings and results (default: /tmp/fc7-curate-bench)",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="use N Caltech photos (seeded sample) for a small run (default: all)",
    )
    parser.add_argument(
        "--originals",
        type=int,
        default=200,
        help="photos copied with each of the six transformations (default: 200)",
    )
    parser.add_argument(
        "--exact", type=int, default=100, help="photos copied byte for byte (default: 100)"
    )
    parser.add_argument(
        "--flip",
        type=float,
        default=0.05,
        help="share of the training rows given a wrong label (default: 0.05)",
    )
    parser.add_argument(
        "--leaks",
        type=int,
        default=105,
        help="test images that are copies of training photos (default: 105)",
    )
    parser.add_argument(
        "--unrelated",
        type=int,
        default=100,
        help="test images held out of the training split (default: 100)",
    )
    parser.add_argument(
        "--weights",
        default="random:0",
        help="weights for extraction: random:SEED or imagenet (default: random:0)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per model call during extraction (default: 64)",
    )
    parser.add_argument(
        "--audit-rows",
        type=int,
        default=50_000,
        help="rows of the faiss-against-datalab comparison; beyond the real rows they are "
        "jittered copies (default: 50000)",
    )
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.2,
        help="std of the Gaussian jitter of the synthetic rows, as a share of each source "
        "vector's root mean square (default: 0.2)",
    )
    parser.add_argument(
        "--audit-folds",
        type=int,
        default=2,
        help="--folds of the audits of the comparison: the classifier's work is the same in "
        "every arm and not what is compared (default: 2)",
    )
    parser.add_argument(
        "--index-kind",
        default="auto",
        help="fc7 index --kind of the comparison's third arm, audit --index; none leaves it "
        "out (default: auto)",
    )
    parser.add_argument(
        "--skip-datalab",
        action="store_true",
        help="leave out the faiss-against-datalab comparison (default: off)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every choice (default: 0)")
    return parser.parse_args(argv)


# -- ground truth ------------------------------------------------------------------------------


def _centre_crop(image: Image.Image, share: float) -> Image.Image:
    width, height = round(image.width * share), round(image.height * share)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _half(image: Image.Image) -> Image.Image:
    size = (max(1, image.width // 2), max(1, image.height // 2))
    return image.resize(size, Image.Resampling.BILINEAR)


def _bright(image: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(1.3)


def write_copy(source: Path, target: Path, transform: str) -> None:
    """`source` transformed by `transform` (or its bytes, for "exact"), written to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if transform == "exact":
        shutil.copyfile(source, target)
        return
    with Image.open(source) as opened:
        image = opened.convert("RGB") if opened.mode not in ("RGB", "L") else opened.copy()
    quality = 95
    for step in transform.split("_"):
        if step == "half":
            image = _half(image)
        elif step == "q30":
            quality = 30
        elif step == "crop90":
            image = _centre_crop(image, 0.9)
        elif step == "bright130":
            image = _bright(image)
        else:
            raise ValueError(f"unknown transformation {step!r}")
    image.save(target, "JPEG", quality=quality)


def data_key(args: argparse.Namespace) -> str:
    return (
        f"data-n{args.images or 'all'}-o{args.originals}-e{args.exact}-f{args.flip:g}"
        f"-l{args.leaks}-u{args.unrelated}-s{args.seed}"
    )


def prepare(args: argparse.Namespace) -> Path:
    """The data folder: copies, train.csv and test.csv manifests, pairs.csv and flips.csv."""
    folder = args.work / data_key(args)
    if (folder / "done").exists():
        print(f"ground truth: cached in {folder}")
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    started = time.perf_counter()
    dataset = Path(args.dataset)
    photos = sorted(p.relative_to(dataset).as_posix() for p in dataset.glob("*/*.jpg"))
    rng = np.random.default_rng(args.seed)
    if args.images:
        photos = sorted(rng.choice(photos, size=min(args.images, len(photos)), replace=False))
    wanted = args.unrelated + args.originals + args.exact + args.leaks
    if wanted > len(photos):
        raise SystemExit(
            f"--unrelated + --originals + --exact + --leaks = {wanted} photos, but only "
            f"{len(photos)} are used; lower them or raise --images"
        )
    order = [photos[i] for i in rng.permutation(len(photos))]
    cut = np.cumsum([args.unrelated, args.originals, args.exact, args.leaks])
    unrelated, originals, exact, leaked = (
        order[a:b] for a, b in zip([0, *cut[:-1]], cut, strict=True)
    )
    held_out = set(unrelated)
    train_photos = [p for p in photos if p not in held_out]

    def label(photo: str) -> str:
        return photo.split("/", 1)[0]

    def copy(photo: str, transform: str, prefix: str) -> dict:
        cls, name = photo.split("/", 1)
        target = folder / "copies" / f"{prefix}-{transform}" / cls / name
        write_copy(dataset / photo, target, transform)
        return {
            "copy_id": f"{cls}/{prefix}-{transform}-{name}",
            "copy_path": str(target),
            "original_id": photo,
            "original_path": str(dataset / photo),
            "transform": transform,
            "split": "train" if prefix == "dup" else "test",
        }

    pairs = [copy(photo, t, "dup") for photo in originals for t in TRANSFORMS]
    pairs += [copy(photo, "exact", "dup") for photo in exact]
    pairs += [copy(photo, KINDS[i % len(KINDS)], "leak") for i, photo in enumerate(leaked)]

    planted = set(originals) | set(exact)
    candidates = [p for p in train_photos if p not in planted]
    train_rows = len(train_photos) + sum(p["split"] == "train" for p in pairs)
    count = round(args.flip * train_rows)
    classes = sorted({label(p) for p in photos})
    flips = {}
    for photo in sorted(rng.choice(candidates, size=count, replace=False)):
        others = [c for c in classes if c != label(photo)]
        flips[photo] = others[rng.integers(len(others))]

    train = [
        {"path": str(dataset / p), "label": flips.get(p, label(p)), "id": p} for p in train_photos
    ]
    train += [
        {"path": p["copy_path"], "label": label(p["original_id"]), "id": p["copy_id"]}
        for p in pairs
        if p["split"] == "train"
    ]
    test = [
        {"path": p["copy_path"], "label": label(p["original_id"]), "id": p["copy_id"]}
        for p in pairs
        if p["split"] == "test"
    ]
    test += [{"path": str(dataset / p), "label": label(p), "id": p} for p in unrelated]
    pd.DataFrame(train).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(test).to_csv(folder / "test.csv", index=False)
    pd.DataFrame(pairs).to_csv(folder / "pairs.csv", index=False)
    pd.DataFrame(
        [{"id": p, "true_label": label(p), "given_label": wrong} for p, wrong in flips.items()]
    ).to_csv(folder / "flips.csv", index=False, quoting=csv.QUOTE_MINIMAL)
    (folder / "done").write_text("")
    print(
        f"ground truth: {len(train)} training rows ({len(train_photos)} photos, "
        f"{len(originals)} x {len(TRANSFORMS)} near-duplicate copies, {len(exact)} byte copies, "
        f"{len(flips)} labels flipped), {len(test)} test rows ({len(leaked)} leaked copies, "
        f"{len(unrelated)} held-out photos); written to {folder} in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return folder


# -- running fc7 -------------------------------------------------------------------------------


def fc7(argv: list[str], log: Path, quiet: bool = False) -> float:
    """Run `fc7 ARGV` in its own process; its stdout printed, stderr kept in `log`.

    Returns:
        The wall-clock seconds it took.
    """
    print(f"$ fc7 {' '.join(argv)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *argv],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    wall = time.perf_counter() - started
    if not quiet and done.stdout.strip():
        print("  " + done.stdout.strip().replace("\n", "\n  "), flush=True)
    if done.returncode != 0:
        print(log.read_text()[-5000:], file=sys.stderr)
        raise SystemExit(f"fc7 {argv[0]} failed (exit {done.returncode}); log: {log}")
    return wall


def extract(manifest: Path, out: Path, args: argparse.Namespace) -> Path:
    """`manifest` embedded into `out` (resumes; a finished output says "nothing to do")."""
    argv = ["extract", str(manifest), "--out", str(out), "--weights", args.weights]
    wall = fc7([*argv, "--batch-size", str(args.batch_size)], out.parent / f"{out.name}.log")
    print(f"  ({wall:.0f} s)")
    return out


@dataclass
class Rows:
    """An extraction output in memory: ids, labels and unit-length vectors."""

    ids: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    sha256: np.ndarray
    vectors: np.ndarray  # as stored (float32)
    unit: np.ndarray  # unit length
    errors: int

    @classmethod
    def read(cls, uri: Path) -> Rows:
        data = EmbeddingDataset.open(str(uri))
        batches = list(data.batches(["id", "path", "label", "sha256", "embedding"]))
        columns = {
            name: np.concatenate([b.column(name).to_numpy(zero_copy_only=False) for b in batches])
            for name in ("id", "path", "label", "sha256")
        }
        vectors = np.concatenate([embeddings_to_numpy(b.column("embedding")) for b in batches])
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        errors = data.count(with_errors=True) - len(vectors)
        return cls(
            columns["id"], columns["path"], columns["label"], columns["sha256"], vectors,
            unit.astype(np.float32), errors,
        )


# -- 1. duplicates -----------------------------------------------------------------------------


@dataclass
class Truth:
    """Planted groups of the training rows: `group[i]` (-1: none) and each copy's kind."""

    group: np.ndarray
    kind: np.ndarray  # transformation of a copy, "" for photos
    original: np.ndarray  # row of a copy's original, -1 for photos
    flipped: np.ndarray  # bool: the row's label was flipped

    @property
    def planted(self) -> np.ndarray:
        """Rows that are copies this bench made (not Caltech's own Faces_easy twins)."""
        return np.isin(self.kind, KINDS)


def truth_for(rows: Rows, data: Path) -> Truth:
    pairs = pd.read_csv(data / "pairs.csv")
    pairs = pairs[pairs["split"] == "train"]
    flips = set(pd.read_csv(data / "flips.csv")["id"])
    position = {item: i for i, item in enumerate(rows.ids)}
    n = len(rows.ids)
    kind = np.full(n, "", dtype=object)
    original = np.full(n, -1, dtype=np.int64)
    for copy_id, original_id, transform in pairs[["copy_id", "original_id", "transform"]].values:
        if copy_id not in position or original_id not in position:
            continue  # failed extraction: reported by Rows.errors
        c, o = position[copy_id], position[original_id]
        kind[c], original[c] = transform, o
    for i, item in enumerate(rows.ids):
        cls, _, name = item.partition("/")
        twin = position.get(f"Faces/{name}")
        if cls == "Faces_easy" and FACES_NAME.fullmatch(name) and twin is not None:
            kind[i], original[i] = FACES, twin
    # groups: connected components of the (copy, original) edges
    copies = np.flatnonzero(original >= 0)
    edges = scipy.sparse.coo_matrix(
        (np.ones(len(copies)), (copies, original[copies])), shape=(n, n)
    )
    _, component = scipy.sparse.csgraph.connected_components(edges, directed=False)
    sizes = np.bincount(component)
    group = np.where(sizes[component] >= 2, component, -1)
    flipped = np.array([item in flips for item in rows.ids])
    return Truth(group, kind, original, flipped)


def quantiles(values: np.ndarray) -> str:
    if not len(values):
        return "-"
    return " ".join(f"{q:.4f}" for q in np.quantile(values, QUANTILES))


def histogram_quantiles(histogram: np.ndarray) -> str:
    """QUANTILES of the similarities counted in `histogram` (lower bin edges)."""
    cumulative = np.cumsum(histogram) / max(histogram.sum(), 1)
    # the first bin holding the q-th share; tiny rather than 0 so that q = 0 is the minimum
    wanted = np.maximum(np.array(QUANTILES) * (1 - 1e-12), 1e-15)
    edges = np.searchsorted(cumulative, wanted, side="left")
    return " ".join(f"{edge / BINS * 2 - 1:.4f}" for edge in np.minimum(edges, BINS - 1))


def _bins(similarities: np.ndarray) -> np.ndarray:
    scaled = ((np.clip(similarities, -1, 1) + 1) / 2 * BINS).astype(np.int64)
    return np.minimum(scaled, BINS - 1)


def _at_or_above(histogram: np.ndarray, threshold: float) -> int:
    """Pairs whose similarity is at or above `threshold` (to the histogram's 1e-5)."""
    return int(histogram[_bins(np.array([threshold]))[0] :].sum())


@dataclass
class Oracle:
    positive: np.ndarray  # histogram of true pairs (within a planted group)
    negative: np.ndarray  # histogram of all other pairs
    kind_positive: dict[str, np.ndarray]  # pairs (copy of kind, same group), per copy
    kind_negative: dict[str, np.ndarray]  # pairs (copy of kind, other image), per copy
    copy_similarity: np.ndarray  # cosine of each copy to its original (per row; nan: photo)
    nearest_other: np.ndarray  # each row's highest cosine to an image outside its group
    nearest_other_row: np.ndarray
    top_negatives: list[tuple[float, int, int]]
    seconds: float


def oracle(rows: Rows, truth: Truth) -> Oracle:
    """Every pair's cosine by numpy, in blocks: histograms of true and other pairs."""
    started = time.perf_counter()
    x, n = rows.unit, len(rows.ids)
    positive, negative = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    kind_positive = {k: np.zeros(BINS, np.int64) for k in TRUTH_KINDS}
    kind_negative = {k: np.zeros(BINS, np.int64) for k in TRUTH_KINDS}
    nearest = np.full(n, -np.inf, np.float32)
    nearest_row = np.full(n, -1, np.int64)
    top: list[tuple[float, int, int]] = []
    columns = np.arange(n)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        block = np.arange(start, stop)
        s = x[start:stop] @ x.T
        g = truth.group[block, None]
        same = (g == truth.group[None, :]) & (g >= 0)
        self_ = columns[None, :] == block[:, None]
        other = ~same & ~self_
        outside = np.where(other, s, -np.inf)
        nearest_row[block] = outside.argmax(axis=1)
        nearest[block] = outside[np.arange(len(block)), nearest_row[block]]
        upper = columns[None, :] > block[:, None]
        positive += np.bincount(_bins(s[upper & same]), minlength=BINS)
        upper_other = s[upper & other]
        negative += np.bincount(_bins(upper_other), minlength=BINS)
        if len(upper_other):
            best = np.argsort(np.where(upper & other, s, -np.inf), axis=None)[-10:]
            top += [(float(s.flat[i]), int(block[i // n]), int(i % n)) for i in best]
            top = sorted(top, reverse=True)[:10]
        for k in TRUTH_KINDS:
            chosen = truth.kind[block] == k
            if chosen.any():
                kind_positive[k] += np.bincount(_bins(s[chosen][same[chosen]]), minlength=BINS)
                kind_negative[k] += np.bincount(_bins(s[chosen][other[chosen]]), minlength=BINS)
    copy_similarity = np.full(n, np.nan, np.float32)
    copies = np.flatnonzero(truth.original >= 0)
    copy_similarity[copies] = np.einsum("ij,ij->i", x[copies], x[truth.original[copies]])
    return Oracle(
        positive, negative, kind_positive, kind_negative, copy_similarity, nearest, nearest_row,
        top, time.perf_counter() - started,
    )


def sweep(o: Oracle, truth: Truth, threshold: float) -> dict:
    """Pair precision and recall at `threshold`, overall and per kind of copy."""
    result = {}
    for k in TRUTH_KINDS:
        sims = o.copy_similarity[truth.kind == k]
        tp = _at_or_above(o.kind_positive[k], threshold)
        fp = _at_or_above(o.kind_negative[k], threshold)
        result[k] = {
            "recall": float((sims >= threshold).mean()) if len(sims) else float("nan"),
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
        }
    sims = o.copy_similarity[truth.planted]
    tp, fp = _at_or_above(o.positive, threshold), _at_or_above(o.negative, threshold)
    recall = float((sims >= threshold).mean()) if len(sims) else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp and recall else 0.0
    result["all"] = {"recall": recall, "precision": precision, "f1": f1, "pairs": tp + fp}
    return result


def suggest(o: Oracle, truth: Truth) -> float:
    """The threshold of best pair F1; the middle of the range of thresholds that reach it."""
    recall_hits = np.bincount(_bins(o.copy_similarity[truth.planted]), minlength=BINS)
    copies = recall_hits.sum()
    tp = np.cumsum(o.positive[::-1])[::-1]
    fp = np.cumsum(o.negative[::-1])[::-1]
    found = np.cumsum(recall_hits[::-1])[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0)
        recall = found / max(copies, 1)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0)
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    edge = best[len(best) // 2]
    return round(float(edge / BINS * 2 - 1), 4)


def report_oracle(o: Oracle, truth: Truth, rows: Rows, thresholds: list[float]) -> dict:
    n = len(rows.ids)
    print(
        f"\n== 1. Duplicates: exact oracle (numpy cosine over all {n * (n - 1) // 2:,} pairs of "
        f"{n:,} training rows, {o.seconds:.0f} s)"
    )
    print(f"cosine quantiles ({' / '.join(f'{q:g}' for q in QUANTILES)}):")
    print(f"{'pairs':<44} {'n':>11}  quantiles")
    for k in TRUTH_KINDS:
        sims = o.copy_similarity[truth.kind == k]
        name = "(Faces_easy/N, Faces/N), Caltech's own" if k == FACES else f"(copy, original), {k}"
        print(f"{name:<44} {len(sims):>11,}  {quantiles(sims)}")
    copies = truth.planted
    photos = ~copies
    print(
        f"{'nearest non-duplicate of each photo':<44} {photos.sum():>11,}  "
        f"{quantiles(o.nearest_other[photos])}"
    )
    print(
        f"{'nearest non-duplicate of each copy':<44} {copies.sum():>11,}  "
        f"{quantiles(o.nearest_other[copies])}"
    )
    print(
        f"{'any two photos or copies, not duplicates':<44} {int(o.negative.sum()):>11,}  "
        f"{histogram_quantiles(o.negative)}"
    )
    beaten = {
        k: int((o.nearest_other[truth.kind == k] >= o.copy_similarity[truth.kind == k]).sum())
        for k in TRUTH_KINDS
    }
    print(
        "copies whose nearest non-duplicate is at least as close as their original: "
        + ", ".join(f"{k} {v}/{int((truth.kind == k).sum())}" for k, v in beaten.items())
    )
    print("most similar pairs that are not planted duplicates (Caltech's own near-duplicates?):")
    for sim, a, b in o.top_negatives[:5]:
        print(f"  {sim:.4f}  {rows.ids[a]}  {rows.ids[b]}")

    results = {t: sweep(o, truth, t) for t in thresholds}
    print(
        "\nrecall per transformation = share of (copy, original) pairs at or above the "
        "threshold;\nprecision per transformation = share of the pairs (copy, any other image) "
        "at or above it\nthat are true duplicates; 'all': precision over all pairs, F1 of it "
        "with the recall of all planted copies.\nTrue duplicates: the planted groups, and "
        f"Caltech's own {FACES} pairs (Faces_easy/image_N is a tighter\ncrop of Faces/image_N; "
        "its column is their recall). Other duplicates Caltech holds (e.g. llama\nimage_0001 "
        "and image_0010) count as false: precision is a lower bound."
    )
    head = "".join(f" {k[:16]:>16}" for k in TRUTH_KINDS)
    print(f"{'threshold':>9} {'':<4}{head} {'all':>8} {'F1':>6} {'pairs':>12}")
    for t, r in results.items():
        for what in ("recall", "precision"):
            cells = "".join(f" {r[k][what]:>16.3f}" for k in TRUTH_KINDS)
            tail = f" {r['all'][what]:>8.3f}"
            if what == "recall":
                tail += f" {r['all']['f1']:>6.3f} {r['all']['pairs']:>12,}"
            print(f"{t:>9g} {what[:4]:<4}{cells}{tail}")
    return results


def evaluate_groups(folder: Path, rows: Rows, truth: Truth) -> dict:
    """Score `fc7 duplicates`'s groups: a copy is found when it shares its original's group."""
    found = pd.read_parquet(folder / "duplicates.parquet")
    manifest = json.loads((folder / "manifest.json").read_text())
    keep = pd.read_parquet(folder / "keep.parquet")
    position = {item: i for i, item in enumerate(rows.ids)}
    predicted = np.full(len(rows.ids), -1, np.int64)
    rowpos = found["id"].map(position)
    if rowpos.isna().any():
        raise SystemExit(f"{folder}: ids not in the embeddings: {found['id'][rowpos.isna()][:3]}")
    predicted[rowpos.to_numpy(int)] = found["group"].to_numpy()
    kind_of = dict(zip(found["id"], found["kind"], strict=True))
    result = {"manifest": manifest, "groups": int(found["group"].nunique()), "images": len(found)}
    result["largest_group"] = int(found["group"].value_counts().max()) if len(found) else 0
    for k in TRUTH_KINDS:
        copies = np.flatnonzero(truth.kind == k)
        hit = predicted[copies] >= 0
        hit &= predicted[copies] == predicted[truth.original[copies]]
        result[k] = float(hit.mean()) if len(copies) else float("nan")
        if k == "exact":
            # The byte copy, or its original when the copy represents the group, is "exact".
            marked = [
                kind_of.get(rows.ids[c]) == "exact" or kind_of.get(rows.ids[truth.original[c]])
                == "exact"
                for c in copies[hit]
            ]
            result["exact_marked"] = int(sum(marked))
            result["exact_total"] = len(copies)
    # pairs inside the predicted groups, true when they share a planted group
    true_pairs = all_pairs = 0
    correct_images = 0
    frame = pd.DataFrame({"predicted": predicted, "planted": truth.group})
    frame = frame[frame["predicted"] >= 0]
    for _, members in frame.groupby("predicted"):
        size = len(members)
        all_pairs += size * (size - 1) // 2
        counts = members.loc[members["planted"] >= 0, "planted"].value_counts()
        true_pairs += int((counts * (counts - 1) // 2).sum())
        correct_images += int(counts[counts >= 2].sum())
    result["pair_precision"] = true_pairs / all_pairs if all_pairs else float("nan")
    result["image_precision"] = correct_images / len(frame) if len(frame) else float("nan")
    result["pairs"] = all_pairs
    copies = truth.planted
    result["recall"] = float(
        ((predicted[copies] >= 0) & (predicted[copies] == predicted[truth.original[copies]])).mean()
    )
    result["keep"] = len(keep)
    result["keep_expected"] = len(rows.ids) - len(found) + result["groups"]
    return result


def run_duplicates(
    args: argparse.Namespace, emb: Path, rows: Rows, truth: Truth, o: Oracle,
    threshold: float | None,
) -> dict:
    name = "default" if threshold is None else f"t{threshold:g}"
    out = args.work / "runs" / f"duplicates-{name}"
    argv = ["duplicates", str(emb), "--out", str(out), "--overwrite"]
    if threshold is not None:
        argv += ["--threshold", f"{threshold:g}"]
    wall = fc7(argv, out.parent / f"duplicates-{name}.log")
    result = evaluate_groups(out, rows, truth)
    result["wall_seconds"] = wall
    used = float(result["manifest"].get("threshold", threshold or float("nan")))
    result["threshold"] = used
    result["oracle"] = sweep(o, truth, used)
    return result


def report_groups(results: list[dict]) -> None:
    print(
        "\nfc7 duplicates, scored on its groups: a copy is found when it lands in its "
        "original's group;\npair precision = same-group pairs that are planted duplicates / all "
        "same-group pairs;\nimage precision = images in a group that holds one of their planted "
        "duplicates / images in groups;\n'oracle' = the share of (copy, original) pairs at or "
        "above the same threshold (exact numpy)"
    )
    head = "".join(f" {k[:16]:>16}" for k in TRUTH_KINDS)
    print(
        f"{'threshold':>9}{head} {'recall':>7} {'oracle':>7} {'pair P':>7} {'image P':>7} "
        f"{'groups':>7} {'largest':>7} {'keep':>7} {'wall s':>7}"
    )
    for r in results:
        cells = "".join(f" {r[k]:>16.3f}" for k in TRUTH_KINDS)
        print(
            f"{r['threshold']:>9g}{cells} {r['recall']:>7.3f} "
            f"{r['oracle']['all']['recall']:>7.3f} {r['pair_precision']:>7.3f} "
            f"{r['image_precision']:>7.3f} {r['groups']:>7,} {r['largest_group']:>7,} "
            f"{r['keep']:>7,} {r['wall_seconds']:>7.1f}"
        )
        print(
            f"{'':>9} byte copies found {round(r['exact'] * r['exact_total'])}/"
            f"{r['exact_total']}, marked kind exact {r['exact_marked']}/{r['exact_total']}; "
            f"keep.parquet {r['keep']:,} rows (one per group plus the rest: "
            f"{r['keep_expected']:,}); rows still above the threshold at the last neighbour "
            f"searched: {r['manifest'].get('saturated_rows', '-')}; seconds "
            f"{r['manifest'].get('seconds', {})}"
        )


# -- 2. audit ----------------------------------------------------------------------------------


def label_figures(audit: pd.DataFrame, flipped_ids: set[str]) -> dict:
    """Precision@k of the label_score ranking (k = flipped rows) and of the flagged set."""
    train = audit[audit["split"] == "train"] if "split" in audit else audit
    k = len(flipped_ids)
    ranked = train.sort_values("label_score", kind="stable")["id"].to_numpy()
    hits = len(set(ranked[:k]) & flipped_ids)
    flagged = set(train.loc[train["label_issue"], "id"])
    right = len(flagged & flipped_ids)
    return {
        "rows": len(train),
        "flipped": k,
        "precision_at_k": hits / k if k else float("nan"),
        "base_rate": k / len(train) if len(train) else float("nan"),
        "flagged": len(flagged),
        "flagged_precision": right / len(flagged) if flagged else float("nan"),
        "flagged_recall": right / k if k else float("nan"),
        "agreement": float((train["suggested_label"] == train["label"]).mean()),
    }


def leak_oracle(rows: Rows, test: Rows, true_leaks: set[str], threshold: float) -> dict:
    """Leaks by numpy: test rows whose most similar training row is at or above `threshold`."""
    nearest = (test.unit @ rows.unit.T).max(axis=1)
    flagged = {item for item, sim in zip(test.ids, nearest, strict=True) if sim >= threshold}
    found = len(flagged & true_leaks)
    return {
        "threshold": threshold,
        "flagged": len(flagged),
        "found": found,
        "recall": found / len(true_leaks) if true_leaks else float("nan"),
        "precision": found / len(flagged) if flagged else float("nan"),
    }


def run_audit(
    args: argparse.Namespace, emb: Path, test: Path, data: Path, rows: Rows, truth: Truth,
    threshold: float,
) -> dict:
    out = args.work / "runs" / "audit"
    argv = ["audit", str(emb), "--test", str(test), "--out", str(out), "--overwrite"]
    argv += ["--threshold", f"{threshold:g}"]
    wall = fc7(argv, args.work / "runs" / "audit.log")
    audit = pd.read_parquet(out / "audit.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    flips = set(pd.read_csv(data / "flips.csv")["id"])
    labels = label_figures(audit, flips)
    pairs = pd.read_csv(data / "pairs.csv")
    leaks = pairs[pairs["split"] == "test"]
    # a leak is found when its leak_id is its original or one of the original's planted copies
    position = {item: i for i, item in enumerate(rows.ids)}
    test_rows = audit[audit["split"] == "test"].set_index("id")
    flagged = set(test_rows.index[test_rows["leak"]])
    right = 0
    for copy_id, original_id in leaks[["copy_id", "original_id"]].values:
        if copy_id in flagged:
            found = position.get(test_rows.at[copy_id, "leak_id"], -1)
            o = position[original_id]
            right += found == o or (found >= 0 and truth.group[o] >= 0 and truth.group[found]
                                    == truth.group[o])
    true_leaks = set(leaks["copy_id"])
    per_kind = {
        k: (
            int(sum(c in flagged for c in leaks.loc[leaks["transform"] == k, "copy_id"])),
            int((leaks["transform"] == k).sum()),
        )
        for k in KINDS
    }
    test_rows_read = Rows.read(test)
    oracles = [
        leak_oracle(rows, test_rows_read, true_leaks, t)
        for t in sorted({threshold, float(manifest.get("threshold", threshold)), DEFAULT_LEAK})
    ]
    planted = truth.group >= 0
    train_rows = audit[audit["split"] == "train"].set_index("id").loc[rows.ids]
    near = train_rows["near_duplicate"].to_numpy(bool)
    return {
        "wall_seconds": wall,
        "manifest": manifest,
        "labels": labels,
        "outliers": int(audit["outlier"].sum()),
        "near_duplicate_planted": float(near[planted].mean()) if planted.any() else float("nan"),
        "near_duplicate_other": int(near[~planted].sum()),
        "leaks": {
            "true": len(true_leaks),
            "flagged": len(flagged),
            "found": len(flagged & true_leaks),
            "right_source": int(right),
            "recall": len(flagged & true_leaks) / len(true_leaks) if true_leaks else float("nan"),
            "precision": len(flagged & true_leaks) / len(flagged) if flagged else float("nan"),
            "per_kind": per_kind,
            "threshold": float(manifest.get("threshold", threshold)),
            "oracle": oracles,
        },
    }


def report_audit(a: dict) -> None:
    labels, leaks = a["labels"], a["leaks"]
    print(
        f"\n== 2. fc7 audit --test ({a['wall_seconds']:.0f} s wall; timings "
        f"{ {k: round(v, 1) for k, v in a['manifest'].get('timings', {}).items()} })"
    )
    print(
        f"label issues: {labels['flipped']} of {labels['rows']:,} training labels flipped; "
        f"ranked by label_score, precision@{labels['flipped']} = recall@{labels['flipped']} = "
        f"{labels['precision_at_k']:.3f} against {labels['base_rate']:.3f} for a random ranking "
        f"({labels['precision_at_k'] / labels['base_rate']:.1f}x)"
    )
    print(
        f"  flagged label_issue: {labels['flagged']:,}, of which flipped: precision "
        f"{labels['flagged_precision']:.3f}, recall {labels['flagged_recall']:.3f}; "
        f"suggested_label = given label for {labels['agreement']:.3f} of the rows"
    )
    print(
        f"outliers flagged: {a['outliers']:,}; near_duplicate flagged: "
        f"{a['near_duplicate_planted']:.3f} of the true duplicate groups' members, "
        f"{a['near_duplicate_other']:,} other training rows"
    )
    print(
        f"leaks at cosine >= {leaks['threshold']:g}: {leaks['found']}/{leaks['true']} leaked "
        f"copies found (recall "
        f"{leaks['recall']:.3f}), {leaks['flagged']} test rows flagged (precision "
        f"{leaks['precision']:.3f}), {leaks['right_source']} with leak_id in the right group"
    )
    kinds = leaks["per_kind"].items()
    print("  found per kind: " + ", ".join(f"{k} {f}/{t}" for k, (f, t) in kinds))
    for r in leaks["oracle"]:
        print(
            f"  numpy oracle at cosine >= {r['threshold']:g}: {r['found']}/{leaks['true']}"
            f" found, {r['flagged']} flagged (recall {r['recall']:.3f}, precision "
            f"{r['precision']:.3f})"
        )


# -- 3. faiss against datalab ------------------------------------------------------------------


def jittered(
    args: argparse.Namespace, emb: Path, rows: Rows, truth: Truth
) -> tuple[Path, set[str], float]:
    """`--audit-rows` rows: the real ones, then seeded jittered copies of them (cached).

    Returns:
        The dataset, the ids whose label is flipped, and the mean cosine of a copy to its source.
    """
    source = EmbeddingDataset.open(str(emb))
    key = f"{source.fingerprint()[:12]}-{args.audit_rows}-j{args.jitter:g}-s{args.seed}"
    folder = args.work / f"audit-rows-{args.audit_rows}"
    marker = folder / "_source.json"
    n = len(rows.ids)
    rng = np.random.default_rng(args.seed)
    real = np.arange(n) if args.audit_rows >= n else np.sort(
        rng.choice(n, size=args.audit_rows, replace=False)
    )
    extra = rng.integers(0, n, size=max(0, args.audit_rows - n))
    flipped = {rows.ids[i] for i in real if truth.flipped[i]}
    flipped |= {f"jitter/{j}/{rows.ids[i]}" for j, i in enumerate(extra) if truth.flipped[i]}
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        cosine = json.loads(marker.read_text())["cosine"]
        print(f"{args.audit_rows:,} audit rows: cached in {folder}")
        return folder, flipped, cosine
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    fs, base = resolve(str(folder))
    shard_rows = 10_000
    order = np.concatenate([real, extra])
    cosines = []
    for shard, start in enumerate(range(0, len(order), shard_rows)):
        chosen = order[start : start + shard_rows]
        x = rows.vectors[chosen].copy()
        synthetic = np.arange(start, start + len(chosen)) >= len(real)
        rms = np.sqrt((x[synthetic] ** 2).mean(axis=1, keepdims=True))
        noise = rng.normal(0, 1, x[synthetic].shape).astype(np.float32) * (args.jitter * rms)
        jitter = np.maximum(x[synthetic] + noise, 0)  # fc7 is a ReLU output: never negative
        if len(jitter):
            unit = jitter / np.linalg.norm(jitter, axis=1, keepdims=True)
            cosines.append(np.einsum("ij,ij->i", unit, rows.unit[chosen[synthetic]]))
        x[synthetic] = jitter
        ids = [
            f"jitter/{start + i - len(real)}/{rows.ids[r]}" if synthetic[i] else rows.ids[r]
            for i, r in enumerate(chosen)
        ]
        table = build_table(
            source.provenance,
            ids,
            list(rows.paths[chosen]),
            list(rows.labels[chosen]),
            x,
            [None] * len(chosen),
            sha256s=[None if synthetic[i] else rows.sha256[r] for i, r in enumerate(chosen)],
        )
        write_table_atomically(table, fs, f"{base}/part-{shard:05d}.parquet")
    cosine = float(np.concatenate(cosines).mean()) if cosines else 1.0
    marker.write_text(json.dumps({"key": key, "cosine": cosine}))
    print(
        f"wrote {len(order):,} audit rows to {folder} in {time.perf_counter() - started:.0f} s: "
        f"{len(real):,} real, {len(extra):,} SYNTHETIC (seeded Gaussian jitter of real vectors, "
        f"std {args.jitter:g} x each vector's RMS, clipped at 0; mean cosine to their source "
        f"{cosine:.4f})"
    )
    return folder, flipped, cosine


ARMS = ("datalab", "faiss", "faiss-index")


def run_arms(args: argparse.Namespace, data: Path, flipped: set[str]) -> dict:
    """`fc7 audit` on the same rows three ways: Datalab's own k-NN graph (the baseline),
    FAISS's exact graph, and the graph from an `fc7 index` (whose build is timed with it)."""
    results = {}
    for arm in ARMS:
        if arm == "faiss-index" and args.index_kind == "none":
            continue
        out = args.work / "runs" / f"audit-{args.audit_rows}-{arm}"
        argv = ["audit", str(data), "--out", str(out), "--overwrite"]
        argv += ["--folds", str(args.audit_folds)]
        build = None
        if arm == "faiss-index":
            index = args.work / "runs" / f"index-{args.audit_rows}-{args.index_kind}"
            build_argv = ["index", str(data), "--out", str(index), "--kind", args.index_kind]
            build_wall = fc7([*build_argv, "--overwrite"], index.parent / f"{index.name}.log")
            manifest = json.loads((index / "manifest.json").read_text())
            build = {
                "wall_seconds": build_wall,
                "factory": manifest.get("factory"),
                "recall_at_10": manifest.get("recall_at_10"),
                "seconds": manifest.get("build_seconds", {}),
            }
            argv += ["--index", str(index)]
        else:
            argv += ["--neighbours", arm]
        wall = fc7(argv, out.parent / f"{out.name}.log")
        audit = pd.read_parquet(out / "audit.parquet").set_index("id")
        manifest = json.loads((out / "manifest.json").read_text())
        results[arm] = {
            "wall_seconds": wall,
            "timings": manifest.get("timings", {}),
            "audit": audit,
            "labels": label_figures(audit.reset_index(), flipped),
            "index": build,
        }
    return results


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def agreement(a: pd.DataFrame, b: pd.DataFrame, k: int) -> dict:
    """How far two audits of the same rows agree: per issue type and on the label ranking."""
    b = b.loc[a.index]
    result = {}
    for column in ISSUES:
        x, y = set(a.index[a[column]]), set(b.index[b[column]])
        result[column] = {"flagged": len(x), "jaccard": jaccard(x, y)}
    top_a = set(a.sort_values("label_score", kind="stable").index[:k])
    top_b = set(b.sort_values("label_score", kind="stable").index[:k])
    result["label_top_k"] = len(top_a & top_b) / k if k else float("nan")
    result["suggested_label"] = float((a["suggested_label"] == b["suggested_label"]).mean())
    result["outlier_score_corr"] = float(
        np.corrcoef(a["outlier_score"].to_numpy(float), b["outlier_score"].to_numpy(float))[0, 1]
    )
    return result


ISSUES = ("label_issue", "outlier", "near_duplicate")


def compare(results: dict, flipped: set[str], cosine: float, args: argparse.Namespace) -> dict:
    base = results["datalab"]
    k = len(flipped)
    print(
        f"\n== 3. fc7 audit: Datalab's default k-NN graph (scikit-learn, the baseline) against "
        f"FAISS's,\nsame {args.audit_rows:,} rows: real Caltech rows plus SYNTHETIC jittered "
        f"copies (mean cosine {cosine:.4f} to their source);\n--folds {args.audit_folds} for "
        f"the out-of-fold probabilities of every arm (the same work in each, not what is "
        f"compared)"
    )
    print(f"{'arm':<12} {'wall s':>8} {'k-NN s':>8}  timings (manifest, s)")
    figures = {}
    for arm, r in results.items():
        knn = neighbour_seconds(r)
        timings = ", ".join(f"{key} {value:.1f}" for key, value in r["timings"].items())
        if r["index"]:
            timings += (
                f"; index build {r['index']['wall_seconds']:.1f} s wall ({r['index']['factory']},"
                f" recall@10 {r['index']['recall_at_10']:.3f}), counted in k-NN s and wall s"
            )
        wall = r["wall_seconds"] + (r["index"]["wall_seconds"] if r["index"] else 0)
        print(f"{arm:<12} {wall:>8.1f} {knn:>8.1f}  {timings}")
        figures[arm] = {
            "wall_seconds": wall,
            "knn_seconds": knn,
            "timings": r["timings"],
            "index": r["index"],
            "labels": r["labels"],
            "speed_ratio": base["wall_seconds"] / wall,
            "knn_ratio": neighbour_seconds(base) / knn if knn else float("nan"),
            "agreement": agreement(r["audit"], base["audit"], k),
        }
    print(
        "k-NN s = the k-NN graph plus Datalab's checks (plus the index build); ratios are "
        "Datalab's default time / the arm's time"
    )
    print(
        f"{'arm':<12} {'wall x':>7} {'k-NN x':>7} "
        + "".join(f" {c + ' (J)':>20}" for c in ISSUES)
        + f" {'top-k':>6} {'P@k':>6} {'flagged P':>9} {'flagged R':>9}"
    )
    for arm, f in figures.items():
        ag, lab = f["agreement"], f["labels"]
        cells = "".join(
            f" {ag[c]['flagged']:>12,} ({ag[c]['jaccard']:.3f})" for c in ISSUES
        )
        print(
            f"{arm:<12} {f['speed_ratio']:>6.2f}x {f['knn_ratio']:>6.2f}x{cells} "
            f"{ag['label_top_k']:>6.3f} {lab['precision_at_k']:>6.3f} "
            f"{lab['flagged_precision']:>9.3f} {lab['flagged_recall']:>9.3f}"
        )
    print(
        f"(J) = Jaccard of the flagged set with Datalab's default; top-k = overlap of the "
        f"{k:,} lowest label_score rows (k = flipped labels, random ranking P@k "
        f"{k / args.audit_rows:.3f}); P@k, flagged P/R against the flipped labels"
    )
    same = {arm: r["timings"].get("pred_probs") for arm, r in results.items()}
    if all(same.values()):
        spread = max(same.values()) / min(same.values())
        print(
            "noise: pred_probs, the same work in every arm, took "
            + ", ".join(f"{arm} {v:.0f} s" for arm, v in same.items())
            + f" ({spread:.2f}x apart); each arm ran once on a shared 2-core machine"
            + (": timings disturbed, compare the k-NN columns" if spread > 1.3 else "")
        )
    return {"rows": args.audit_rows, "folds": args.audit_folds, "arms": figures}


def neighbour_seconds(result: dict) -> float:
    """Seconds on the k-NN graph and Datalab's checks (and the index build, if any)."""
    timings = result["timings"]
    seconds = sum(v for key, v in timings.items() if key in ("knn_graph", "datalab"))
    return float(seconds + (result["index"]["wall_seconds"] if result["index"] else 0))


# -- summary -----------------------------------------------------------------------------------


def summary(
    args: argparse.Namespace, rows: Rows, truth: Truth, o: Oracle, suggested: float,
    dups: list[dict], audit: dict, pair: dict | None, weights: str,
) -> str:
    lines = [
        f"Caltech-101, {len(rows.ids):,} training rows, weights {weights}"
        + (" (seeded random: the ImageNet weights are not available offline)"
           if weights.startswith("random") else ""),
        "",
        "| duplicates (threshold) | " + " | ".join(TRUTH_KINDS) + " | recall | oracle recall | "
        "pair precision | image precision | groups | s |",
        "|---|" + "---|" * (len(TRUTH_KINDS) + 6),
    ]
    medians = [float(np.median(o.copy_similarity[truth.kind == k])) for k in TRUTH_KINDS]
    nearest = [float(np.median(o.nearest_other[truth.kind == k])) for k in TRUTH_KINDS]
    lines.append(
        "| oracle: median cosine to the original | " + " | ".join(f"{m:.4f}" for m in medians)
        + " | | | | | | |"
    )
    lines.append(
        "| oracle: median cosine to the nearest non-duplicate | "
        + " | ".join(f"{m:.4f}" for m in nearest) + " | | | | | | |"
    )
    at = sweep(o, truth, suggested)
    lines.append(
        f"| oracle pairs at or above {suggested:g} | "
        + " | ".join(f"{at[k]['recall']:.3f}" for k in TRUTH_KINDS)
        + f" | {at['all']['recall']:.3f} | {at['all']['recall']:.3f} | "
        f"{at['all']['precision']:.3f} | | | {o.seconds:.0f} |"
    )
    for r in dups:
        lines.append(
            f"| fc7 duplicates ({r['threshold']:g}) | "
            + " | ".join(f"{r[k]:.3f}" for k in TRUTH_KINDS)
            + f" | {r['recall']:.3f} | {r['oracle']['all']['recall']:.3f} | "
            f"{r['pair_precision']:.3f} | {r['image_precision']:.3f} | {r['groups']:,} | "
            f"{r['wall_seconds']:.0f} |"
        )
    lab, leaks = audit["labels"], audit["leaks"]
    lift = lab["precision_at_k"] / lab["base_rate"]
    lines += [
        "",
        "Byte copies found in their original's group / marked kind exact: "
        + "; ".join(
            f"{r['threshold']:g}: {round(r['exact'] * r['exact_total'])}/{r['exact_total']} / "
            f"{r['exact_marked']}/{r['exact_total']}"
            for r in dups
        )
        + f". Suggested threshold (best pair F1 of the exact oracle): {suggested:g}.",
        "",
        "| audit | figure |",
        "|---|---|",
        f"| flipped labels | {lab['flipped']} of {lab['rows']:,} ({args.flip:.0%}) |",
        f"| label issues precision@k = recall@k (k = flipped) | {lab['precision_at_k']:.3f} "
        f"(random ranking {lab['base_rate']:.3f}, {lift:.1f}x) |",
        f"| label_issue flagged (precision / recall) | {lab['flagged']:,} "
        f"({lab['flagged_precision']:.3f} / {lab['flagged_recall']:.3f}) |",
        f"| leaks found (recall / precision) | {leaks['found']}/{leaks['true']} "
        f"({leaks['recall']:.3f} / {leaks['precision']:.3f}) |",
        *(
            f"| leaks by the numpy oracle at {r['threshold']:g} (recall / precision) | "
            f"{r['found']}/{leaks['true']} ({r['recall']:.3f} / {r['precision']:.3f}) |"
            for r in leaks["oracle"]
        ),
        f"| outliers flagged | {audit['outliers']:,} |",
        f"| audit wall time | {audit['wall_seconds']:.0f} s |",
    ]
    if pair:
        arms = pair["arms"]
        lines += [
            "",
            f"| {pair['rows']:,} rows (real + SYNTHETIC jitter), --folds {pair['folds']} | "
            + " | ".join(arms) + " |",
            "|---|" + "---|" * len(arms),
            "| audit wall s (x Datalab default) | " + " | ".join(
                f"{f['wall_seconds']:.0f} ({f['speed_ratio']:.2f}x)" for f in arms.values()
            ) + " |",
            "| k-NN graph + Datalab checks (+ index build) s | " + " | ".join(
                f"{f['knn_seconds']:.0f} ({f['knn_ratio']:.2f}x)" for f in arms.values()
            ) + " |",
        ]
        for column in ISSUES:
            lines.append(
                f"| {column} flagged (Jaccard with Datalab default) | " + " | ".join(
                    f"{f['agreement'][column]['flagged']:,} "
                    f"({f['agreement'][column]['jaccard']:.3f})" for f in arms.values()
                ) + " |"
            )
        lines.append(
            "| label precision@k (top-k overlap) | " + " | ".join(
                f"{f['labels']['precision_at_k']:.3f} ({f['agreement']['label_top_k']:.3f})"
                for f in arms.values()
            ) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not Path(args.dataset).is_dir():
        print(f"no dataset at {args.dataset} (pass --dataset)", file=sys.stderr)
        return 1
    started = time.perf_counter()
    if args.weights.startswith("random"):
        print(
            f"weights {args.weights}: a seeded RANDOM AlexNet (the ImageNet weights are not "
            f"available offline); the figures test the machinery, not ImageNet features"
        )
    data = prepare(args)
    tag = f"emb-{args.weights.replace(':', '-').replace('/', '_')}-{data.name[5:]}"
    emb = extract(data / "train.csv", args.work / tag / "train", args)
    test = extract(data / "test.csv", args.work / tag / "test", args)
    rows = Rows.read(emb)
    truth = truth_for(rows, data)
    weights = EmbeddingDataset.open(str(emb)).provenance.weights
    if rows.errors:
        print(f"{rows.errors} training rows failed extraction (left out)")

    o = oracle(rows, truth)
    suggested = suggest(o, truth)
    thresholds = sorted(set(THRESHOLDS) | {suggested})
    sweep_results = report_oracle(o, truth, rows, thresholds)
    print(f"suggested threshold (best F1, middle of its range): {suggested:g}")
    print("\n$ fc7 duplicates at its default threshold, then at the suggested one")
    dups = [run_duplicates(args, emb, rows, truth, o, None)]
    if abs(dups[0]["threshold"] - suggested) > 1e-9:
        dups.append(run_duplicates(args, emb, rows, truth, o, suggested))
    report_groups(dups)

    # At the suggested threshold: the default may flag every test image with random weights.
    audit = run_audit(args, emb, test, data, rows, truth, suggested)
    report_audit(audit)

    pair = None
    if not args.skip_datalab:
        folder, flipped, cosine = jittered(args, emb, rows, truth)
        pair = compare(run_arms(args, folder, flipped), flipped, cosine, args)

    table = summary(args, rows, truth, o, suggested, dups, audit, pair, weights)
    print("\n== Summary\n" + table)
    if weights.startswith("random"):
        print(
            "\nweights are random: the features are weak, so label issues and near-duplicates "
            "are harder to find than with ImageNet weights"
        )
    results = {
        "weights": weights,
        "suggested_threshold": suggested,
        "sweep": {str(t): r for t, r in sweep_results.items()},
        "duplicates": [{k: v for k, v in r.items() if k != "manifest"} for r in dups],
        "audit": {k: v for k, v in audit.items() if k != "manifest"},
        "faiss_vs_datalab": pair,
    }
    (args.work / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"total {time.perf_counter() - started:.0f} s; results in {args.work}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
