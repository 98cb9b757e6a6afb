"""`fc7 serve --map/--duplicates/--audit`: the curation views' endpoints.

End to end on folders written by the real `fc7 map --method pca`, `fc7 duplicates` and
`fc7 audit` over a small collection holding an exact byte copy, a re-encoded copy, and a test
split that repeats a training image. Hand-written folders (in the commands' contract) cover
what those commands do not produce on a few generated images: label issues, tied and missing
scores, ids the index lacks, groups larger than a page, and every refusal at start-up.

Oracles: the Parquet files themselves, read with pyarrow.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, write_labelled_folder
from fastapi.testclient import TestClient
from PIL import Image
from test_serve import extract, local

from jobs import run
from jobs.audit import main as audit
from jobs.build_index import main as build_index
from jobs.duplicates import main as duplicates
from jobs.map import main as make_map
from jobs.serve import main as serve
from pipeline.errors import ArtifactError, ProvenanceMismatch
from pipeline.provenance import PARQUET_METADATA_KEY, Provenance
from pipeline.serve import create_app
from pipeline.serve.curation import ISSUE_NAMES

THRESHOLD = "0.999"  # generated images are all alike to random weights: only copies pass this
FILES = {"fc7-map": "map.parquet", "fc7-duplicates": "duplicates.parquet",
         "fc7-audit": "audit.parquet"}
AUDIT_TYPES = {
    "id": pa.string(), "path": pa.string(), "label": pa.string(), "split": pa.string(),
    "suggested_label": pa.string(), "label_score": pa.float32(), "label_issue": pa.bool_(),
    "outlier_score": pa.float32(), "outlier": pa.bool_(), "near_duplicate": pa.bool_(),
    "leak": pa.bool_(), "leak_id": pa.string(),
}


# --- Folders in the curation commands' contract, written by hand ---------------------------------


def write_output(
    folder: Path, kind: str, table: pa.Table, provenance: Provenance | None = None, **fields
) -> Path:
    """A curation folder of `kind` ("fc7-map", ...): its Parquet file and manifest.json."""
    folder.mkdir(parents=True)
    pq.write_table(table, folder / FILES[kind], write_page_checksum=True)
    manifest = {"kind": kind, "schema_version": 1, **fields}
    if provenance is not None:
        manifest["provenance"] = json.loads(provenance.to_json())
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def map_table(rows: list[tuple]) -> pa.Table:
    """Rows of (id, path, label, x, y)."""
    ids, paths, labels, xs, ys = zip(*rows, strict=True)
    return pa.table({
        "id": pa.array(ids, pa.string()), "path": pa.array(paths, pa.string()),
        "label": pa.array(labels, pa.string()), "x": pa.array(xs, pa.float32()),
        "y": pa.array(ys, pa.float32()),
    })


def duplicates_table(rows: list[tuple]) -> pa.Table:
    """Rows of (group, id, path, label, similarity, representative, kind)."""
    group, ids, paths, labels, similarity, representative, kind = zip(*rows, strict=True)
    return pa.table({
        "group": pa.array(group, pa.int64()), "id": pa.array(ids, pa.string()),
        "path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.string()),
        "similarity": pa.array(similarity, pa.float32()),
        "representative": pa.array(representative, pa.bool_()),
        "kind": pa.array(kind, pa.string()),
    })


def audit_table(rows: list[dict]) -> pa.Table:
    """Rows as dicts; flags default to false, scores to 0.5, the split to train."""
    defaults = {"label_issue": False, "outlier": False, "near_duplicate": False, "leak": False,
                "label_score": 0.5, "outlier_score": 0.5, "split": "train",
                "suggested_label": None, "leak_id": None}
    full = [defaults | row for row in rows]
    return pa.table({name: pa.array([r[name] for r in full], kind)
                     for name, kind in AUDIT_TYPES.items()})


# --- A collection and the real commands' outputs ------------------------------------------------


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """18 images plus a byte copy and a re-encoded copy, a test split of a repeated training
    image and a new one; their index, and the outputs of fc7 map, duplicates and audit."""
    root = tmp_path_factory.mktemp("curation")
    images = write_labelled_folder(root / "images", classes=3, per_class=6)
    shutil.copy(images / "class_0" / "img_0.jpg", images / "class_0" / "copy_0.jpg")
    buffer = io.BytesIO()
    Image.open(images / "class_1" / "img_2.jpg").save(buffer, "JPEG", quality=40)
    (images / "class_1" / "near_2.jpg").write_bytes(buffer.getvalue())
    test = root / "test"
    (test / "class_2").mkdir(parents=True)
    shutil.copy(images / "class_2" / "img_3.jpg", test / "class_2" / "img_3.jpg")
    (test / "class_0").mkdir()
    (test / "class_0" / "new.jpg").write_bytes(jpeg_bytes(seed=777))
    embeddings = extract(images, root / "embeddings")
    test_embeddings = extract(test, root / "test-embeddings")
    index, folders = root / "index", {"map": root / "map", "duplicates": root / "dup",
                                      "audit": root / "audit"}
    assert build_index([str(embeddings), "--out", str(index)]) == 0
    assert make_map([str(embeddings), "--out", str(folders["map"]), "--method", "pca"]) == 0
    out = str(folders["duplicates"])
    assert duplicates([str(embeddings), "--out", out, "--threshold", THRESHOLD]) == 0
    assert audit([str(embeddings), "--out", str(folders["audit"]), "--test",
                  str(test_embeddings), "--threshold", THRESHOLD]) == 0
    return {"root": root, "index": index, "embeddings": embeddings, **folders}


@pytest.fixture(scope="module")
def client(curated: dict) -> TestClient:
    return local(create_app(
        str(curated["index"]), device="cpu", map_dir=str(curated["map"]),
        duplicates_dir=str(curated["duplicates"]), audit_dir=str(curated["audit"]),
    ))


def read(folder: Path, name: str) -> list[dict]:
    return pq.read_table(folder / name).to_pylist()


def f32(value: float | None) -> np.float32 | None:
    return None if value is None else np.float32(value)


def expected_issues(points: list[dict], audited: list[dict], grouped: list[dict]) -> list[int]:
    """The issue bits of each map point, from the audit's rows and the duplicate groups."""
    by_key = {(r["id"], r["path"]): r for r in audited}
    repeated = {r["leak_id"] for r in audited if r["leak"]}
    in_groups = {(r["id"], r["path"]) for r in grouped}
    bits = []
    for point in points:
        row = by_key.get((point["id"], point["path"]), {})
        flags = [row.get("label_issue"), row.get("outlier"),
                 row.get("leak") or point["id"] in repeated,
                 row.get("near_duplicate") or (point["id"], point["path"]) in in_groups]
        bits.append(sum(1 << bit for bit, flag in enumerate(flags) if flag))
    return bits


# --- The views, on the real commands' outputs ----------------------------------------------------


def test_map_answers_every_point_of_map_parquet_with_its_issues(
    client: TestClient, curated: dict
) -> None:
    response = client.get("/map")
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"  # made once at start-up
    body = response.json()
    points = read(curated["map"], "map.parquet")
    assert body["ids"] == [p["id"] for p in points] and body["rows"] == len(points) == 20
    assert body["method"] == "pca"
    # Coordinates are the stored float32 values exactly.
    assert [np.float32(v) for v in body["x"]] == [np.float32(p["x"]) for p in points]
    assert [np.float32(v) for v in body["y"]] == [np.float32(p["y"]) for p in points]
    names = body["label_names"]
    assert [names[i] if i >= 0 else None for i in body["labels"]] == [p["label"] for p in points]
    counts = {name: sum(p["label"] == name for p in points) for name in names}
    assert names == sorted(counts, key=lambda name: (-counts[name], name))  # largest first
    assert body["issue_names"] == list(ISSUE_NAMES)
    issues = expected_issues(points, read(curated["audit"], "audit.parquet"),
                             read(curated["duplicates"], "duplicates.parquet"))
    assert body["issues"] == issues
    # The scenario is not empty: four images in duplicate groups, one training image leaked.
    assert sum(bool(b & 8) for b in issues) == 4
    assert body["issues"][body["ids"].index("class_2/img_3.jpg")] & 4
    assert body["not_in_index"] == []

    plain = client.get("/map", headers={"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.json() == body
    again = client.get("/map", headers={"if-none-match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_duplicate_groups_come_largest_first_representative_first(
    client: TestClient, curated: dict
) -> None:
    rows = read(curated["duplicates"], "duplicates.parquet")
    body = client.get("/duplicates", params={"limit": 200, "members": 1000}).json()
    sizes = {g: sum(r["group"] == g for r in rows) for g in {r["group"] for r in rows}}
    order = sorted(sizes, key=lambda g: (-sizes[g], g))
    assert [g["group"] for g in body["results"]] == order
    for group in body["results"]:
        members = [r for r in rows if r["group"] == group["group"]]
        members.sort(key=lambda r: not r["representative"])  # stable: then file order
        assert group["size"] == len(members)
        assert [m["id"] for m in group["members"]] == [m["id"] for m in members]
        for shown, stored in zip(group["members"], members, strict=True):
            assert shown["similarity"] == stored["similarity"] or (
                f32(shown["similarity"]) == f32(stored["similarity"]))
            for key in ("path", "label", "representative", "kind"):
                assert shown[key] == stored[key]
            assert shown["in_index"] is True
    others = [r for r in rows if not r["representative"]]
    assert body["groups"] == len(sizes) == 2 and body["images"] == len(rows) == 4
    assert body["exact"] == sum(r["kind"] == "exact" for r in others) == 1
    assert body["near"] == 1 and body["threshold"] == float(THRESHOLD)
    # The byte copy is exact; the re-encoded copy is near, above the threshold.
    copies = {frozenset(m["id"] for m in g["members"]): g["members"][1]
              for g in body["results"]}
    assert copies[frozenset({"class_0/img_0.jpg", "class_0/copy_0.jpg"})]["kind"] == "exact"
    near = copies[frozenset({"class_1/img_2.jpg", "class_1/near_2.jpg"})]
    assert near["kind"] == "near" and float(THRESHOLD) <= near["similarity"] < 1

    paged = client.get("/duplicates", params={"offset": 1, "limit": 1, "members": 1}).json()
    assert [g["group"] for g in paged["results"]] == order[1:2]
    assert paged["results"][0]["size"] == 2 and len(paged["results"][0]["members"]) == 1
    assert paged["results"][0]["members"][0]["representative"] is True
    assert client.get("/duplicates", params={"offset": 5}).json()["results"] == []


def test_issues_are_the_flagged_rows_most_suspicious_first(
    client: TestClient, curated: dict
) -> None:
    rows = read(curated["audit"], "audit.parquet")
    for kind, flag, score, descending in (
        ("label", "label_issue", "label_score", False),
        ("outlier", "outlier", "outlier_score", False),
        ("leak", "leak", "leak_similarity", True),
    ):
        body = client.get("/issues", params={"kind": kind, "limit": 500}).json()
        flagged = [r for r in rows if r[flag]]
        flagged.sort(key=lambda r: -r[score] if descending else r[score])  # stable
        assert [r["id"] for r in body["results"]] == [r["id"] for r in flagged]
        assert body["total"] == len(flagged) == body["counts"][kind]
        assert body["rows"] == len(rows) == 22
        for shown, stored in zip(body["results"], flagged, strict=True):
            assert f32(shown["score"]) == f32(stored[score])
            for key in ("path", "label", "suggested_label", "split", "leak_id"):
                assert shown[key] == stored[key]
    outliers = client.get("/issues", params={"kind": "outlier"}).json()
    assert outliers["total"] >= 1 and outliers["results"][0]["in_index"] is True
    # The repeated test image leaks; it is not an item of the index (its path is the test
    # split's), the training image it repeats is.
    leaks = client.get("/issues", params={"kind": "leak"}).json()["results"]
    assert [(r["id"], r["leak_id"], r["split"], r["in_index"]) for r in leaks] == [
        ("class_2/img_3.jpg", "class_2/img_3.jpg", "test", False)]
    assert client.get("/issues", params={"kind": "bogus"}).status_code == 422
    assert client.get("/issues", params={"limit": 0}).status_code == 422
    assert client.get("/duplicates", params={"offset": 10**30}).status_code == 422


def test_info_and_health_say_which_views_are_loaded(client: TestClient, curated: dict) -> None:
    views = {"map": True, "duplicates": True, "issues": True}
    assert client.get("/health").json()["views"] == views
    info = client.get("/info").json()
    assert info["views"] == views
    assert info["curation"]["map"]["rows"] == 20 and info["curation"]["duplicates"]["groups"] == 2
    assert info["curation"]["issues"]["not_in_index"] == 2  # the test split
    plain = local(create_app(str(curated["index"]), device="cpu"))
    assert plain.get("/health").json()["views"] == dict.fromkeys(views, False)
    for path, option in (("/map", "--map"), ("/duplicates", "--duplicates"),
                         ("/issues", "--audit")):
        answer = plain.get(path)
        assert answer.status_code == 404 and option in answer.json()["detail"]
    page = plain.get("/").text
    for tab in ("map", "duplicates", "issues"):
        assert f'data-view="{tab}" hidden' in page  # shown by the script when /info says so


# --- Hand-written folders: what the commands do not produce here --------------------------------


def test_ties_missing_scores_and_ids_the_index_lacks(
    curated: dict, tmp_path: Path
) -> None:
    index_rows = read(curated["embeddings"], "part-00000.parquet")
    known = [(r["id"], r["path"], r["label"]) for r in index_rows]
    (a, pa_, la), (b, pb, lb), (c, pc_, lc), (d, pd_, ld) = known[:4]
    ghost = ("ghost.jpg", "/nowhere/ghost.jpg", None)
    renamed = (a, "/elsewhere/" + a, la)  # an indexed id, another image
    provenance = Provenance.from_json(
        pq.read_schema(curated["embeddings"] / "part-00000.parquet").metadata[
            PARQUET_METADATA_KEY], "embeddings")
    map_dir = write_output(tmp_path / "map", "fc7-map", map_table(
        [(a, pa_, la, 0.0, 0.0), (*ghost, 1.5, -2.25), (*renamed, 3.0, 1.0)]
    ), provenance, method="umap", rows=3)
    dup_dir = write_output(tmp_path / "dup", "fc7-duplicates", duplicates_table([
        (0, b, pb, lb, 1.0, True, "exact"), (0, c, pc_, lc, 0.97, False, "near"),
        (1, *ghost, None, False, "exact"), (1, d, pd_, ld, 1.0, True, "exact"),
        (2, a, pa_, la, 1.0, True, "near"), (2, c, pc_, lc, 0.96, False, "near"),
        (2, d, pd_, ld, 0.95, False, "near"), (2, b, pb, lb, 0.951, False, "near"),
    ]), threshold=0.95, groups=3)
    audit_dir = write_output(tmp_path / "audit", "fc7-audit", audit_table([
        {"id": a, "path": pa_, "label": la, "label_issue": True, "label_score": 0.2,
         "suggested_label": lb},
        {"id": b, "path": pb, "label": lb, "label_issue": True, "label_score": None},
        {"id": c, "path": pc_, "label": lc, "label_issue": True, "label_score": 0.1,
         "outlier": True, "outlier_score": 0.3},
        {"id": d, "path": pd_, "label": ld, "label_issue": True, "label_score": 0.2},
        {**dict(zip(("id", "path", "label"), ghost, strict=True)), "split": "test",
         "leak": True, "leak_id": d},
    ]))
    app = create_app(str(curated["index"]), device="cpu", map_dir=str(map_dir),
                     duplicates_dir=str(dup_dir), audit_dir=str(audit_dir))
    client = local(app)

    point_map = client.get("/map").json()
    assert point_map["not_in_index"] == [1, 2]  # the ghost, and the indexed id's other image
    assert point_map["labels"][1] == -1 and point_map["x"][1] == 1.5
    # a: a label issue in a group; the ghost leaks, in a group; the renamed image shares a's
    # id, not its findings.
    assert point_map["issues"] == [1 | 8, 4 | 8, 0]
    assert app.state.curation.notes() == [
        "2 images of the map view are not in the index: they show without thumbnails and "
        "cannot be searched from",
        "1 images of the duplicates view are not in the index: they show without thumbnails "
        "and cannot be searched from",
        "1 images of the issues view are not in the index: they show without thumbnails and "
        "cannot be searched from",
    ]

    groups = client.get("/duplicates", params={"members": 3}).json()
    assert [(g["group"], g["size"]) for g in groups["results"]] == [(2, 4), (0, 2), (1, 2)]
    assert [m["id"] for m in groups["results"][0]["members"]] == [a, c, d]  # 3 of 4 shown
    ghost_member = groups["results"][2]["members"][1]
    assert ghost_member["id"] == "ghost.jpg" and ghost_member["similarity"] is None
    assert ghost_member["in_index"] is False and groups["not_in_index"] == 1
    assert groups["results"][0]["members"][1]["similarity"] == 0.96  # float32, shortest form

    labels = client.get("/issues", params={"kind": "label"}).json()["results"]
    # Lowest quality first; a tie keeps file order; a missing score comes last.
    assert [(r["id"], r["score"]) for r in labels] == [(c, 0.1), (a, 0.2), (d, 0.2), (b, None)]
    assert labels[1]["suggested_label"] == lb
    leak = client.get("/issues", params={"kind": "leak"}).json()
    assert leak["order"] == "file" and leak["results"][0]["leak_id"] == d
    assert leak["results"][0]["score"] is None


def test_empty_outputs_show_empty_views(curated: dict, tmp_path: Path) -> None:
    dup_dir = write_output(tmp_path / "dup", "fc7-duplicates", duplicates_table(
        [(0, "a", "/a", None, 1.0, True, "exact")])[:0], groups=0)
    audit_dir = write_output(tmp_path / "audit", "fc7-audit", audit_table(
        [{"id": "a", "path": "/a", "label": None}])[:0])
    map_dir = write_output(tmp_path / "map", "fc7-map", map_table(
        [("a", "/a", None, 0.0, 0.0)])[:0], method="pca", rows=0)
    client = local(create_app(str(curated["index"]), device="cpu", map_dir=str(map_dir),
                              duplicates_dir=str(dup_dir), audit_dir=str(audit_dir)))
    assert client.get("/map").json()["ids"] == []
    assert client.get("/map").json()["issues"] == []
    assert client.get("/duplicates").json()["results"] == []
    assert client.get("/issues").json()["results"] == []


# --- Refusals at start-up -----------------------------------------------------------------------


def _rewrite(parquet: Path, change) -> None:
    table = pq.read_table(parquet)
    pq.write_table(change(table), parquet)


def _manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _set(table: pa.Table, name: str, values: list) -> pa.Table:
    kind = table.schema.field(name).type
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, kind))


def _other_layer(folder: Path) -> None:
    provenance = json.loads((folder / "manifest.json").read_text())["provenance"]
    _manifest(folder, provenance=provenance | {"layer": "fc6"})


def _other_weights_in_parquet(table: pa.Table) -> pa.Table:
    provenance = json.loads(table.schema.metadata[PARQUET_METADATA_KEY])
    changed = json.dumps(provenance | {"weights_sha256": "f" * 64}).encode()
    return table.replace_schema_metadata({PARQUET_METADATA_KEY: changed})


def _nan_in_row_3(table: pa.Table) -> pa.Table:
    values = table["x"].to_pylist()
    return _set(table, "x", values[:3] + [float("nan")] + values[4:])


# case: (view, damage(folder), error, message)
REFUSALS = {
    "missing folder": ("map", shutil.rmtree, ArtifactError, r"--map .*: no such folder"),
    "no manifest": (
        "map", lambda d: (d / "manifest.json").unlink(), ArtifactError,
        r"not an fc7-map folder \(no manifest.json\); make it with `fc7 map EMBEDDINGS --out",
    ),
    "another kind": (
        "map", lambda d: _manifest(d, kind="fc7-duplicates"), ArtifactError,
        r"kind 'fc7-duplicates', not 'fc7-map'; pass it to --duplicates",
    ),
    "newer schema": (
        "audit", lambda d: _manifest(d, schema_version=2), ArtifactError,
        r"newer fc7 \(schema 2, this one reads 1\)",
    ),
    "no parquet": (
        "duplicates", lambda d: (d / "duplicates.parquet").unlink(), ArtifactError,
        r"duplicates.parquet: missing; make it with `fc7 duplicates",
    ),
    "damaged parquet": (
        "map", lambda d: (d / "map.parquet").write_bytes(b"PAR1 nonsense"), ArtifactError,
        r"map.parquet: damaged or not a readable Parquet file",
    ),
    "missing column": (
        "map", lambda d: _rewrite(d / "map.parquet", lambda t: t.drop(["y"])), ArtifactError,
        r"map.parquet: no column 'y'",
    ),
    "wrong type": (
        "map",
        lambda d: _rewrite(d / "map.parquet", lambda t: t.set_column(
            3, "x", pa.array([str(v) for v in t["x"].to_pylist()]))),
        ArtifactError, r"column 'x' is string, not float",
    ),
    "empty id": (
        "audit",
        lambda d: _rewrite(d / "audit.parquet", lambda t: _set(
            t, "id", [None] + t["id"].to_pylist()[1:])),
        ArtifactError, r"column 'id' is None in row 0",
    ),
    "not finite": (
        "map", lambda d: _rewrite(d / "map.parquet", _nan_in_row_3), ArtifactError,
        r"column 'x' is nan in row 3",
    ),
    "two representatives": (
        "duplicates",
        lambda d: _rewrite(d / "duplicates.parquet", lambda t: _set(
            t, "representative", [True] * len(t))),
        ArtifactError, r"group 0 has 2 image\(s\) and 2 representative\(s\)",
    ),
    "other features": (
        "map", _other_layer, ProvenanceMismatch,
        r"map .* \(manifest.json\) was made with different features than index .*: "
        r"layer: fc7 vs fc6; make it again from the embeddings the index was built from",
    ),
    "other features in parquet": (
        "audit", lambda d: _rewrite(d / "audit.parquet", _other_weights_in_parquet),
        ProvenanceMismatch,
        r"\(audit.parquet\) was made with different features .*weights_sha256: random:0 "
        r"\(bf49beddff21\) vs random:0 \(ffffffffffff\)",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unusable_curation_folders_are_refused_at_start_up(
    curated: dict, tmp_path: Path, case: str
) -> None:
    view, damage, error, message = REFUSALS[case]
    folder = tmp_path / view
    shutil.copytree(curated[view], folder)
    damage(folder)
    option = {"map": "map_dir", "duplicates": "duplicates_dir", "audit": "audit_dir"}[view]
    with pytest.raises(error, match=message):
        create_app(str(curated["index"]), device="cpu", **{option: str(folder)})


@pytest.mark.parametrize(
    ("option", "given", "belongs"),
    [("--map", "duplicates", "--duplicates"), ("--duplicates", "audit", "--audit"),
     ("--audit", "map", "--map")],
)
def test_fc7_serve_refuses_a_foreign_folder_before_serving(
    curated: dict, capsys: pytest.CaptureFixture, option: str, given: str, belongs: str
) -> None:
    argv = [str(curated["index"]), "--device", "cpu", option, str(curated[given])]
    with pytest.raises(ArtifactError, match=f"{option} .*pass it to {belongs}"):
        serve(argv)
    assert run("serve", serve, argv) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"fc7 serve: error: {option} ") and f"fc7-{given}" in error
