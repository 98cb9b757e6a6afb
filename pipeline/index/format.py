"""The index folder on disk: writing it atomically, and reading it back checked.

An index folder holds three files that must agree, and `load_index` checks that they do:
- `index.faiss`: the FAISS index (vectors L2-normalised first when the metric is cosine);
- `ids.parquet`: FAISS position -> id, path, label, provenance in its schema metadata;
- `manifest.json`: kind, factory string, metric, PCA, count, dim, tuned search parameters,
  recall@10 against exact search, latency, the embeddings' provenance, the source datasets'
  fingerprints and the sha256 of the other two files (so a corrupt file is named, not used).

`load_index` also checks what a matching sha256 cannot vouch for: the FAISS index's own
structure, metric, dimension and count, and `ids.parquet`'s page checksums and schema version.
`--overwrite` and `--add` replace a folder holding these three files and nothing else, but for
the int8 model (`int8-<sha256>.onnx`) that an index of int8 embeddings carries, so that a query
by image embeds with the same model wherever the folder is moved.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import ArtifactError, OutputError
from pipeline.index.faiss_env import SCORES, faiss, set_search_params
from pipeline.index.verify import REBUILD, read_checked_index
from pipeline.provenance import (
    PARQUET_METADATA_KEY,
    Provenance,
    check_schema_version,
    file_sha256,
)
from pipeline.quantize import INT8_MODEL_NAME, int8_model_name
from pipeline.store import describe_entries, foreign_entries, read_parquet

log = logging.getLogger(__name__)

INDEX_SCHEMA_VERSION = 1
INDEX_FORMAT = "fc7-index"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
MANIFEST_FILE = "manifest.json"
IDS_METADATA_KEY = b"fc7.index"
# Everything fc7 writes in an index folder; --overwrite and --add replace nothing else.
INDEX_FOLDER_FILES = frozenset({INDEX_FILE, IDS_FILE, MANIFEST_FILE})


def check_index_out(out: Path, replace: bool) -> None:
    """Refuse an index --out that fc7 must not write or replace.

    fc7 replaces an index folder as a whole, so it only ever replaces one holding nothing but
    the files it writes there (`INDEX_FOLDER_FILES`). A new or empty folder is always fine.

    Raises:
        OutputError: `out` is not a folder; is not empty and not an fc7 index (with or without
            `replace`); is an index holding other files (listed); or is an index and not
            `replace`.

    Example:
        >>> check_index_out(Path("out/index"), replace=True)  # doctest: +SKIP
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder; choose another --out")
    fs = pafs.LocalFileSystem()
    try:
        entries = foreign_entries(fs, str(out), lambda info: False)
        if not entries:
            return
        foreign = foreign_entries(
            fs,
            str(out),
            lambda info: info.type == pafs.FileType.File and _is_index_file(info.base_name),
        )
    except OSError as err:
        raise OutputError(f"--out {out}: cannot list: {err}") from err
    if not _is_index_manifest(out / MANIFEST_FILE):
        raise OutputError(
            f"--out {out}: not empty and not an fc7 index (no valid {MANIFEST_FILE}): holds "
            f"{describe_entries(entries)}; fc7 writes an index only into a new or empty folder "
            f"or over an index it made; choose another --out"
        )
    if foreign:
        raise OutputError(
            f"--out {out}: holds files fc7 did not write ({describe_entries(foreign)}); fc7 "
            f"replaces an index folder as a whole and will not delete them: move them out of "
            f"{out}, or choose another --out"
        )
    if not replace:
        raise OutputError(
            f"--out {out}: already exists; pass --add to append new rows to the index there, "
            f"or --overwrite to replace it"
        )


def _is_index_file(name: str) -> bool:
    return name in INDEX_FOLDER_FILES or bool(INT8_MODEL_NAME.fullmatch(name))


def _is_index_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == INDEX_FORMAT


def write_index_dir(
    out: Path,
    index: faiss.Index,
    ids: list[str],
    paths: list[str],
    labels: list[str | None],
    manifest: dict[str, Any],
    provenance: Provenance,
    replace: bool = False,
    int8_model: bytes | None = None,
) -> None:
    """Write the three files into a hidden sibling folder, then move it into place.

    A reader sees the old folder or the new one, never a mix; a failure leaves the old one.
    Of the old folder, only the files fc7 wrote are deleted (see `check_index_out`).
    `manifest` gains the `files` entry (names and sha256) and `index_bytes`.

    Args:
        int8_model: the model that made int8 embeddings (`provenance.int8_model_sha256`),
            written beside the index; required for them.

    Raises:
        OutputError: the parent folder cannot be written, or `check_index_out` refuses `out`.
        ArtifactError: int8 embeddings without their model.
    """
    out = Path(out)
    check_index_out(out, replace)
    if provenance.precision == "int8" and int8_model is None:
        raise ArtifactError(
            f"--out {out}: the index of int8 embeddings needs their int8 model beside it"
        )
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        faiss.write_index(index, str(staging / INDEX_FILE))
        table = pa.table(
            {
                "position": pa.array(np.arange(len(ids)), pa.int64()),
                "id": pa.array(ids, pa.string()),
                "path": pa.array(paths, pa.string()),
                "label": pa.array(labels, pa.string()),
            }
        )
        meta = {"schema_version": INDEX_SCHEMA_VERSION, "count": len(ids)}
        table = table.replace_schema_metadata(
            {
                PARQUET_METADATA_KEY: provenance.to_json().encode(),
                IDS_METADATA_KEY: json.dumps(meta).encode(),
            }
        )
        pq.write_table(table, staging / IDS_FILE, compression="zstd", write_page_checksum=True)
        manifest["files"] = {
            "index": INDEX_FILE,
            "index_sha256": file_sha256(staging / INDEX_FILE),
            "ids": IDS_FILE,
            "ids_sha256": file_sha256(staging / IDS_FILE),
        }
        if provenance.precision == "int8":
            name = int8_model_name(provenance.int8_model_sha256)
            (staging / name).write_bytes(int8_model)
            manifest["files"]["int8_model"] = name
        manifest["index_bytes"] = (staging / INDEX_FILE).stat().st_size
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
            out.rename(old)
            try:
                staging.rename(out)
            except OSError:
                old.rename(out)  # keep the previous index rather than none
                raise
            _remove_old_index(old)
        else:
            staging.rename(out)
    except OSError as err:
        raise OutputError(f"--out {out}: cannot write the index: {err}") from err
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)  # our own folder, made above


def _remove_old_index(old: Path) -> None:
    # Only our files, never rmtree: anything else that appeared since the check stays.
    for name in [*INDEX_FOLDER_FILES, *(p.name for p in old.glob("int8-*.onnx"))]:
        if not _is_index_file(name):
            continue
        try:
            (old / name).unlink(missing_ok=True)
        except OSError:
            pass
    try:
        old.rmdir()
    except OSError:
        log.warning("left %s: it holds files fc7 did not write", old)


@dataclass
class LoadedIndex:
    """An index folder read back and checked: the FAISS index, id map and manifest agree."""

    index: faiss.Index
    ids: list[str]
    paths: list[str]
    labels: list[str | None]
    manifest: dict[str, Any]
    provenance: Provenance
    folder: Path | None = None


def load_index(index_dir: str | Path) -> LoadedIndex:
    """Read an index folder written by `fc7 index` and check that its files agree.

    The FAISS index comes back set to the manifest's tuned search parameters.

    Raises:
        ArtifactError: a file is missing, corrupt (sha256 differs from the manifest's, a
            Parquet page checksum fails, FAISS cannot read it or it does not hold a usable
            index), from a newer fc7, or the index, id map and manifest disagree on count,
            dimension, metric or provenance. The message names the file.

    Example:
        >>> loaded = load_index("out/index")  # doctest: +SKIP
        >>> loaded.index.ntotal == len(loaded.ids) == loaded.manifest["count"]
        True
    """
    folder = Path(index_dir)
    manifest_path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such index folder (build one with fc7 index)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{manifest_path}: missing; {folder} is not an fc7 index") from None
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{manifest_path}: unreadable or not JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise ArtifactError(f"{manifest_path}: not an fc7 index manifest")
    check_schema_version(
        manifest.get("schema_version"), INDEX_SCHEMA_VERSION, str(manifest_path), REBUILD
    )
    try:
        provenance = Provenance.model_validate(manifest["provenance"])
        files = manifest["files"]
        count, dim, metric = int(manifest["count"]), int(manifest["dim"]), manifest["metric"]
        params = {str(name): int(value) for name, value in dict(manifest["search_params"]).items()}
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{manifest_path}: incomplete manifest ({err})") from None
    if metric not in SCORES:
        raise ArtifactError(f"{manifest_path}: unknown metric {metric!r}")
    index_path, ids_path = folder / INDEX_FILE, folder / IDS_FILE
    for path, key in ((index_path, "index_sha256"), (ids_path, "ids_sha256")):
        if not path.is_file():
            raise ArtifactError(f"{path}: missing from the index folder; {REBUILD}")
        if not isinstance(files, dict) or file_sha256(path) != files.get(key):
            raise ArtifactError(
                f"{path}: corrupt (its sha256 differs from the manifest's); {REBUILD}"
            )
    index = read_checked_index(index_path, metric)
    table = _read_ids(ids_path)
    stored = Provenance.from_json(
        (table.schema.metadata or {}).get(PARQUET_METADATA_KEY, b"null"), where=str(ids_path)
    )
    diffs = stored.differences(provenance)
    if diffs:
        raise ArtifactError(f"{ids_path}: provenance differs from the manifest: {diffs}")
    if not (index.ntotal == count == table.num_rows):
        raise ArtifactError(
            f"{folder}: the index holds {index.ntotal:,} vectors, the id map {table.num_rows:,} "
            f"rows and the manifest says {count:,}; {REBUILD}"
        )
    if index.d != dim or provenance.dim != dim:
        raise ArtifactError(
            f"{folder}: dimension disagrees: index {index.d}, manifest {dim}, provenance "
            f"{provenance.dim}; {REBUILD}"
        )
    positions = table.column("position").to_numpy()
    if not np.array_equal(positions, np.arange(count)):
        raise ArtifactError(f"{ids_path}: positions are not 0..{count - 1}; {REBUILD}")
    ids = table.column("id").to_pylist()
    if table.column("id").null_count or len(set(ids)) != count:
        raise ArtifactError(f"{ids_path}: ids are missing or repeated; {REBUILD}")
    try:
        set_search_params(index, params)
    except ArtifactError as err:
        raise ArtifactError(f"{manifest_path}: {err}; {REBUILD}") from None
    return LoadedIndex(
        index,
        ids,
        table.column("path").to_pylist(),
        table.column("label").to_pylist(),
        manifest,
        provenance,
        folder,
    )


_ID_COLUMNS = {"position": pa.int64(), "id": pa.string(), "path": pa.string(), "label": pa.string()}


def _read_ids(path: Path) -> pa.Table:
    try:
        table = read_parquet(str(path))
    except ArtifactError as err:
        raise ArtifactError(f"{err}; {REBUILD}") from None
    for name, kind in _ID_COLUMNS.items():
        if name not in table.column_names or table.schema.field(name).type != kind:
            raise ArtifactError(f"{path}: not an fc7 id map (no {name} column of {kind})")
    try:
        meta = json.loads((table.schema.metadata or {})[IDS_METADATA_KEY])
        version, rows = meta["schema_version"], meta["count"]
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(
            f"{path}: not an fc7 id map (no valid {IDS_METADATA_KEY.decode()} metadata); "
            f"{REBUILD}"
        ) from None
    check_schema_version(version, INDEX_SCHEMA_VERSION, f"{path} (id map)", REBUILD)
    if rows != table.num_rows:
        raise ArtifactError(
            f"{path}: its metadata says {rows} rows but it holds {table.num_rows:,}; {REBUILD}"
        )
    return table
