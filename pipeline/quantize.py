"""The int8 model: AlexNet to a layer, exported to ONNX and statically quantised for ONNX Runtime.

Quantisation is static (activation ranges calibrated on images of the user's collection), in
QDQ format with per-channel int8 weights; ONNX Runtime runs it on the CPU, about 3.5 times as
fast as torch fp32. Its vectors are a different feature space from fp32, so the model is named
by its sha256 in the provenance, and found by that name in the cache folder (`$FC7_CACHE`, else
`~/.cache/fc7`, under `int8/`), beside the output (`{out}/_plan/`) or in an index folder.

`gate_figures` measures it against fp32 on images it was not calibrated on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import ArtifactError, PipelineError
from pipeline.fs import resolve
from pipeline.provenance import Provenance, int8_model_name

RUNTIME = "onnxruntime"
# Bump when the export or quantisation recipe changes, so that cached models are rebuilt.
RECIPE_VERSION = 1
INPUT_NAME = "image"
# The neighbours the gate compares: FC7 is searched by cosine.
GATE_NEIGHBOURS = 10


class QuantizationError(PipelineError):
    """The int8 model cannot be built, or is too far from fp32 on the user's images."""


def cache_folder() -> Path:
    """Where int8 models and their calibration records are cached on this machine."""
    root = os.environ.get("FC7_CACHE") or Path.home() / ".cache" / "fc7"
    return Path(root).expanduser() / "int8"


def runtime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # onnxruntime.quantization warns on the root logger to run its pre-processing; measured here
    # it changes neither the cosines nor the speed of this model, so the advice is noise.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_network(network: nn.Module, calibration: np.ndarray, batch_size: int = 16) -> bytes:
    """Export `network` (float NCHW normalised input) to ONNX and quantise it statically.

    Args:
        network: the torch model, in eval mode, on the CPU.
        calibration: normalised images (n, 3, h, w) float32 whose activation ranges set the
            quantisation scales.

    Returns:
        The serialised QDQ ONNX model.

    Raises:
        QuantizationError: export or quantisation failed (the message says which).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                {INPUT_NAME: calibration[i : i + batch_size]}
                for i in range(0, len(calibration), batch_size)
            )

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    network = network.to(memory_format=torch.contiguous_format).eval()
    example = torch.from_numpy(calibration[:2].copy())
    with tempfile.TemporaryDirectory(prefix="fc7-int8-") as folder:
        exported, quantised = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        try:
            program = torch.onnx.export(
                network,
                (example,),
                input_names=[INPUT_NAME],
                output_names=["features"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                dynamo=True,
                verbose=False,
            )
            program.save(str(exported))
        except Exception as err:  # the exporter raises many kinds; all mean the same here
            raise QuantizationError(f"cannot export the model to ONNX: {err}") from err
        with _quiet_root_logger():
            quantize_static(
                str(exported),
                str(quantised),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        return quantised.read_bytes()


class Int8Session:
    """An ONNX Runtime session of the int8 model; call it on normalised float32 NCHW images.

    Args:
        model: the serialised ONNX model.
        threads: intra-op threads (torch's setting for this process when None, so that a worker
            told to use N CPUs uses N here too).
    """

    def __init__(self, model: bytes, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: np.ascontiguousarray(images, np.float32)})[0]


def int8_model_for(provenance: Provenance, folders: tuple[str, ...] = ()) -> bytes | None:
    """The int8 model that made artifacts with `provenance` (None when they are not int8):
    from the cache, else from `folders` (see `find_int8_model`).

    Raises:
        ArtifactError: the provenance names no model (its extraction stopped before building
            it), or the model is found nowhere.
    """
    if provenance.precision != "int8":
        return None
    if not provenance.int8_model_sha256:
        where = f"{folders[0]}: " if folders else ""
        raise ArtifactError(
            f"{where}the provenance asks for int8 but names no int8 model: the extraction that "
            "made it stopped before the model was built; run it again"
        )
    return find_int8_model(provenance.int8_model_sha256, folders)


def find_int8_model(sha256: str, folders: tuple[str, ...] = ()) -> bytes:
    """The int8 model named `sha256`: from the cache, else from `folders` (local or URI), where
    a copy is cached for next time. Its content is checked against the name.

    Raises:
        ArtifactError: not found anywhere, or every copy found has another sha256.
    """
    name = int8_model_name(sha256)
    cached = cache_folder() / name
    looked, corrupt = [str(cached)], []
    if cached.is_file():
        data = cached.read_bytes()
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
        corrupt.append(str(cached))
    for folder in folders:
        fs, path = resolve(folder)
        location = f"{path.rstrip('/')}/{name}"
        looked.append(f"{folder.rstrip('/')}/{name}")
        try:
            with fs.open_input_stream(location) as stream:
                data = stream.read()
        except (FileNotFoundError, OSError):
            continue
        if hashlib.sha256(data).hexdigest() != sha256:
            corrupt.append(looked[-1])
            continue
        store_in_cache(data, sha256)
        return data
    raise ArtifactError(
        f"the int8 model {name} is not here (looked in {', '.join(looked)})"
        + (f"; copies with another sha256 (corrupt): {', '.join(corrupt)}" if corrupt else "")
        + "; copy it from the extraction output's _plan/ folder into the cache, or "
        "re-extract with --precision fp32"
    )


def store_in_cache(data: bytes, sha256: str) -> Path:
    """Write the model into the cache (atomically) and return its path; a cache that cannot be
    written is not an error, since every reader also looks beside the output."""
    target = cache_folder() / int8_model_name(sha256)
    try:
        write_atomically(target, data)
    except OSError:
        pass
    return target


def write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    temporary.write_bytes(data)
    temporary.replace(target)


def store_beside(data: bytes, sha256: str, folder: str) -> str:
    """Copy the model into `folder` (local or URI) unless a copy of that size is there; returns
    the path written on `resolve(folder)`'s file system."""
    import pyarrow.fs as pafs

    fs, path = resolve(folder)
    target = f"{path.rstrip('/')}/{int8_model_name(sha256)}"
    info = fs.get_file_info(target)
    if info.type == pafs.FileType.File and info.size == len(data):
        return target
    temporary = f"{path.rstrip('/')}/.{int8_model_name(sha256)}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(temporary) as stream:
        stream.write(data)
    fs.move(temporary, target)
    return target


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = vectors.astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def _cosine_neighbours(unit: np.ndarray, k: int) -> np.ndarray:
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)  # an image is not its own neighbour
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def gate_figures(int8: np.ndarray, fp32: np.ndarray) -> dict[str, float | int | str]:
    """How far int8 embeddings are from fp32 ones of the same images.

    Returns:
        `mean_cosine` and `min_cosine` (each image's int8 vector against its fp32 vector), and
        `neighbour_overlap`: the mean share of each image's top-`k` cosine neighbours within the
        sample (itself excluded) that int8 and fp32 agree on, `k` = min(10, images - 1).

    Example:
        >>> gate_figures(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32))["min_cosine"]
        1.0
    """
    a, b = _unit(int8), _unit(fp32)
    cosines = (a * b).sum(axis=1)
    k = min(GATE_NEIGHBOURS, len(a) - 1)
    if k > 0:
        mine, theirs = _cosine_neighbours(a, k), _cosine_neighbours(b, k)
        overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(mine, theirs, strict=True)])
    else:
        overlap = 1.0
    return {
        "images": len(a),
        "mean_cosine": round(float(cosines.mean()), 6),
        "min_cosine": round(float(cosines.min()), 6),
        "neighbour_overlap": round(float(overlap), 6),
        "neighbours": f"top-{k} neighbours by cosine",
    }

