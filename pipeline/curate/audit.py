"""`fc7 audit`: suspected label errors, outliers, near-duplicates, class imbalance and
train/test leaks of a labelled collection, found by cleanlab's `Datalab`.

Datalab takes two things from fc7: out-of-fold predicted probabilities, from the classifier
pipeline of `fc7 train` (`pipeline.classify.estimators.build_pipeline`) cross-validated with
scikit-learn's `cross_val_predict`, and the k-nearest-neighbour graph of the embeddings,
found by FAISS (exact in memory, or through an index built by `fc7 index`). Left to itself
(`--neighbours datalab`), Datalab builds that graph with scikit-learn's brute-force
neighbours, which is what limits it on large collections.

A test split (`--test`) is checked for leaks: test images whose nearest training image has a
cosine similarity at or above `--threshold` (the threshold of `fc7 duplicates`).
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.classify.config import TrainConfig
from pipeline.classify.data import label_mask
from pipeline.classify.estimators import build_pipeline
from pipeline.curate.config import AuditConfig
from pipeline.curate.output import check_out, staged_folder, write_manifest, write_results
from pipeline.curate.rows import (
    index_positions,
    open_cosine_index,
    read_collection,
    read_vectors,
    vector_batches,
)
from pipeline.errors import ConfigError, SourceError
from pipeline.neighbours import cosine_knn, drop_self, knn_graph
from pipeline.sources import read_image_bytes
from pipeline.store import EmbeddingDataset

KIND = "fc7-audit"
INSTALL_HINT = "pip install 'fc7[curate]'"
ISSUE_TYPES = ("label", "outlier", "near_duplicate", "class_imbalance")
THUMBNAIL_SIZE = (128, 128)
SEARCH_BATCH = 4096
# Above this many rows, exact k-NN (all pairs) takes minutes on a few cores: suggest --index.
EXACT_ROWS = 20_000


def audit(config: AuditConfig, data: EmbeddingDataset, report: Callable[[str], None]) -> dict:
    """Run `fc7 audit`: write audit.parquet, report.md (with thumbnails) and manifest.json to
    `config.out`; return the manifest.

    Raises:
        ConfigError: no labelled rows, fewer than 2 classes, fewer rows than k + 1, or the
            vectors do not fit in memory.
        OutputError: --out holds something else, or results without --overwrite.
        ArtifactError, ProvenanceMismatch: damaged or mismatched inputs (named).
    """
    check_out(Path(config.out), KIND, config.overwrite)  # before the work, not after
    datalab_class()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    collection = read_collection(data, config.batch_size, config.label_column)
    vectors = read_vectors(data, config.batch_size, "Audit a sample of the collection")
    rows = collection.rows.take(pa.array(collection.vector_rows))
    labelled = label_mask(rows["label"])
    rows, vectors = rows.filter(pa.array(labelled)), vectors[labelled]
    labels = np.array(rows["label"].to_pylist(), dtype=object)
    classes, y = np.unique(labels, return_inverse=True)
    _require_enough(config, data, len(labels), classes)
    skipped = {"errors": len(collection) - len(collection.vector_rows),
               "unlabelled": int((~labelled).sum())}
    report(f"{len(labels):,} labelled images in {len(classes)} classes "
           f"(skipped: {skipped['errors']:,} errors, {skipped['unlabelled']:,} unlabelled)")
    seconds["read"] = time.perf_counter() - clock

    clock = time.perf_counter()
    pred_probs = out_of_fold_probabilities(config, vectors, y)
    seconds["pred_probs"] = time.perf_counter() - clock
    report(f"out-of-fold probabilities ({config.classifier}, {config.folds} folds): "
           f"{seconds['pred_probs']:.1f} s")

    clock = time.perf_counter()
    graph = None
    if config.neighbours == "faiss" and config.index is None and len(labels) > EXACT_ROWS:
        report(f"exact k-NN over {len(labels):,} images; an index of them (fc7 index, then "
               f"--index) gives an approximate graph much faster")
    if config.neighbours == "faiss":
        graph = _faiss_graph(config, data, rows["id"], vectors)
    seconds["knn_graph"] = time.perf_counter() - clock

    clock = time.perf_counter()
    issues = find_issues(labels, pred_probs, graph, vectors, config.k)
    seconds["datalab"] = time.perf_counter() - clock
    report(f"cleanlab Datalab ({'FAISS' if graph is not None else 'its own'} k-NN graph): "
           f"{seconds['knn_graph'] + seconds['datalab']:.1f} s")

    table = _train_table(rows, issues)
    leaks: dict[str, Any] = {}
    if config.test:
        clock = time.perf_counter()
        test_table, leaks = find_leaks(config, data, vectors, rows["id"])
        table = pa.concat_tables([table, test_table])
        seconds["leaks"] = time.perf_counter() - clock
    counts = {
        "rows": len(labels),
        "classes": len(classes),
        "skipped": skipped,
        "label_issues": int(issues["is_label_issue"].sum()),
        "outliers": int(issues["is_outlier_issue"].sum()),
        "near_duplicates": int(issues["is_near_duplicate_issue"].sum()),
        "class_sizes": {str(c): int(n) for c, n in zip(classes, np.bincount(y), strict=True)},
        "imbalanced_classes": sorted(
            {str(label) for label in labels[issues["is_class_imbalance_issue"].to_numpy()]}
        ),
        **leaks,
    }
    with staged_folder(Path(config.out), KIND, config.overwrite) as folder:
        write_results(folder, "audit.parquet", table, data.provenance)
        write_report(folder, table, counts, config)
        manifest = write_manifest(folder, KIND, data, {
            "test": config.test,
            "neighbours": config.neighbours,
            "index": config.index,
            "k": config.k,
            "classifier": config.classifier,
            "pca": config.pca,
            "folds": config.folds,
            "threshold": config.threshold,
            "seed": config.seed,
            **counts,
            "timings": {name: round(value, 3) for name, value in seconds.items()},
        })
    return manifest


def _require_enough(config: AuditConfig, data: EmbeddingDataset, rows: int, classes) -> None:
    if len(classes) < 2:
        raise ConfigError(
            f"{data.uri}: {rows:,} labelled images in {len(classes)} class; an audit of labels "
            f"needs at least 2 classes (--label-column {config.label_column})"
        )
    if rows <= max(config.k, config.folds):
        raise ConfigError(
            f"{data.uri}: {rows:,} labelled images; an audit needs more than -k {config.k} and "
            f"--folds {config.folds}"
        )


def out_of_fold_probabilities(config: AuditConfig, vectors: np.ndarray, y: np.ndarray):
    """Each row's class probabilities from a classifier that did not see it (k-fold).

    The estimator is `fc7 train`'s for the same options. PCA is fitted once on all rows: it
    sees no labels, so no fold learns from another's. The components are standardised before
    the estimator: on unit-length embeddings their variances are tiny, and logreg's default
    regularisation then swamps them (measured on Caltech-101 with random weights, hold-out
    accuracy 0.16 without, 0.43 with, in a quarter of the time).
    """
    reduced = vectors
    if config.pca and config.pca < min(vectors.shape):
        reduced = PCA(n_components=config.pca, random_state=config.seed).fit_transform(vectors)
    options = TrainConfig(
        embeddings="-", out="-", classifier=config.classifier, seed=config.seed,
        normalize=False,
    )
    estimator = make_pipeline(StandardScaler(), build_pipeline(options))
    folds = StratifiedKFold(n_splits=config.folds, shuffle=True, random_state=config.seed)
    with warnings.catch_warnings():
        # Classes smaller than --folds: scikit-learn warns, and the probabilities of a class
        # missing from a fold's training rows are 0, which is what cleanlab should see.
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        warnings.filterwarnings("ignore", message=".*Number of classes in training fold.*")
        return cross_val_predict(estimator, reduced, y, cv=folds, method="predict_proba")


def _faiss_graph(config: AuditConfig, data: EmbeddingDataset, ids: pa.ChunkedArray,
                 vectors: np.ndarray):
    """The k-NN graph of the labelled rows: exact in memory, or from --index."""
    if config.index is None:
        similarities, positions = cosine_knn(vectors, vectors, config.k,
                                             own=np.arange(len(vectors)))
        return knn_graph(similarities, positions)
    index = open_cosine_index(config.index, data)
    row_of_position = index_positions(index, ids.combine_chunks())
    similarities = np.empty((len(vectors), config.k), np.float32)
    positions = np.empty((len(vectors), config.k), np.int64)
    for start in range(0, len(vectors), SEARCH_BATCH):
        block = vectors[start : start + SEARCH_BATCH]
        own = np.arange(start, start + len(block))
        # Extra neighbours: some positions may be rows this audit leaves out (unlabelled).
        found_sims, found = index.search_raw(block, 2 * config.k + 1)
        found = np.where(found >= 0, row_of_position[found], -1)
        found_sims = np.where(found >= 0, found_sims, -np.inf)
        order = np.argsort(-found_sims, axis=1, kind="stable")
        found_sims = np.take_along_axis(found_sims, order, axis=1)
        found = np.take_along_axis(found, order, axis=1)
        found_sims, found = drop_self(found_sims, found, own)
        short = (found[:, : config.k] < 0).any(axis=1)
        if short.any():  # the index answered too few of our rows: search those exactly
            exact_sims, exact = cosine_knn(block[short], vectors, config.k, own=own[short])
            found_sims[short, : config.k], found[short, : config.k] = exact_sims, exact
        similarities[own], positions[own] = found_sims[:, : config.k], found[:, : config.k]
    return knn_graph(similarities, positions)


def datalab_class() -> type:
    """cleanlab's `Datalab`, imported on first use (slow to import; an optional dependency).

    Raises:
        ConfigError: cleanlab or its datalab extra is not installed; says how to install it.
    """
    try:
        from cleanlab import Datalab
        from cleanlab.datalab.internal.data import Data  # noqa: F401  needs the extra
    except ImportError as err:
        raise ConfigError(f"fc7 audit needs cleanlab's Datalab ({err}): {INSTALL_HINT}") from None
    return Datalab


def find_issues(labels: np.ndarray, pred_probs: np.ndarray, graph, vectors: np.ndarray,
                k: int):
    """cleanlab's Datalab on the labels: with `graph` (FAISS's k-NN graph), or with the
    features when `graph` is None (Datalab builds its own graph with scikit-learn).

    Returns:
        Datalab's `get_issues()` table (a pandas DataFrame, one row per image), with the
        label check's `predicted_label`.
    """
    lab = datalab_class()(data={"label": labels}, label_name="label", verbosity=0)
    issue_types = {"label": {}, "outlier": {"k": k}, "near_duplicate": {"k": k},
                   "class_imbalance": {}}
    inputs = {"knn_graph": graph} if graph is not None else {"features": vectors}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Datalab warns about what it was not asked to do
        lab.find_issues(pred_probs=pred_probs, issue_types=issue_types, **inputs)
    issues = lab.get_issues()
    issues["predicted_label"] = lab.get_issues("label")["predicted_label"].to_numpy()
    return issues


def find_leaks(config: AuditConfig, data: EmbeddingDataset, train_vectors: np.ndarray,
               train_ids: pa.ChunkedArray) -> tuple[pa.Table, dict[str, Any]]:
    """Rows of the --test split, each with its most similar training image and whether that
    is a leak (cosine similarity at or above --threshold)."""
    test = EmbeddingDataset.open(config.test)
    data.provenance.require_compatible(test.provenance, data.uri, f"--test {config.test}")
    collection = read_collection(test, config.batch_size, config.label_column)
    rows = collection.rows.take(pa.array(collection.vector_rows))
    best_sims, best = [], []
    for batch in vector_batches(test, config.batch_size):
        similarities, positions = cosine_knn(batch, train_vectors, 1)
        best_sims.append(similarities[:, 0])
        best.append(positions[:, 0])
    similarity = np.concatenate(best_sims) if best_sims else np.zeros(0, np.float32)
    nearest = np.concatenate(best) if best else np.zeros(0, np.int64)
    leak = similarity >= np.float32(config.threshold)
    nearest_ids = train_ids.combine_chunks().take(pa.array(np.maximum(nearest, 0)))
    table = _empty_issue_columns(rows, "test")
    table = table.set_column(table.column_names.index("leak"), "leak", pa.array(leak))
    table = table.set_column(
        table.column_names.index("leak_id"), "leak_id",
        pa.array(nearest_ids.to_pylist(), pa.string(), mask=~leak),
    )
    table = table.set_column(
        table.column_names.index("leak_similarity"), "leak_similarity",
        pa.array(similarity, pa.float32()),
    )
    return table, {"test_rows": len(rows), "leaks": int(leak.sum())}


def _train_table(rows: pa.Table, issues) -> pa.Table:
    table = _empty_issue_columns(rows, "train")
    values = {
        "suggested_label": pa.array(issues["predicted_label"].astype(str).to_list(), pa.string()),
        "label_score": pa.array(issues["label_score"].to_numpy(), pa.float32()),
        "label_issue": pa.array(issues["is_label_issue"].to_numpy(bool)),
        "outlier_score": pa.array(issues["outlier_score"].to_numpy(), pa.float32()),
        "outlier": pa.array(issues["is_outlier_issue"].to_numpy(bool)),
        "near_duplicate_score": pa.array(issues["near_duplicate_score"].to_numpy(), pa.float32()),
        "near_duplicate": pa.array(issues["is_near_duplicate_issue"].to_numpy(bool)),
        "leak": pa.array(np.zeros(rows.num_rows, bool)),
    }
    for name, column in values.items():
        table = table.set_column(table.column_names.index(name), name, column)
    return table


AUDIT_SCHEMA = pa.schema([
    ("id", pa.string()), ("path", pa.string()), ("label", pa.string()),
    ("split", pa.string()), ("suggested_label", pa.string()), ("label_score", pa.float32()),
    ("label_issue", pa.bool_()), ("outlier_score", pa.float32()), ("outlier", pa.bool_()),
    ("near_duplicate_score", pa.float32()), ("near_duplicate", pa.bool_()),
    ("leak", pa.bool_()), ("leak_id", pa.string()), ("leak_similarity", pa.float32()),
])


def _empty_issue_columns(rows: pa.Table, split: str) -> pa.Table:
    """`rows` (id, path, label) with every issue column present and null."""
    n = rows.num_rows
    columns = {"id": rows["id"], "path": rows["path"], "label": rows["label"],
               "split": pa.array([split] * n, pa.string())}
    return pa.table({
        field.name: columns.get(field.name, pa.nulls(n, field.type)) for field in AUDIT_SCHEMA
    }, schema=AUDIT_SCHEMA)


def write_report(folder: Path, table: pa.Table, counts: dict[str, Any],
                 config: AuditConfig) -> None:
    """report.md: the counts, the class sizes, and the top findings of each kind with
    thumbnails (in thumbnails/)."""
    frame = table.to_pandas()
    train = frame[frame["split"] == "train"]
    lines = [
        "# fc7 audit", "",
        f"Embeddings: `{config.embeddings}`"
        + (f"; test split: `{config.test}`" if config.test else ""), "",
        "| finding | images |", "|---|---:|",
        f"| suspected label errors | {counts['label_issues']:,} of {counts['rows']:,} |",
        f"| outliers | {counts['outliers']:,} |",
        f"| near-duplicates (Datalab) | {counts['near_duplicates']:,} |",
    ]
    if config.test:
        lines.append(f"| test images repeating a training image (cosine >= {config.threshold})"
                     f" | {counts['leaks']:,} of {counts['test_rows']:,} |")
    sizes = sorted(counts["class_sizes"].items(), key=lambda item: item[1])
    lines += ["", f"Classes: {counts['classes']}; smallest: "
              + ", ".join(f"{name} ({size})" for name, size in sizes[:5])
              + "; largest: " + ", ".join(f"{name} ({size})" for name, size in sizes[::-1][:5])]
    if counts["imbalanced_classes"]:
        lines.append("Under-represented (Datalab): " + ", ".join(counts["imbalanced_classes"]))
    thumbnails = folder / "thumbnails"
    thumbnails.mkdir()
    sections = [
        ("Suspected label errors", train[train["label_issue"]].sort_values("label_score"),
         lambda r: f"given **{r.label}**, suggested **{r.suggested_label}** "
                   f"(label score {r.label_score:.3f})"),
        ("Outliers", train[train["outlier"]].sort_values("outlier_score"),
         lambda r: f"{r.label} (outlier score {r.outlier_score:.3f})"),
    ]
    if config.test:
        test = frame[frame["split"] == "test"]
        sections.append((
            "Leaks: test images that repeat a training image",
            test[test["leak"]].sort_values("leak_similarity", ascending=False),
            lambda r: f"repeats `{r.leak_id}` (cosine {r.leak_similarity:.3f})",
        ))
    for title, found, describe in sections:
        lines += ["", f"## {title} ({len(found):,}; top {min(config.top, len(found))})", ""]
        for row in found.head(config.top).itertuples():
            picture = _thumbnail(row.path, thumbnails, f"{len(list(thumbnails.iterdir())):05d}")
            lines.append(f"- {picture} `{row.id}`: {describe(row)}")
    (folder / "report.md").write_text("\n".join(lines) + "\n")


def _thumbnail(path: str, folder: Path, name: str) -> str:
    """A small JPEG of the image at `path` in `folder`, as Markdown; or why there is none."""
    try:
        with Image.open(io.BytesIO(read_image_bytes(path))) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail(THUMBNAIL_SIZE)
            image.save(folder / f"{name}.jpg", quality=85)
    except (OSError, SourceError, Image.DecompressionBombError, ValueError) as err:
        return f"(no thumbnail: {err})"
    return f"![]({folder.name}/{name}.jpg)"


def summary(manifest: dict[str, Any], out: str) -> str:
    """What `fc7 audit` prints when done."""
    lines = [
        f"{manifest['rows']:,} labelled images in {manifest['classes']} classes: "
        f"{manifest['label_issues']:,} suspected label errors, {manifest['outliers']:,} "
        f"outliers, {manifest['near_duplicates']:,} near-duplicates",
    ]
    if manifest.get("test"):
        lines.append(f"test split: {manifest['leaks']:,} of {manifest['test_rows']:,} images "
                     f"repeat a training image (cosine >= {manifest['threshold']})")
    timings = manifest["timings"]
    lines.append("seconds: " + ", ".join(f"{name} {value:.1f}" for name, value in timings.items()))
    lines.append(f"  {out}/audit.parquet  one row per image: scores and flags")
    lines.append(f"  {out}/report.md      the top findings with thumbnails")
    return "\n".join(lines)
