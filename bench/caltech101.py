"""DeCAF's Caltech-101 protocol on our embeddings: fc6 and fc7, logistic regression and linear SVM.

30 training images per class, test on the rest, several random splits; mean and standard
deviation of accuracy, next to the numbers DeCAF published (Donahue et al., ICML 2014).

    python bench/caltech101.py                                  # extracts fc6 and fc7 first
    python bench/caltech101.py --embeddings-fc6 A --embeddings-fc7 B --splits 5
    python bench/caltech101.py --weights imagenet               # the real comparison

Differences from the paper: our copy has no background class (101 classes, not 102). With
`--weights random:0` (the default, because the ImageNet weights cannot be downloaded
everywhere) the figures are a negative control, not a reproduction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.metrics import accuracy_score, balanced_accuracy_score  # noqa: E402

from pipeline.classify import TrainConfig, build_pipeline, read_labelled  # noqa: E402
from pipeline.store import EmbeddingDataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO.parent / "shared" / "datasets" / "caltech101" / "101_ObjectCategories"
# DeCAF Table 2 (Caltech-101, 30 train/class, 102 classes with background, mean of 5 splits)
DECAF = {
    ("fc6", "linear-svm"): 84.77,
    ("fc6", "logreg"): 84.30,
    ("fc7", "linear-svm"): 83.24,
    ("fc7", "logreg"): 84.87,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/caltech101.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--dataset", default=str(DATASET), help=f"Caltech-101 class folders (default: {DATASET})"
    )
    for layer in ("fc6", "fc7"):
        parser.add_argument(
            f"--embeddings-{layer}",
            metavar="DIR",
            default=None,
            help=f"existing {layer} extraction output; extracted into "
            f"--work when absent (default: none)",
        )
    parser.add_argument(
        "--work",
        default="out/bench-caltech101",
        help="folder for extracted embeddings and results.json (default: out/bench-caltech101)",
    )
    parser.add_argument(
        "--weights",
        default="random:0",
        help="weights for extraction: random:SEED or imagenet (default: random:0)",
    )
    parser.add_argument(
        "--layers", nargs="+", default=["fc6", "fc7"], help="layers to evaluate (default: fc6 fc7)"
    )
    parser.add_argument(
        "--classifiers",
        nargs="+",
        default=["logreg", "linear-svm"],
        help="classifiers to evaluate (default: logreg linear-svm)",
    )
    parser.add_argument(
        "--splits", type=int, default=5, help="random train/test splits (default: 5)"
    )
    parser.add_argument(
        "--train-per-class", type=int, default=30, help="training images per class (default: 30)"
    )
    parser.add_argument(
        "--C", type=float, default=1.0, help="C of logreg and linear-svm (default: 1.0)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per model call during extraction (default: 64)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=-1,
        help="splits fitted in parallel; -1: one per core (default: -1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits (default: 0)")
    return parser.parse_args(argv)


def ensure_embeddings(args: argparse.Namespace, layer: str) -> str:
    """The extraction output for `layer`: the one given, or one extracted now into --work."""
    given = getattr(args, f"embeddings_{layer}")
    if given:
        return given
    out = Path(args.work) / f"embeddings-{layer}"
    command = [
        args.dataset,
        "--out",
        str(out),
        "--layer",
        layer,
        "--weights",
        args.weights,
        "--batch-size",
        str(args.batch_size),
    ]
    started = time.perf_counter()
    from jobs.extract import main as extract  # Ray; resumes when already (partly) done

    code = extract(command)
    if code != 0:
        raise SystemExit(f"extraction of {layer} failed (exit {code})")
    print(f"{layer}: extraction took {time.perf_counter() - started:.0f} s")
    return str(out)


def decaf_splits(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices: `per_class` random training rows of every class, all others for testing."""
    rng = np.random.default_rng(seed)
    train = []
    for name in np.unique(labels):
        rows = np.flatnonzero(labels == name)
        train.extend(rng.permutation(rows)[:per_class])
    train = np.sort(np.asarray(train))
    test = np.setdiff1d(np.arange(len(labels)), train)
    return train, test


def run_split(
    config: TrainConfig, x: np.ndarray, labels: np.ndarray, args: argparse.Namespace, split: int
) -> tuple[float, float, float, int, int]:
    """Fit on one DeCAF split; returns (accuracy %, mean per-class accuracy %, seconds, sizes)."""
    train, test = decaf_splits(labels, args.train_per_class, args.seed + split)
    started = time.perf_counter()
    model = build_pipeline(config).fit(x[train], labels[train])
    predicted = model.predict(x[test])
    seconds = time.perf_counter() - started
    accuracy = 100 * accuracy_score(labels[test], predicted)
    per_class = 100 * balanced_accuracy_score(labels[test], predicted)
    return accuracy, per_class, seconds, len(train), len(test)


def evaluate_layer(args: argparse.Namespace, layer: str, uri: str) -> list[dict]:
    data = EmbeddingDataset.open(uri)
    if data.provenance.layer != layer:
        raise SystemExit(f"--embeddings-{layer} {uri}: holds {data.provenance.layer} vectors")
    rows = read_labelled(data, "label", 8192)
    counts = np.unique(rows.labels, return_counts=True)[1]
    print(
        f"{layer}: {len(rows.ids)} images, {len(counts)} classes (smallest {counts.min()}), "
        f"weights {data.provenance.weights}, {rows.skipped_errors} failed extraction"
    )
    results = []
    for classifier in args.classifiers:
        config = TrainConfig(
            embeddings=uri, out="-", classifier=classifier, C=args.C, seed=args.seed
        )
        # liblinear is single-threaded: run the splits side by side, one per core
        runs = Parallel(n_jobs=args.jobs)(
            delayed(run_split)(config, rows.vectors, rows.labels, args, split)
            for split in range(args.splits)
        )
        for split, (accuracy, per_class, seconds, n_train, n_test) in enumerate(runs):
            print(
                f"  {layer} {classifier} split {split}: accuracy {accuracy:.2f}, "
                f"mean per-class {per_class:.2f} ({seconds:.1f} s, "
                f"{n_train} train / {n_test} test)"
            )
        accuracy, per_class, seconds = (np.array([run[i] for run in runs]) for i in range(3))
        results.append(
            {
                "layer": layer,
                "classifier": classifier,
                "weights": data.provenance.weights,
                "splits": args.splits,
                "train_per_class": args.train_per_class,
                "accuracy_mean": float(accuracy.mean()),
                "accuracy_std": float(accuracy.std()),
                "per_class_mean": float(per_class.mean()),
                "per_class_std": float(per_class.std()),
                "fit_predict_seconds": float(seconds.mean()),
                "decaf": DECAF.get((layer, classifier)),
            }
        )
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| layer | classifier | weights | accuracy % (mean ± std) | mean per-class % | "
        "DeCAF % | s/split |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['layer']} | {r['classifier']} | {r['weights']} | "
            f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | "
            f"{r['per_class_mean']:.2f} ± {r['per_class_std']:.2f} | "
            f"{r['decaf'] if r['decaf'] is not None else '-'} | {r['fit_predict_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not Path(args.dataset).is_dir() and not (args.embeddings_fc6 and args.embeddings_fc7):
        print(f"no dataset at {args.dataset} (pass --dataset or --embeddings-*)", file=sys.stderr)
        return 1
    started = time.perf_counter()
    results = []
    sources = {layer: ensure_embeddings(args, layer) for layer in args.layers}
    # Ray (started by the extraction) is not needed any more; its heartbeats would compete
    # with the fits for the CPUs and it would report itself dead.
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()
    for layer, uri in sources.items():
        results.extend(evaluate_layer(args, layer, uri))
    print(
        f"\nCaltech-101, {args.train_per_class} train/class, {args.splits} splits "
        f"(ours: 101 classes, no background; DeCAF: 102 with background, 5 splits)"
    )
    print(table(results))
    if any(r["weights"].startswith("random") for r in results):
        print("weights are random: these figures are a negative control, not a reproduction")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    (Path(args.work) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"total {time.perf_counter() - started:.0f} s; results in {args.work}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
