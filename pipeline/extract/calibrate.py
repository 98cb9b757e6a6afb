"""`--precision int8` on the driver: calibrate, build (or reuse) the int8 model, gate it.

Before any shard is embedded, a sample of the plan's own images is decoded as extraction decodes
them; the first part calibrates the quantisation, the rest (never the same images) is embedded
both with torch fp32 and with the int8 model, and the job stops unless they agree well enough.
The model is cached per (weights, layer, preprocessing, calibration images), stored beside the
output for the workers and later jobs, and named by its sha256 in the plan's provenance.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.decode import DecodeBudget, ImageDecodeError, decode_image
from pipeline.errors import ArtifactError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.plan import Plan, plan_folder, record_provenance
from pipeline.fs import resolve
from pipeline.model import Embedder, Weights, build_network
from pipeline.quantize import (
    RECIPE_VERSION,
    QuantizationError,
    cache_folder,
    find_int8_model,
    gate_figures,
    quantize_network,
    runtime_version,
    store_beside,
    store_in_cache,
    write_atomically,
)
from pipeline.sources import InputReadError, read_image_bytes

# Below this many decodable images the collection is not split: the model is calibrated on all
# of them and checked on the same ones (flagged), since a handful of held-out images would
# measure nothing.
MIN_SPLIT_IMAGES = 20
_READ_THREADS = 8


def prepare_int8(config: ExtractConfig, plan: Plan, weights: Weights) -> tuple[Plan, str]:
    """Give an int8 plan its model: reuse the one it names, else build or reuse a cached one.

    Returns:
        The plan with the model's sha256, runtime and gate figures in its provenance (also
        rewritten in `{out}/_plan/plan.json`), and the line of figures the job prints.

    Raises:
        QuantizationError: the model is further from fp32 than `--int8-min-cosine` or
            `--int8-min-overlap` allow (the message gives the figures and the ways out), or no
            image of the collection could be decoded to calibrate on.
        ArtifactError: the plan names a model that is neither cached nor beside the output.

    Example:
        >>> plan, figures = prepare_int8(config, plan, weights)  # doctest: +SKIP
        >>> print(figures)                                       # doctest: +SKIP
        int8 check: mean cosine to fp32 0.9999 (min 0.9998), top-10 neighbours by cosine ...
    """
    beside_output = plan_folder(plan.out)
    provenance = plan.provenance
    if provenance.int8_model_sha256:  # a resumed run: the embeddings so far used this model
        model = find_int8_model(provenance.int8_model_sha256, (beside_output,))
        store_beside(model, provenance.int8_model_sha256, beside_output)
        figures = provenance.int8_check or {}
        _require_gate(figures, config)
        return plan, describe(figures, "resumed")

    calibration, check, how_sampled = _samples(config, plan)
    embedder = Embedder(weights, provenance.layer, "cpu", preprocessing=provenance.preprocessing,
                        precision="fp32")
    calibration_key = _key(
        recipe=RECIPE_VERSION, weights=weights.sha256, layer=provenance.layer,
        preprocessing=provenance.preprocessing.model_dump(mode="json"),
        images=[sha for sha, _ in calibration],
    )
    record_path = cache_folder() / f"calibration-{calibration_key}.json"
    record = _read_record(record_path)
    model, how = _cached_model(record), "cached"
    if model is None:
        inputs = embedder.normalise(torch.stack([tensor for _, tensor in calibration])).numpy()
        model, how = quantize_network(build_network(weights, provenance.layer), inputs), "built"
        record = {"model_sha256": hashlib.sha256(model).hexdigest(), "checks": {}}
        store_in_cache(model, record["model_sha256"])
    sha256 = record["model_sha256"]
    check_key = _key(images=[sha for sha, _ in check])
    figures = record["checks"].get(check_key)
    if figures is None:
        batch = torch.stack([tensor for _, tensor in check])
        int8 = Embedder(weights, provenance.layer, "cpu", preprocessing=provenance.preprocessing,
                        precision="int8", int8_model=model)
        figures = gate_figures(_embed(int8, batch), _embed(embedder, batch))
        figures.update(
            calibration_images=len(calibration),
            same_images=how_sampled == "same",
            split=how_sampled == "split",
        )
        record["checks"][check_key] = figures
    try:
        write_atomically(record_path, json.dumps(record, indent=2).encode())
    except OSError:
        pass  # a cache that cannot be written costs a rebuild next time, nothing else
    _require_gate(figures, config)
    store_beside(model, sha256, beside_output)
    plan = record_provenance(
        plan,
        provenance.model_copy(
            update={
                "int8_model_sha256": sha256,
                "runtime_version": runtime_version(),
                "int8_check": figures,
            }
        ),
    )
    return plan, describe(figures, how)


def describe(figures: dict, how: str) -> str:
    """The line `fc7 extract` prints about the int8 model."""
    if figures.get("same_images"):
        held_out = (f"on the {figures.get('images')} calibration images themselves (too few "
                    f"images to hold any out: under {MIN_SPLIT_IMAGES})")
    else:
        held_out = (f"on {figures.get('images')} held-out images, calibrated on "
                    f"{figures.get('calibration_images')}")
        if figures.get("split"):
            held_out += " (the collection is smaller than the two samples: split in two)"
    return (
        f"int8 check ({how} model): mean cosine to fp32 {figures.get('mean_cosine', 0):.4f} "
        f"(min {figures.get('min_cosine', 0):.4f}), {figures.get('neighbours')}: overlap "
        f"{figures.get('neighbour_overlap', 0):.3f}, {held_out}"
    )


def _require_gate(figures: dict, config: ExtractConfig) -> None:
    mean_cosine = figures.get("mean_cosine", 0.0)
    overlap = figures.get("neighbour_overlap", 0.0)
    if mean_cosine >= config.int8_min_cosine and overlap >= config.int8_min_overlap:
        return
    raise QuantizationError(
        f"the int8 model is too far from fp32 on images of {config.source}: "
        f"{describe(figures, 'this')}; required: mean cosine >= {config.int8_min_cosine}, "
        f"overlap >= {config.int8_min_overlap}. Ways out: --precision fp32 (exact), or accept "
        f"it with --int8-min-cosine {mean_cosine:.4f} --int8-min-overlap {overlap:.3f}"
    )


def _embed(embedder: Embedder, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    return np.concatenate(
        [embedder(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _read_record(path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("checks"), dict)
    return record if ok and isinstance(record.get("model_sha256"), str) else None


def _cached_model(record: dict | None) -> bytes | None:
    if record is None:
        return None
    try:
        return find_int8_model(record["model_sha256"])
    except ArtifactError:
        return None


Sample = list[tuple[str, torch.Tensor]]  # (sha256 of the file, decoded uint8 image)


def _samples(config: ExtractConfig, plan: Plan) -> tuple[Sample, Sample, str]:
    """The calibration and check samples: decodable images of the plan in a seeded order (the
    same on every run, so reruns hit the cache), the calibration ones first; and how they were
    drawn: "apart" (as asked), "split" (fewer images than asked, shared in proportion) or
    "same" (too few to split: the check sample is the calibration sample)."""
    fs, _ = resolve(plan.out)
    # An Arrow column, not a Python list: a plan of a million paths stays a few dozen MB.
    paths = pq.read_table(plan.inputs_file, columns=["path"], filesystem=fs)["path"]
    wanted = config.int8_calibration_images + config.int8_check_images
    order = np.random.default_rng(0).permutation(len(paths))
    budget = DecodeBudget(config.decode_memory)

    def load(position: int) -> tuple[str, torch.Tensor] | None:
        try:
            data = read_image_bytes(paths[int(position)].as_py(), config.max_bytes)
            tensor, _, _ = decode_image(
                data, plan.provenance.preprocessing, config.max_pixels, budget
            )
        except (InputReadError, ImageDecodeError, RuntimeError, MemoryError):
            return None  # extraction records it as an error row; here it is just not sampled
        return hashlib.sha256(data).hexdigest(), tensor

    found: Sample = []
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        start = 0
        while len(found) < wanted and start < len(order):
            chunk = order[start : start + wanted - len(found)]
            start += len(chunk)
            found += [item for item in pool.map(load, chunk) if item is not None]
    if not found:
        raise QuantizationError(
            f"{config.source}: none of the {len(paths):,} images could be read and decoded to "
            f"calibrate the int8 model on; check the source, or pass --precision fp32"
        )
    if len(found) == wanted:
        cut = config.int8_calibration_images
        return found[:cut], found[cut:], "apart"
    if len(found) < MIN_SPLIT_IMAGES:
        return found, found, "same"
    cut = round(len(found) * config.int8_calibration_images / wanted)
    cut = min(max(cut, 1), len(found) - 1)
    return found[:cut], found[cut:], "split"
