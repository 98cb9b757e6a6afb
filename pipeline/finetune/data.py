"""The labelled images a fine-tune trains on: listed, split (stratified), decoded or looked up
in pool5 embeddings, and fingerprinted so that a resumed run can tell it sees the same data.

Images are decoded once, in the driver, into one uint8 array (150 KB per 224x224 image) that the
Ray Train workers read from the object store; augmentation happens on the workers, per sample.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.decode import ImageDecodeError, decode_image
from pipeline.errors import ArtifactError, ProvenanceMismatch, SourceError
from pipeline.model import Weights
from pipeline.provenance import Preprocessing
from pipeline.sources import InputImage, iter_inputs, read_image_bytes
from pipeline.store import EmbeddingDataset, embeddings_to_numpy


@dataclass
class LabelledData:
    """The usable samples of DATA, their split and what identifies them.

    `inputs` are the samples kept (decoded, or found in the embeddings), `labels[i]` the index
    of `inputs[i]`'s class in `classes` (sorted: the head's order); `train` and `val` index
    `inputs`. `skipped` are (id, reason) of the samples that could not be used.
    """

    source: str
    inputs: list[InputImage]
    labels: np.ndarray
    classes: list[str]
    train: np.ndarray
    val: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def fingerprint(self) -> dict[str, str | int]:
        """sha256 over the sorted (id, label) of train+val, and over the sorted val ids."""
        pairs = sorted((item.id, str(item.label)) for item in self.inputs)
        data = hashlib.sha256("\n".join(f"{i}\t{label}" for i, label in pairs).encode())
        val_ids = sorted(self.inputs[i].id for i in self.val)
        val = hashlib.sha256("\n".join(val_ids).encode())
        return {"sha256": data.hexdigest(), "val_ids_sha256": val.hexdigest(),
                "train": len(self.train), "val": len(self.val)}


def list_labelled(source: str) -> list[InputImage]:
    """Every image of `source` (as `fc7 extract` lists them), each with a label.

    Raises:
        SourceError: unreadable source, images without a label, or fewer than two classes.
    """
    inputs = list(iter_inputs(source))
    unlabelled = [item.id for item in inputs if item.label is None]
    if unlabelled:
        raise SourceError(
            f"{source}: {len(unlabelled)} images have no label (e.g. {unlabelled[0]}); put them "
            f"in class subfolders, or give the manifest a label column"
        )
    classes = sorted({item.label for item in inputs})
    if len(classes) < 2:
        found = f"one class ({classes[0]})" if classes else "no images"
        raise SourceError(
            f"{source}: {found}; fine-tuning needs images of at least two classes (one "
            f"subfolder per class)"
        )
    return inputs


def split(
    inputs: list[InputImage], skipped: list[tuple[str, str]], val_fraction: float, seed: int,
    source: str,
) -> LabelledData:
    """Index the classes and hold out a stratified, seeded validation split.

    Raises:
        SourceError: a class with fewer than two usable images, or a validation split smaller
            than the number of classes.
    """
    classes = sorted({item.label for item in inputs})
    counts = Counter(item.label for item in inputs)
    if len(classes) < 2:
        raise SourceError(f"{source}: fewer than two classes have usable images ({classes})")
    small = sorted(label for label, count in counts.items() if count < 2)
    if small:
        raise SourceError(
            f"{source}: class {small[0]} has {counts[small[0]]} usable image; every class "
            f"needs at least two (one to train on, one to validate)"
        )
    index = {label: i for i, label in enumerate(classes)}
    labels = np.array([index[item.label] for item in inputs], dtype=np.int64)
    try:
        train, val = train_test_split(
            np.arange(len(inputs)), test_size=val_fraction, stratify=labels, random_state=seed
        )
    except ValueError as err:  # e.g. fewer validation images than classes
        raise SourceError(
            f"{source}: cannot hold out a stratified --val-fraction {val_fraction} of "
            f"{len(inputs)} images in {len(classes)} classes ({err}); raise --val-fraction or "
            f"add images"
        ) from None
    return LabelledData(source, inputs, labels, classes, train, val, skipped)


def decode_all(
    inputs: list[InputImage], preprocessing: Preprocessing, threads: int = 4
) -> tuple[np.ndarray, list[InputImage], list[tuple[str, str]]]:
    """Read and decode every input to a (3, crop, crop) uint8 image.

    Returns:
        (uint8 array (kept, 3, crop, crop), the inputs kept, (id, reason) of those skipped).
    """
    def one(item: InputImage) -> np.ndarray | str:
        try:
            return decode_image(read_image_bytes(item.path), preprocessing)[0].numpy()
        except (OSError, ImageDecodeError) as err:
            return str(err)

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, inputs))
    kept = [item for item, result in zip(inputs, results, strict=True)
            if not isinstance(result, str)]
    skipped = [(item.id, result) for item, result in zip(inputs, results, strict=True)
               if isinstance(result, str)]
    size = preprocessing.crop
    images = np.empty((len(kept), 3, size, size), dtype=np.uint8)
    row = 0
    for result in results:
        if not isinstance(result, str):
            images[row] = result
            row += 1
    return images, kept, skipped


def read_pooled(
    uri: str, inputs: list[InputImage], weights: Weights, layer: str,
    preprocessing: Preprocessing,
) -> tuple[np.ndarray, list[InputImage], list[tuple[str, str]]]:
    """The `layer` embeddings of `inputs` from an extraction output, matched by id.

    Rows that fc7 extract could not embed are skipped with their recorded error.

    Returns:
        (float32 array (kept, width), the inputs kept, (id, reason) of those skipped).

    Raises:
        ProvenanceMismatch: the embeddings were not made from these base weights, this model,
            `layer`, its preprocessing, float32 and fp32 arithmetic.
        ArtifactError: unreadable, or ids of DATA missing from them.
    """
    data = EmbeddingDataset.open(uri)
    found = data.provenance
    expected = {
        "model": weights.model, "weights_sha256": weights.sha256, "layer": layer,
        "preprocessing": preprocessing, "dtype": "float32", "precision": "fp32",
    }
    diffs = []
    for name, wanted in expected.items():
        have = getattr(found, name)
        if have != wanted:
            if name == "weights_sha256":
                have = f"{found.weights} ({have[:12]})"
                wanted = f"{weights.spec} ({wanted[:12]})"
            elif name == "preprocessing":
                have, wanted = have.describe(), wanted.describe()
            diffs.append(f"{name} {have}, not {wanted}")
    if diffs:
        raise ProvenanceMismatch(
            f"--embeddings {uri}: cannot stand in for the {layer} of --model {weights.model} "
            f"--weights {weights.spec}: " + "; ".join(diffs) + f"; extract them with fc7 "
            f"extract DATA --model {weights.model} --weights {weights.spec} --layer {layer} "
            f"--dtype float32 --precision fp32, or pass --path images"
        )
    wanted_ids = {item.id for item in inputs}
    rows: dict[str, np.ndarray | str] = {}
    for batch in data.batches(["id", "embedding", "error"], with_errors=True):
        ids = batch["id"].to_pylist()
        keep = [i for i, row_id in enumerate(ids) if row_id in wanted_ids]
        if not keep:
            continue
        errors = batch["error"].to_pylist()
        good = [i for i in keep if errors[i] is None]
        if good:
            vectors = embeddings_to_numpy(batch["embedding"].take(good))
            rows.update({ids[i]: vectors[j] for j, i in enumerate(good)})
        rows.update({ids[i]: f"fc7 extract: {errors[i]}" for i in keep if errors[i] is not None})
    missing = [item.id for item in inputs if item.id not in rows]
    if missing:
        raise ArtifactError(
            f"--embeddings {uri}: has no row for {len(missing)} of the {len(inputs)} images of "
            f"DATA (e.g. {missing[0]}); extract DATA itself (fc7 extract DATA --layer {layer})"
        )
    kept = [item for item in inputs if not isinstance(rows[item.id], str)]
    skipped = [(item.id, rows[item.id]) for item in inputs if isinstance(rows[item.id], str)]
    width = found.dim
    vectors = np.empty((len(kept), width), dtype=np.float32)
    for row, item in enumerate(kept):
        vectors[row] = rows[item.id]
    return vectors, kept, skipped


def require_some(kept: list[InputImage], skipped: list[tuple[str, str]], source: str) -> None:
    """Refuse a DATA of which no image could be used.

    Raises:
        SourceError: naming the first reason.
    """
    if not kept:
        reason = skipped[0][1] if skipped else "no images"
        raise SourceError(f"{source}: none of its {len(skipped)} images could be used "
                          f"({reason})")



def load_data(
    source: str, path: str, weights: Weights, preprocessing: Preprocessing, val_fraction: float,
    seed: int, embeddings: str | None = None, decode_threads: int = 4,
) -> tuple[LabelledData, np.ndarray]:
    """List, decode (images path) or look up (embeddings path), and split DATA.

    Returns:
        (the data, its array: uint8 images or float32 pooled embeddings, rows as `data.inputs`).

    Raises:
        SourceError, ProvenanceMismatch, ArtifactError: see `list_labelled`, `read_pooled` and
            `split`.
    """
    from pipeline.backbones import backbone

    inputs = list_labelled(source)
    if path == "embeddings":
        pooled = backbone(weights.model).pooled
        array, kept, skipped = read_pooled(embeddings, inputs, weights, pooled, preprocessing)
    else:
        array, kept, skipped = decode_all(inputs, preprocessing, decode_threads)
    require_some(kept, skipped, source)
    return split(kept, skipped, val_fraction, seed, source), array
