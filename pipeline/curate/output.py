"""The folders the curation jobs write: staged, swapped into place whole, with a manifest.

Each folder holds one Parquet file of results (`duplicates.parquet`, `audit.parquet`,
`map.parquet`), a `manifest.json` naming its kind, schema version, provenance and source, and
job-specific extras (`keep.parquet`, `report.md`, `thumbnails/`). The Parquet files carry the
provenance in their schema metadata too, so a reader that gets one file alone still knows
what made it. A job writes into a hidden staging folder and renames it into place, so a
reader sees the old results or the new ones, never a mix.

The contract of each folder (`MAP`, `DUPLICATES`, `AUDIT`: its file and the columns, types and
required values of its table) lives here too, with the one reader that checks it: `read_folder`,
which `fc7 serve --map/--duplicates/--audit` uses before it compares the provenance with its
index's, and `read_results`, the same for a script.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

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


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


@dataclass(frozen=True)
class CurationOutput:
    """One curation command's output folder, as the contract fixes it."""

    name: str  # the view, and the option of `fc7 serve` (`--map`)
    kind: str  # the manifest's `kind`
    file: str
    command: str
    # column: (Arrow type it is read as, whether nulls are allowed)
    columns: dict[str, tuple[pa.DataType, bool]]
    optional: dict[str, tuple[pa.DataType, bool]] = field(default_factory=dict)

    def fix(self, folder: Path) -> str:
        return f"make it with `{self.command} EMBEDDINGS --out {folder}`"


_ID = {"id": (pa.string(), False), "path": (pa.string(), False), "label": (pa.string(), True)}
MAP = CurationOutput(
    "map",
    "fc7-map",
    "map.parquet",
    "fc7 map",
    _ID | {"x": (pa.float32(), False), "y": (pa.float32(), False)},
)
DUPLICATES = CurationOutput(
    "duplicates",
    "fc7-duplicates",
    "duplicates.parquet",
    "fc7 duplicates",
    {"group": (pa.int64(), False)}
    | _ID
    | {
        "similarity": (pa.float32(), True),
        "representative": (pa.bool_(), False),
        "kind": (pa.string(), False),
    },
)
# Flags are null where they do not apply (a test image has no label issue): read as false.
AUDIT = CurationOutput(
    "audit",
    "fc7-audit",
    "audit.parquet",
    "fc7 audit",
    _ID
    | {
        "suggested_label": (pa.string(), True),
        "label_score": (pa.float32(), True),
        "label_issue": (pa.bool_(), True),
        "outlier_score": (pa.float32(), True),
        "outlier": (pa.bool_(), True),
        "near_duplicate": (pa.bool_(), True),
        "split": (pa.string(), False),
        "leak": (pa.bool_(), True),
        "leak_id": (pa.string(), True),
    },
    # How similar a leak is to the training image it repeats, where the audit records it.
    optional={"leak_similarity": (pa.float32(), True)},
)
OUTPUTS = {output.kind: output for output in (MAP, DUPLICATES, AUDIT)}

# What a stored type may be for each type read (all cast without loss of meaning).
_ACCEPTS: dict[pa.DataType, Callable[[pa.DataType], bool]] = {
    pa.string(): _is_string,
    pa.float32(): pa.types.is_floating,
    pa.int64(): pa.types.is_integer,
    pa.bool_(): pa.types.is_boolean,
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


def read_folder(
    folder: str | Path, output: CurationOutput, where: str | None = None
) -> tuple[pa.Table, dict[str, Any], list[tuple[Provenance, str]]]:
    """The results table and manifest of a curation folder, checked against `output`'s contract,
    and each provenance it records with where (the manifest, the Parquet file's metadata).

    Args:
        folder: a folder that `fc7 map`, `fc7 duplicates` or `fc7 audit` wrote.
        output: which command's output it must be (`MAP`, `DUPLICATES`, `AUDIT`).
        where: how messages name the folder (default: its path).

    Returns:
        The table with the contract's columns (and its optional ones that are there), cast to
        their types; the manifest; the recorded provenances.

    Raises:
        ArtifactError: the folder, its manifest or its Parquet file is missing, of another
            kind, of a newer schema, damaged, or lacks a column or a required value.

    Example:
        >>> table, manifest, stored = read_folder("out/map", MAP)  # doctest: +SKIP
        >>> manifest["method"]  # doctest: +SKIP
        'umap'
    """
    folder = Path(folder)
    where = where or str(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{where}: no such folder; {output.fix(folder)}")
    manifest = _read_manifest(folder, output, where)
    parquet = folder / output.file
    if not parquet.is_file():
        raise ArtifactError(f"{parquet}: missing; {output.fix(folder)}")
    try:
        schema = pq.read_schema(parquet)
    except (OSError, pa.ArrowException) as err:
        raise ArtifactError(f"{parquet}: damaged or not a readable Parquet file ({err})") from None
    stored = _stored_provenance(manifest, schema, parquet)
    _check_columns(schema, output, parquet, folder)
    columns = output.columns | {
        name: spec for name, spec in output.optional.items() if name in schema.names
    }
    table = read_parquet(str(parquet), columns=list(columns))
    table = table.cast(pa.schema([(name, kind) for name, (kind, _) in columns.items()]))
    for name, (kind, nullable) in columns.items():
        missing = table[name].is_null().to_numpy(zero_copy_only=False)
        bad = missing if not nullable else np.zeros(len(table), dtype=bool)
        if pa.types.is_floating(kind):  # scores and coordinates are finite numbers
            bad = bad | (~missing & ~np.isfinite(table[name].to_numpy(zero_copy_only=False)))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ArtifactError(
                f"{parquet}: column {name!r} is {table[name][row].as_py()} in row {row} "
                f"(id {table['id'][row].as_py()!r}); {output.fix(folder)}"
            )
    return table, manifest, stored


def read_results(folder: str | Path, kind: str) -> tuple[pa.Table, dict[str, Any], Provenance]:
    """Read a curation folder back (`read_folder`): its results table, manifest and provenance.

    Raises:
        ArtifactError: see `read_folder`; or it records no provenance.
        ProvenanceMismatch: its Parquet file's provenance is not its manifest's.
        ValueError: `kind` is not "fc7-map", "fc7-duplicates" or "fc7-audit".
    """
    if kind not in OUTPUTS:
        raise ValueError(f"kind {kind!r}: not one of {', '.join(OUTPUTS)}")
    output = OUTPUTS[kind]
    table, manifest, stored = read_folder(folder, output)
    if not stored:
        raise ArtifactError(f"{folder}: records no provenance; {output.fix(Path(folder))}")
    provenance, source = stored[0]
    for other, other_source in stored[1:]:
        provenance.require_compatible(other, mine=f"{folder} ({source})",
                                      theirs=f"{folder} ({other_source})",
                                      fix=output.fix(Path(folder)))
    return table, manifest, provenance


def _read_manifest(folder: Path, output: CurationOutput, where: str) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(
            f"{where}: not an {output.kind} folder (no {MANIFEST_FILE}); {output.fix(folder)}"
        ) from None
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path}: unreadable ({err}); {output.fix(folder)}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: not a JSON object; {output.fix(folder)}")
    kind = manifest.get("kind")
    if kind != output.kind:
        other = OUTPUTS.get(kind) if isinstance(kind, str) else None
        hint = f"; pass it to --{other.name}" if other else ""
        raise ArtifactError(
            f"{where}: holds an output of kind {kind!r}, not {output.kind!r}{hint}; "
            f"{output.fix(folder)}"
        )
    check_schema_version(
        manifest.get("schema_version"), SCHEMA_VERSION, str(path), output.fix(folder)
    )
    return manifest


def _stored_provenance(
    manifest: dict[str, Any], schema: pa.Schema, parquet: Path
) -> list[tuple[Provenance, str]]:
    """The provenance an output records: its manifest's, its Parquet schema's, or none."""
    found = []
    recorded = manifest.get("provenance")
    if recorded is not None:
        text = recorded if isinstance(recorded, str) else json.dumps(recorded)
        manifest_path = str(parquet.parent / MANIFEST_FILE)
        found.append((Provenance.from_json(text, manifest_path), MANIFEST_FILE))
    metadata = schema.metadata or {}
    if PARQUET_METADATA_KEY in metadata:
        found.append(
            (Provenance.from_json(metadata[PARQUET_METADATA_KEY], str(parquet)), parquet.name)
        )
    return found


def _check_columns(schema: pa.Schema, output: CurationOutput, parquet: Path, folder: Path) -> None:
    for name, (kind, _) in (output.columns | output.optional).items():
        index = schema.get_field_index(name)
        if index < 0 and name in output.optional:
            continue
        if index < 0:
            raise ArtifactError(
                f"{parquet}: no column {name!r} (it has {', '.join(schema.names)}); "
                f"{output.fix(folder)}"
            )
        stored = schema.field(index).type
        if not _ACCEPTS[kind](stored):
            raise ArtifactError(
                f"{parquet}: column {name!r} is {stored}, not {kind}; {output.fix(folder)}"
            )
