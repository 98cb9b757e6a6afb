"""The one place that imports FAISS, and the FAISS mechanics every index module shares.

The OpenBLAS bundled in the faiss wheels (0.3.15) does not recognise recent CPUs and falls back
to its slowest kernels, which made exact search 4.6x slower on the machine this was written on.
OpenBLAS reads `OPENBLAS_CORETYPE` once, when faiss loads it, so this module sets it from
/proc/cpuinfo before importing faiss, unless the user set it (see `BLAS_NOTE`). Every other
module takes `faiss` from here.

Also here: how fc7's metrics map to FAISS metrics and back to scores, L2 normalisation, GPU
copies, and setting search parameters (through `faiss.ParameterSpace`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.errors import ArtifactError

__all__ = [
    "BLAS_NOTE", "SCORES", "faiss", "faiss_message", "gpu_count",
    "metric_type", "normalize", "openblas_coretype", "parts", "scores", "set_search_params",
    "to_gpu", "tunable_parameters",
]

log = logging.getLogger(__name__)


def openblas_coretype(cpuinfo: str) -> str | None:
    """The OpenBLAS core type whose kernels this CPU runs, from /proc/cpuinfo's flags.

    Example:
        >>> openblas_coretype("flags : fpu avx2 fma")
        'Haswell'
    """
    match = re.search(r"^flags\s*:(.*)$", cpuinfo, flags=re.MULTILINE)
    flags = set(match.group(1).split()) if match else set()
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def _configure_openblas() -> str | None:
    if "OPENBLAS_CORETYPE" in os.environ:
        return None  # the user's choice wins
    if "faiss" in sys.modules:
        return "faiss was imported before fc7 could set OPENBLAS_CORETYPE; set it yourself"
    try:
        with open("/proc/cpuinfo") as file:
            core = openblas_coretype(file.read())
    except OSError:
        return None
    if core is None:
        return None
    os.environ["OPENBLAS_CORETYPE"] = core
    return (
        f"set OPENBLAS_CORETYPE={core} from this CPU's flags (faiss's bundled OpenBLAS may not "
        f"recognise it and fall back to slow kernels); set it yourself to override"
    )


BLAS_NOTE = _configure_openblas()
if BLAS_NOTE:
    log.info(BLAS_NOTE)

import faiss  # noqa: E402  (after OPENBLAS_CORETYPE is set)

SCORES = {
    "cosine": "cosine similarity (higher is more similar)",
    "ip": "inner product (higher is more similar)",
    "l2": "squared L2 distance (lower is more similar)",
}
# The manifest names search parameters as the index classes do; `ParameterSpace` calls
# IndexRefine's `k_factor` "k_factor_rf" (its "k_factor" is IndexIVFPQR's).
_PARAMETER_SPACE_NAMES = {"k_factor": "k_factor_rf"}


def metric_type(metric: str) -> int:
    """The FAISS metric used for `cosine`, `ip` or `l2`.

    Cosine indexes hold L2-normalised vectors and search them by L2 distance, which ranks them
    exactly as cosine does (|x - y|^2 = 2 - 2 cos) but stays right after a PCA (which centres
    the data, changing inner products but not distances) and suits IVF residual codes better.
    `scores` turns the distances back into cosine similarities.
    """
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def scores(distances: np.ndarray, metric: str) -> np.ndarray:
    """FAISS distances as the scores users see: cosine similarity, inner product or L2^2."""
    return 1.0 - distances / 2.0 if metric == "cosine" else distances


def normalize(vectors: np.ndarray) -> np.ndarray:
    """`vectors` as float32 rows scaled to unit L2 norm (zero rows stay zero), a new array.

    Not `faiss.normalize_L2`: it sums the squares in another order and multiplies by the
    inverse norm, so about a third of the values come out one bit different. Indexes built
    with it are no longer byte-identical to those built before, and IVF training on the
    changed vectors moves centroids (and so recall figures and, at times, the tuned nprobe).

    Example:
        >>> normalize(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
        [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def parts(index: faiss.Index) -> Iterator[faiss.Index]:
    """`index` and the indexes inside it (pre-transform, refine, HNSW storage), downcast."""
    index = faiss.downcast_index(index)
    yield index
    for attr in ("index", "base_index", "refine_index", "storage"):
        inner = getattr(index, attr, None)
        if isinstance(inner, faiss.Index):
            yield from parts(inner)


def tunable_parameters(index: faiss.Index) -> set[str]:
    """The search parameters `set_search_params` can set on `index`, as the manifest names them.

    Example:
        >>> tunable_parameters(faiss.index_factory(8, "IVF4,Flat"))
        {'nprobe'}
    """
    space = faiss.ParameterSpace()
    space.initialize(index)
    names = {space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())}
    ours = {theirs: mine for mine, theirs in _PARAMETER_SPACE_NAMES.items()}
    return {ours.get(name, name) for name in names}


def set_search_params(index: faiss.Index, params: dict[str, float]) -> None:
    """Set search parameters (`nprobe`, `efSearch`, `k_factor`) wherever `index` holds them.

    Raises:
        ArtifactError: a parameter that no part of this index has.

    Example:
        >>> set_search_params(faiss.index_factory(8, "IVF4,Flat"), {"nprobe": 2})
    """
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, _PARAMETER_SPACE_NAMES.get(name, name), value)
        except RuntimeError:
            raise ArtifactError(
                f"search parameter {name}: this index has no part that uses it"
            ) from None


def gpu_count() -> int:
    """GPUs FAISS can use here (0 with faiss-cpu or without CUDA)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def to_gpu(index: faiss.Index) -> tuple[faiss.Index, Any] | None:
    """A GPU copy of `index` and its resources, or None when FAISS has no GPU version of it."""
    if gpu_count() == 0:
        return None
    try:
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, index), resources
    except (RuntimeError, AttributeError) as err:
        log.info("staying on CPU: %s", faiss_message(err))
        return None


def faiss_message(err: Exception) -> str:
    """The useful line of a FAISS exception (they carry a C++ stack trace)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Error:"):
            return line.removeprefix("Error:").strip().strip("'")
    return lines[-1] if lines else "faiss error"
