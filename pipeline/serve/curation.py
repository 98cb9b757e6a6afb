"""The curation views: a 2-D map of the collection, its duplicate groups, and an audit's findings
(label issues, outliers, test images that repeat training images), read once at start-up from
the folders that `fc7 map`, `fc7 duplicates` and `fc7 audit` write.

Each folder is checked before the server starts: its `manifest.json` names its kind and schema
version, its Parquet file has the columns of the contract with values where they are required,
and the provenance it records (if any) is the index's feature space. Requests then only slice
arrays held in memory; the map's answer, the largest, is serialised and gzipped once.

Ids are the index's ids; an id the index lacks is still shown (`in_index` false, `not_in_index`
in the map), but has no thumbnail and cannot be searched from.

Example:
    >>> index = SimilarityIndex.open("out/index")  # doctest: +SKIP
    >>> curation = Curation.load(index, "out/index", map_dir="out/map")  # doctest: +SKIP
    >>> curation.views()  # doctest: +SKIP
    {'map': True, 'duplicates': False, 'issues': False}
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.curate.output import AUDIT, DUPLICATES, MAP, CurationOutput, read_folder
from pipeline.errors import ArtifactError
from pipeline.index.idmap import IdMap
from pipeline.search import SimilarityIndex

# Bits of the map's per-point `issues`, in this order (bit i is 1 << i).
ISSUE_NAMES = ("label", "outlier", "leak", "duplicate")


def read_output(
    folder: str | Path, output: CurationOutput, index: SimilarityIndex, index_dir: str
) -> tuple[pa.Table, dict[str, Any]]:
    """`read_folder` for `fc7 serve --map/--duplicates/--audit`, whose every recorded
    provenance must be the index's feature space.

    Raises:
        ArtifactError: see `read_folder`.
        ProvenanceMismatch: it was made from other features than the index.
    """
    table, manifest, stored = read_folder(folder, output, where=f"--{output.name} {folder}")
    for provenance, source in stored:
        index.provenance.require_compatible(
            provenance,
            mine=f"index {index_dir}",
            theirs=f"{output.name} {folder} ({source})",
            fix="make it again from the embeddings the index was built from",
        )
    return table, manifest


def _in_index(id_map: IdMap, table: pa.Table) -> np.ndarray:
    """Whether each row is an item of the index: its id is there, with the same path (an id
    alone could name another image, e.g. a test image named like a training one)."""
    positions = id_map.positions(table["id"].to_pylist())
    found = np.flatnonzero(positions >= 0)
    indexed = [path for _, path, _ in id_map.rows(positions[found])]
    same = np.asarray(indexed, dtype=object) == table["path"].take(found).to_numpy(
        zero_copy_only=False
    )
    in_index = np.zeros(len(table), dtype=bool)
    in_index[found[same]] = True
    return in_index


def _keys(table: pa.Table) -> pa.ChunkedArray:
    """Id and path of each row, joined: what identifies an image across the outputs."""
    return pc.binary_join_element_wise(table["id"], table["path"], "\x00")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _float32(value: Any) -> float | None:
    """A float32 as the shortest decimal that reads back as the same float32."""
    return None if value is None else float(str(np.float32(value)))


def _rows(table: pa.Table, rows: np.ndarray, in_index: np.ndarray) -> list[dict[str, Any]]:
    """Rows of `table` as JSON-ready dicts, in the order of `rows`, with `in_index`."""
    taken = table.take(pa.array(rows, pa.int64())).to_pylist()
    floats = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    for row, position in zip(taken, rows, strict=True):
        for name in floats:
            row[name] = _float32(row[name])
        row["in_index"] = bool(in_index[position])
    return taken


def _flags(table: pa.Table, column: str) -> np.ndarray:
    """A boolean column as a numpy array, null read as false."""
    return pc.fill_null(table[column], False).to_numpy(zero_copy_only=False).astype(bool)


def _sorted(scores: pa.ChunkedArray, rows: np.ndarray, descending: bool = False) -> np.ndarray:
    """`rows` by their score, lowest (or highest) first; ties in file order, missing last."""
    values = pc.fill_null(scores, np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    values = -values[rows] if descending else values[rows]
    values = np.where(np.isnan(values), np.inf, values)
    return rows[np.argsort(values, kind="stable")]


class PointMap:
    """The rows of `map.parquet`, and the answer of `GET /map` serialised once.

    The answer is columnar: `ids`, `x`, `y` (float32, as the shortest decimals that read back
    the same), `labels` (an index into `label_names`, -1 for none; names most frequent first),
    `issues` (bits of `issue_names` per point, when an audit or duplicates are loaded, else
    null) and `not_in_index` (positions of points the index lacks).
    """

    def __init__(
        self,
        table: pa.Table,
        manifest: dict[str, Any],
        in_index: np.ndarray,
        issues: np.ndarray | None,
    ):
        self.table = table
        self.manifest = manifest
        x = table["x"].to_numpy().astype(np.float32)
        y = table["y"].to_numpy().astype(np.float32)
        encoded = pc.dictionary_encode(table["label"].combine_chunks())
        names = encoded.dictionary.to_pylist()
        codes = pc.fill_null(encoded.indices, -1).to_numpy().astype(np.int64)
        counts = np.bincount(codes[codes >= 0], minlength=len(names))
        # Most frequent first, so the page's most distinct colours go to the largest classes.
        order = sorted(range(len(names)), key=lambda i: (-counts[i], names[i]))
        rank = np.empty(len(names) + 1, dtype=np.int64)
        rank[order] = np.arange(len(names))
        rank[-1] = -1  # code -1 (no label) indexes the last slot
        labels = rank[codes]
        self.label_names = [names[i] for i in order]
        self.not_in_index = np.flatnonzero(~in_index)
        self.issue_counts = (
            None
            if issues is None
            else {name: int(((issues >> bit) & 1).sum()) for bit, name in enumerate(ISSUE_NAMES)}
        )
        parts = [
            f'{{"rows":{len(table)},"method":{json.dumps(manifest.get("method"))}',
            f',"ids":{_json(table["id"].to_pylist())}',
            f',"x":[{",".join(x.astype(str).tolist())}]',
            f',"y":[{",".join(y.astype(str).tolist())}]',
            f',"labels":{_json(labels.tolist())}',
            f',"label_names":{_json(self.label_names)}',
            f',"issues":{_json(None if issues is None else issues.tolist())}',
            f',"issue_names":{_json(ISSUE_NAMES)}',
            f',"not_in_index":{_json(self.not_in_index.tolist())}}}',
        ]
        self.body = "".join(parts).encode()
        # Level 1: a third of the size for a fraction of level 6's time, paid once at start-up.
        self.gzipped = gzip.compress(self.body, compresslevel=1, mtime=0)
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'

    def describe(self) -> dict[str, Any]:
        return {
            "rows": len(self.table),
            "method": self.manifest.get("method"),
            "labels": len(self.label_names),
            "not_in_index": len(self.not_in_index),
            "issues": self.issue_counts,
        }


class DuplicateGroups:
    """The groups of `duplicates.parquet`, largest first (ties in group order); in each group
    the representative first, then the others in file order."""

    def __init__(
        self, table: pa.Table, manifest: dict[str, Any], in_index: np.ndarray, where: str = ""
    ):
        self.table = table
        self.manifest = manifest
        self.in_index = in_index
        groups = table["group"].to_numpy()
        representative = _flags(table, "representative")
        rows = np.arange(len(table))
        # Grouped, representative first, then file order.
        self.order = np.lexsort((rows, ~representative, groups))
        sorted_groups = groups[self.order]
        starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
        starts = starts[: len(table)]  # none when there are no rows
        sizes = np.diff(np.r_[starts, len(table)])
        numbers = sorted_groups[starts]
        leaders = (
            np.add.reduceat(representative[self.order].astype(np.int64), starts)
            if len(starts)
            else sizes
        )
        wrong = np.flatnonzero((leaders != 1) | (sizes < 2))
        if len(wrong):
            g = wrong[0]
            raise ArtifactError(
                f"{where or DUPLICATES.file}: group {numbers[g]} has {sizes[g]} image(s) and "
                f"{leaders[g]} representative(s), not 2 or more and exactly 1; make it again"
            )
        kinds = set(pc.unique(table["kind"]).to_pylist())
        if not kinds <= {"exact", "near"}:
            raise ArtifactError(
                f"{where or DUPLICATES.file}: unknown kind(s) {sorted(kinds - {'exact', 'near'})}, "
                "not 'exact' or 'near'; make it again"
            )
        by_size = np.lexsort((numbers, -sizes))
        self.starts, self.sizes, self.numbers = starts[by_size], sizes[by_size], numbers[by_size]
        others = ~representative
        kind = table["kind"].to_numpy(zero_copy_only=False)
        self.totals = {
            "groups": len(self.sizes),
            "images": len(table),
            "exact": int((others & (kind == "exact")).sum()),
            "near": int((others & (kind == "near")).sum()),
            "not_in_index": int((~in_index).sum()),
        }

    def page(self, offset: int, limit: int, members: int) -> dict[str, Any]:
        """Groups `offset`..`offset + limit` (largest first), at most `members` of each."""
        results = []
        for g in range(offset, min(offset + limit, len(self.sizes))):
            start, size = self.starts[g], self.sizes[g]
            rows = self.order[start : start + min(size, members)]
            found = _rows(self.table, rows, self.in_index)
            for member in found:
                del member["group"]
            results.append({"group": int(self.numbers[g]), "size": int(size), "members": found})
        return self.totals | {
            "threshold": self.manifest.get("threshold"),
            "order": "size",
            "offset": offset,
            "results": results,
        }

    def describe(self) -> dict[str, Any]:
        return self.totals | {"threshold": self.manifest.get("threshold")}


class AuditFindings:
    """The rows of `audit.parquet` that each kind of finding flags: label issues by label
    quality and outliers by outlier score, lowest (most suspicious) first; leaks by their
    similarity to the training image, highest first (in file order when the audit has no
    `leak_similarity`). Ties keep file order, missing scores come last."""

    FLAGS = {"label": "label_issue", "outlier": "outlier", "leak": "leak"}

    def __init__(self, table: pa.Table, manifest: dict[str, Any], in_index: np.ndarray):
        self.table = table
        self.manifest = manifest
        self.in_index = in_index
        self.scores: dict[str, str | None] = {
            "label": "label_score",
            "outlier": "outlier_score",
            "leak": "leak_similarity" if "leak_similarity" in table.column_names else None,
        }
        self.rows: dict[str, np.ndarray] = {}
        for kind, flag in self.FLAGS.items():
            flagged = np.flatnonzero(_flags(table, flag))
            score = self.scores[kind]
            self.rows[kind] = (
                flagged if score is None else _sorted(table[score], flagged, kind == "leak")
            )
        self.counts = {kind: len(rows) for kind, rows in self.rows.items()}
        self.counts["near_duplicate"] = int(_flags(table, "near_duplicate").sum())

    def page(self, kind: str, offset: int, limit: int) -> dict[str, Any]:
        """Findings of `kind` ("label", "outlier", "leak") `offset`..`offset + limit`."""
        rows = self.rows[kind][offset : offset + limit]
        found = _rows(self.table, rows, self.in_index)
        score = self.scores[kind]
        for row in found:
            row["score"] = None if score is None else row[score]
        order = "file" if score is None else f"{score} {'de' if kind == 'leak' else 'a'}scending"
        return {
            "kind": kind,
            "order": order,
            "total": int(self.counts[kind]),
            "counts": self.counts,
            "rows": len(self.table),
            "offset": offset,
            "results": found,
        }

    def issue_bits(self, table: pa.Table) -> np.ndarray:
        """Bits of `ISSUE_NAMES` for each row of `table` (id, path): its own findings, and the
        leak bit also for a training image that a test image repeats (`leak_id`)."""
        where = pc.fill_null(pc.index_in(_keys(table), value_set=_keys(self.table)), -1)
        bits = np.zeros(len(self.table) + 1, dtype=np.uint8)
        for bit, flag in enumerate(("label_issue", "outlier", "leak", "near_duplicate")):
            bits[:-1] |= _flags(self.table, flag).astype(np.uint8) << bit
        found = bits[where.to_numpy()]  # -1 reads the last slot, 0
        repeated = self.table["leak_id"].take(pa.array(self.rows["leak"], pa.int64()))
        leaked = pc.is_in(table["id"], value_set=repeated).to_numpy(zero_copy_only=False)
        return found | (leaked.astype(np.uint8) << 2)

    def describe(self) -> dict[str, Any]:
        return {
            "rows": len(self.table),
            "counts": self.counts,
            "not_in_index": int((~self.in_index).sum()),
        }


@dataclass
class Curation:
    """The curation data one server shows; each part is None when its folder was not given."""

    map: PointMap | None = None
    duplicates: DuplicateGroups | None = None
    audit: AuditFindings | None = None

    @classmethod
    def load(
        cls,
        index: SimilarityIndex,
        index_dir: str,
        map_dir: str | None = None,
        duplicates_dir: str | None = None,
        audit_dir: str | None = None,
    ) -> Curation:
        """Read and check the folders given (any of them, or none).

        Raises:
            ArtifactError: a folder is missing, of another kind, of a newer schema, or its
                Parquet file is damaged or breaks the contract (see `read_output`).
            ProvenanceMismatch: a folder was made from other features than the index.
        """
        if map_dir is None and duplicates_dir is None and audit_dir is None:
            return cls()
        id_map = index.id_map
        duplicates = audit = None
        if duplicates_dir is not None:
            table, manifest = read_output(duplicates_dir, DUPLICATES, index, index_dir)
            duplicates = DuplicateGroups(
                table,
                manifest,
                _in_index(id_map, table),
                str(Path(duplicates_dir) / DUPLICATES.file),
            )
        if audit_dir is not None:
            table, manifest = read_output(audit_dir, AUDIT, index, index_dir)
            audit = AuditFindings(table, manifest, _in_index(id_map, table))
        point_map = None
        if map_dir is not None:
            table, manifest = read_output(map_dir, MAP, index, index_dir)
            point_map = PointMap(
                table, manifest, _in_index(id_map, table), _issues(table, duplicates, audit)
            )
        return cls(point_map, duplicates, audit)

    def views(self) -> dict[str, bool]:
        """Which of the page's curation views have data."""
        return {
            "map": self.map is not None,
            "duplicates": self.duplicates is not None,
            "issues": self.audit is not None,
        }

    def notes(self) -> list[str]:
        """What a user should know at start-up: images of a view the index lacks."""
        return [
            f"{found['not_in_index']:,} images of the {view} view are not in the index: they "
            "show without thumbnails and cannot be searched from"
            for view, found in self.describe().items()
            if found and found.get("not_in_index")
        ]

    def describe(self) -> dict[str, Any]:
        """What /info reports of each loaded part (None for the others)."""
        return {
            "map": None if self.map is None else self.map.describe(),
            "duplicates": None if self.duplicates is None else self.duplicates.describe(),
            "issues": None if self.audit is None else self.audit.describe(),
        }


def _issues(
    table: pa.Table, duplicates: DuplicateGroups | None, audit: AuditFindings | None
) -> np.ndarray | None:
    """Issue bits of each map point from the audit and the duplicate groups, None without."""
    if duplicates is None and audit is None:
        return None
    bits = np.zeros(len(table), dtype=np.uint8)
    if audit is not None:
        bits |= audit.issue_bits(table)
    if duplicates is not None:
        member = pc.is_in(_keys(table), value_set=_keys(duplicates.table))
        bits |= member.to_numpy(zero_copy_only=False).astype(np.uint8) << 3
    return bits
