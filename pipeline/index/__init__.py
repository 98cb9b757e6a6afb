"""FAISS similarity indexes: choose, build, tune, save and load them.

The user-facing query API is `pipeline.search`; the `fc7 index` job is `jobs/build_index.py`.

Modules, in the order a build uses them:
- `faiss_env`: the only module that imports faiss (after setting OpenBLAS up); metrics and
  scores, L2 normalisation, GPU copies, search parameters (`faiss.ParameterSpace`).
- `config`: `IndexConfig`, the options of `fc7 index`.
- `plan`: `plan_index`, which FAISS factory string for a size, dimension and memory budget.
- `tune`: the exact oracle, recall@10, and tuning nprobe / efSearch / k_factor to a target.
- `idmap`: the id map on disk (memory-mapped Arrow + sorted id hashes), repeated ids found in
  bounded memory.
- `verify`: the structure checks `load_index` runs on the FAISS file (metric, lists, graph).
- `format`: the index folder on disk: `write_index_dir`, `load_index` (which checks it).
- `encode`: which rows are indexed (`write_id_map`), filling a trained index with a range of
  shards (`encode_range`), and merging filled parts in order (`merge_into`).
- `distributed`: the same filling done by Ray tasks (`--runner ray`).
- `build`: `build_index` and `add_to_index` (`--add`).
- `report`: `summary`, the text the job prints.

The names in `__all__` are imported from their module on first use, so that `pipeline.search`
(which imports only `faiss_env`, `format` and `verify`) never loads the build code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build": ("BuildResult", "add_to_index", "build_index"),
    "config": ("KINDS", "IndexConfig"),
    "faiss_env": ("BLAS_NOTE", "SCORES", "faiss", "normalize", "scores"),
    "format": (
        "IDS_FILE", "INDEX_FILE", "MANIFEST_FILE", "LoadedIndex", "check_index_out",
        "load_index", "write_index_dir",
    ),
    "plan": ("IndexPlan", "plan_index"),
    "report": ("summary",),
    "tune": ("Evaluation", "evaluate"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
