"""The index folder on disk: writing it atomically, and reading it back checked.

An index folder holds four files that must agree, and `load_index` checks that they do:
- `index.faiss`: the FAISS index (vectors L2-normalised first when the metric is cosine);
- `ids.arrow` and `ids.lookup.npy`: the id map (`idmap`): position -> id, path, label, and
  id -> position, memory-mapped; provenance in the Arrow schema's metadata;
- `manifest.json`: kind, factory string, metric, PCA, count, dim, tuned search parameters,
  recall@10 against exact search, latency, the embeddings' provenance, the source datasets'
  fingerprints and the sha256 of the other files (so a corrupt file is named, not used).

A build writes the id map into a staging folder first (`staging_folder`), while it reads the
embeddings, and `write_index_dir` adds the index and manifest and moves the folder into place.
`load_index` also checks what a matching sha256 cannot vouch for: the FAISS index's own
structure, metric, dimension and count, and the id map's schema and provenance. With `mmap`,
FAISS maps the file instead of reading it (`IO_FLAG_MMAP_IFC`: inverted lists, flat codes and
refine codes are used in place), so an index larger than this machine's memory can be searched.
`--overwrite` and `--add` replace a folder holding these files and nothing else, but for
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

import pyarrow.fs as pafs

from pipeline.errors import ArtifactError, OutputError
from pipeline.index.faiss_env import SCORES, faiss, set_search_params
from pipeline.index.idmap import IDS_FILE, LOOKUP_FILE, IdMap
from pipeline.index.verify import REBUILD, read_checked_index
from pipeline.provenance import (
    INT8_MODEL_NAME,
    PARQUET_METADATA_KEY,
    Provenance,
    check_schema_version,
    file_sha256,
    int8_model_name,
)
from pipeline.store import describe_entries, foreign_entries

log = logging.getLogger(__name__)

# 2: the id map moved from ids.parquet (read whole into lists) to ids.arrow + ids.lookup.npy.
INDEX_SCHEMA_VERSION = 2
INDEX_FORMAT = "fc7-index"
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
_OLD_IDS_FILE = "ids.parquet"  # schema 1; only so that --overwrite replaces such a folder
# Everything fc7 writes in an index folder; --overwrite and --add replace nothing else.
INDEX_FOLDER_FILES = frozenset({INDEX_FILE, IDS_FILE, LOOKUP_FILE, MANIFEST_FILE, _OLD_IDS_FILE})


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


def staging_folder(out: Path) -> Path:
    """A new hidden folder beside `out` to write an index into before `write_index_dir` moves
    it into place; the caller removes it if the build fails (`remove_staging`)."""
    out = Path(out)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as err:
        raise OutputError(f"--out {out}: cannot write the index: {err}") from err
    return staging


def remove_staging(staging: Path) -> None:
    """Remove a staging folder `staging_folder` made (fc7's own, so all of it)."""
    shutil.rmtree(staging, ignore_errors=True)


def write_index_dir(
    out: Path,
    staging: Path,
    index: faiss.Index,
    manifest: dict[str, Any],
    provenance: Provenance,
    replace: bool = False,
    int8_model: bytes | None = None,
) -> None:
    """Add the index and manifest to `staging` (which holds the id map), then move it to `out`.

    A reader sees the old folder or the new one, never a mix; a failure leaves the old one.
    Of the old folder, only the files fc7 wrote are deleted (see `check_index_out`).
    `manifest` gains the `files` entry (names and sha256) and `index_bytes`.

    Args:
        staging: from `staging_folder`, holding `ids.arrow` and `ids.lookup.npy`; removed
            whether or not this succeeds.
        int8_model: the model that made int8 embeddings (`provenance.int8_model_sha256`),
            written beside the index; required for them.

    Raises:
        OutputError: the parent folder cannot be written, or `check_index_out` refuses `out`.
        ArtifactError: int8 embeddings without their model.
    """
    out = Path(out)
    try:
        check_index_out(out, replace)
        if provenance.precision == "int8" and int8_model is None:
            raise ArtifactError(
                f"--out {out}: the index of int8 embeddings needs their int8 model beside it"
            )
        faiss.write_index(index, str(staging / INDEX_FILE))
        manifest["files"] = {
            "index": INDEX_FILE,
            "index_sha256": file_sha256(staging / INDEX_FILE),
            "ids": IDS_FILE,
            "ids_sha256": file_sha256(staging / IDS_FILE),
            "lookup": LOOKUP_FILE,
            "lookup_sha256": file_sha256(staging / LOOKUP_FILE),
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
            remove_staging(staging)


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
    id_map: IdMap
    manifest: dict[str, Any]
    provenance: Provenance
    folder: Path
    mmap: bool = False


def load_index(index_dir: str | Path, mmap: bool = False) -> LoadedIndex:
    """Read an index folder written by `fc7 index` and check that its files agree.

    The FAISS index comes back set to the manifest's tuned search parameters.

    Args:
        index_dir: the folder.
        mmap: map the FAISS file (lists and codes) instead of reading it; the id map is
            always memory-mapped.

    Raises:
        ArtifactError: a file is missing, corrupt (sha256 differs from the manifest's, FAISS
            cannot read it or it does not hold a usable index), from another fc7 schema, or
            the index, id map and manifest disagree on count, dimension, metric or provenance.
            The message names the file.

    Example:
        >>> loaded = load_index("out/index")  # doctest: +SKIP
        >>> loaded.index.ntotal == len(loaded.id_map) == loaded.manifest["count"]
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
    version = check_schema_version(
        manifest.get("schema_version"), INDEX_SCHEMA_VERSION, str(manifest_path), REBUILD
    )
    if version < INDEX_SCHEMA_VERSION:
        raise ArtifactError(
            f"{manifest_path}: written by an older fc7 (schema {version}, whose id map is read "
            f"whole into memory); {REBUILD} with this one"
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
    index_path = folder / INDEX_FILE
    for name, key in ((INDEX_FILE, "index"), (IDS_FILE, "ids"), (LOOKUP_FILE, "lookup")):
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing from the index folder; {REBUILD}")
        if not isinstance(files, dict) or file_sha256(path) != files.get(f"{key}_sha256"):
            raise ArtifactError(
                f"{path}: corrupt (its sha256 differs from the manifest's); {REBUILD}"
            )
    index = read_checked_index(index_path, metric, mmap)
    id_map = IdMap.open(folder)
    ids_path = folder / IDS_FILE
    stored = Provenance.from_json(
        id_map.metadata.get(PARQUET_METADATA_KEY, b"null"), where=str(ids_path)
    )
    diffs = stored.differences(provenance)
    if diffs:
        raise ArtifactError(f"{ids_path}: provenance differs from the manifest: {diffs}")
    if not (index.ntotal == count == len(id_map)):
        raise ArtifactError(
            f"{folder}: the index holds {index.ntotal:,} vectors, the id map {len(id_map):,} "
            f"rows and the manifest says {count:,}; {REBUILD}"
        )
    if index.d != dim or provenance.dim != dim:
        raise ArtifactError(
            f"{folder}: dimension disagrees: index {index.d}, manifest {dim}, provenance "
            f"{provenance.dim}; {REBUILD}"
        )
    try:
        set_search_params(index, params)
    except ArtifactError as err:
        raise ArtifactError(f"{manifest_path}: {err}; {REBUILD}") from None
    return LoadedIndex(index, id_map, manifest, provenance, folder, mmap)
