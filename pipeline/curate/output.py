"""The folders the curation jobs write: staged, swapped into place whole, with a manifest.

Each folder holds one Parquet file of results (`duplicates.parquet`, `audit.parquet`,
`map.parquet`), a `manifest.json` naming its kind, schema version, provenance and source, and
job-specific extras (`keep.parquet`, `report.md`, `thumbnails/`). The Parquet files carry the
provenance in their schema metadata too, so a reader that gets one file alone still knows
what made it. A job writes into a hidden staging folder and renames it into place, so a
reader sees the old results or the new ones, never a mix.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import __version__
from pipeline.errors import ArtifactError, OutputError
from pipeline.provenance import PARQUET_METADATA_KEY, Provenance, check_schema_version
from pipeline.store import EmbeddingDataset, read_parquet, write_table_atomically

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
# What each kind of folder may hold; --overwrite replaces a folder holding nothing else.
FOLDER_FILES = {
    "fc7-duplicates": {"duplicates.parquet", "keep.parquet", MANIFEST_FILE},
    "fc7-audit": {"audit.parquet", "report.md", "thumbnails", MANIFEST_FILE},
    "fc7-map": {"map.parquet", MANIFEST_FILE},
}


def check_out(out: Path, kind: str, overwrite: bool) -> None:
    """Refuse an --out that is not empty, unless --overwrite and it is an fc7 `kind` folder.

    Raises:
        OutputError: the folder holds other files, or results without --overwrite.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder")
    names = {entry.name for entry in out.iterdir()}
    if not names:
        return
    manifest = out / MANIFEST_FILE
    ours = manifest.is_file() and _kind_of(manifest) == kind
    if not ours or names - FOLDER_FILES[kind]:
        raise OutputError(
            f"--out {out}: the folder holds files that are not an fc7 {kind[4:]} output; "
            f"choose an empty or new folder"
        )
    if not overwrite:
        raise OutputError(f"--out {out}: holds {kind[4:]} results already; add --overwrite")


def _kind_of(manifest: Path) -> str | None:
    try:
        return json.loads(manifest.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


@contextmanager
def staged_folder(out: Path, kind: str, overwrite: bool) -> Iterator[Path]:
    """A staging folder to write the results in; moved to `out` when the block succeeds.

    Raises:
        OutputError: `check_out` refuses `out`, or it cannot be written.
    """
    out = Path(out)
    check_out(out, kind, overwrite)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.staging"
    try:
        staging.mkdir(parents=True)
        yield staging
        if out.exists():
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except OSError as err:
        raise OutputError(f"--out {out}: cannot write the results: {err}") from err
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def with_provenance(table: pa.Table, provenance: Provenance) -> pa.Table:
    """`table` with the provenance in its schema metadata, as the embeddings carry it."""
    return table.replace_schema_metadata({PARQUET_METADATA_KEY: provenance.to_json().encode()})


def write_results(folder: Path, name: str, table: pa.Table, provenance: Provenance) -> None:
    """Write a results table as `folder/name` (zstd, page checksums), provenance attached."""
    write_table_atomically(with_provenance(table, provenance), pafs.LocalFileSystem(),
                           str(folder / name))


def write_manifest(
    folder: Path, kind: str, data: EmbeddingDataset, fields: dict[str, Any]
) -> dict[str, Any]:
    """Write `manifest.json`: kind, schema version, fc7 version, provenance, source, `fields`."""
    manifest = {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "fc7_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "provenance": json.loads(data.provenance.to_json()),
        "source": {"embeddings": data.uri, "fingerprint": data.fingerprint()},
        **fields,
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_results(folder: str | Path, kind: str) -> tuple[pa.Table, dict[str, Any], Provenance]:
    """Read a curation folder back: its results table, manifest and provenance.

    Raises:
        ArtifactError: not a folder of this kind, an unsupported schema version, or a
            damaged Parquet file.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    remake = f"make it with fc7 {kind[4:]} EMBEDDINGS --out {folder}"
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such folder; {remake}")
    found = _kind_of(manifest_path) if manifest_path.is_file() else None
    if found != kind:
        what = f"a {found} folder" if found else "no fc7 manifest.json"
        raise ArtifactError(f"{folder}: not an fc7 {kind[4:]} output ({what}); {remake}")
    manifest = json.loads(manifest_path.read_text())
    check_schema_version(manifest.get("schema_version"), SCHEMA_VERSION, str(manifest_path),
                         remake)
    if not isinstance(manifest.get("provenance"), dict):
        raise ArtifactError(f"{manifest_path}: records no provenance; {remake}")
    provenance = Provenance.from_json(json.dumps(manifest["provenance"]), str(manifest_path))
    name = next(iter(sorted(FOLDER_FILES[kind] - {MANIFEST_FILE, "keep.parquet", "report.md",
                                                   "thumbnails"})))
    return read_parquet(str(folder / name)), manifest, provenance
