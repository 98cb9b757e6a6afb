"""fc7 duplicates, fc7 audit and fc7 map through their command lines, against exact oracles:
brute-force pairwise cosine for the groups, numpy nearest neighbours for leaks, scikit-learn
for the k-NN graph and the PCA map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import clustered_vectors, write_embeddings
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from jobs.audit import main as audit_main
from jobs.build_index import main as index_main
from jobs.cli import main as fc7
from jobs.duplicates import main as duplicates_main
from jobs.map import main as map_main
from pipeline.curate import read_results
from pipeline.errors import ProvenanceMismatch
from pipeline.index.faiss_env import normalize
from pipeline.neighbours import NEAR_DUPLICATE_COSINE, cosine_knn, knn_graph
from pipeline.provenance import PARQUET_METADATA_KEY


def oracle_groups(vectors: np.ndarray, sha256: list[str | None], threshold: float,
                  failed: frozenset = frozenset({230, 231})) -> set:
    """Groups of 2+ rows by brute force: all pairs, cosine >= threshold (rows not `failed`)
    or same sha256, joined transitively (plain union-find)."""
    unit = normalize(vectors)
    similar = (unit @ unit.T) >= np.float32(threshold)
    rows = len(sha256)
    parent = list(range(rows))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(rows):
        for j in range(i + 1, rows):
            same_bytes = sha256[i] is not None and sha256[i] == sha256[j]
            has_vectors = i not in failed and j not in failed
            if same_bytes or (has_vectors and similar[i, j]):
                parent[root(i)] = root(j)
    groups: dict[int, set] = {}
    for i in range(rows):
        groups.setdefault(root(i), set()).add(i)
    return {frozenset(group) for group in groups.values() if len(group) > 1}


def found_groups(out: Path) -> set:
    table = pq.read_table(out / "duplicates.parquet").to_pandas()
    rows = table["id"].str.slice(4, 10).astype(int)
    return {frozenset(group) for group in rows.groupby(table["group"]).apply(set)}


@pytest.fixture(scope="module")
def near_copies(tmp_path_factory) -> tuple[Path, np.ndarray, list[str | None]]:
    """240 clustered vectors with chains of near copies, byte copies, and two byte-identical
    rows whose decode failed (no embedding)."""
    vectors, _ = clustered_vectors(240, 32, clusters=8, spread=0.4, seed=3)
    rng = np.random.default_rng(4)
    for source in range(0, 60, 6):  # near copies, and copies of copies (chains)
        vectors[source + 100] = vectors[source] + np.abs(rng.normal(0, 0.02, 32))
        vectors[source + 101] = vectors[source + 100] + np.abs(rng.normal(0, 0.02, 32))
    sha256 = [f"{i:064x}" for i in range(240)]
    sha256[201], sha256[202] = sha256[7], sha256[7]  # byte copies of row 7
    vectors[201] = vectors[202] = vectors[7]
    sha256[203], vectors[203] = sha256[100], vectors[100]  # a byte copy of a near copy
    sha256[230] = sha256[231]  # two identical files that failed to decode
    errors = [None] * 240
    errors[230] = errors[231] = "decode: not an image"
    folder = write_embeddings(
        tmp_path_factory.mktemp("dups") / "emb", vectors, shards=3, errors=errors,
        sha256s=sha256, sizes=[(100 + i, 100) for i in range(240)],
    )
    return folder, vectors, sha256


@pytest.mark.parametrize("threshold", [0.999, 0.99, 0.95])
def test_duplicate_groups_match_brute_force(near_copies, tmp_path: Path, capsys, threshold):
    folder, vectors, sha256 = near_copies
    expected = oracle_groups(vectors, sha256, threshold)
    assert any(len(group) > 2 for group in expected)  # rows with all -k 2 neighbours above it
    out = tmp_path / "dups"
    # -k 2: rows with more close neighbours than that must be searched again to be complete.
    assert duplicates_main([str(folder), "--out", str(out), "--threshold", str(threshold),
                            "-k", "2"]) == 0
    assert found_groups(out) == expected
    assert "groups of duplicates" in capsys.readouterr().out


def test_duplicates_through_an_index_match_in_memory(near_copies, tmp_path: Path) -> None:
    folder, vectors, sha256 = near_copies
    index = tmp_path / "index"
    assert index_main([str(folder), "--out", str(index), "--kind", "flat"]) == 0
    out = tmp_path / "dups"
    assert duplicates_main([str(folder), "--out", str(out), "--index", str(index),
                            "--threshold", "0.99"]) == 0
    assert found_groups(out) == oracle_groups(vectors, sha256, 0.99)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["searched_with"].startswith("index")


def test_duplicate_rows_kinds_similarity_and_keep(near_copies, tmp_path: Path) -> None:
    folder, vectors, _ = near_copies
    out = tmp_path / "dups"
    assert duplicates_main([str(folder), "--out", str(out), "--threshold", "0.999",
                            "--keep", "largest"]) == 0
    table, manifest, provenance = read_results(out, "fc7-duplicates")
    rows = table.to_pandas().set_index("id")
    # Byte copies of row 7: kind exact; the largest image (most pixels: the highest row) kept.
    copies = rows.loc[["img_000007.jpg", "img_000201.jpg", "img_000202.jpg"]]
    assert copies["group"].nunique() == 1
    assert copies["kind"].tolist() == ["exact"] * 3
    assert copies["representative"].tolist() == [False, False, True]
    assert copies["similarity"].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    # Row 0's group: near copies 100 and 101, and 203, a byte copy of 100 (kept: most pixels).
    chain = rows.loc[["img_000000.jpg", "img_000100.jpg", "img_000101.jpg", "img_000203.jpg"]]
    assert chain["group"].nunique() == 1 and chain["representative"].tolist()[-1]
    assert chain["kind"].tolist() == ["near", "exact", "near", "exact"]
    # Failed decodes with the same bytes: a group without embeddings.
    failed = rows.loc[["img_000230.jpg", "img_000231.jpg"]]
    assert failed["group"].nunique() == 1 and failed["kind"].tolist() == ["exact", "exact"]
    assert failed["similarity"].isna().all()
    # A near copy's similarity is the exact cosine to its group's kept image.
    near = rows[(rows["kind"] == "near") & ~rows["representative"]]
    assert len(near) > 0
    for item, row in near.iterrows():
        kept = rows[(rows["group"] == row["group"]) & rows["representative"]].index[0]
        a, b = normalize(vectors[[int(item[4:10]), int(kept[4:10])]])
        assert row["similarity"] == pytest.approx(float(a @ b), abs=1e-5)
    assert provenance.dim == 32 and manifest["threshold"] == 0.999
    # keep.parquet: every image but the dropped copies; fc7 index --keep indexes just those.
    keep = pq.read_table(out / "keep.parquet")
    assert keep.num_rows == 240 - manifest["dropped_rows"]
    dropped = set(rows.index[~rows["representative"]])
    assert dropped.isdisjoint(keep["id"].to_pylist())
    index = tmp_path / "index"
    assert index_main([str(folder), "--out", str(index), "--kind", "flat",
                       "--keep", str(out / "keep.parquet")]) == 0
    indexed = json.loads((index / "manifest.json").read_text())
    assert indexed["count"] == keep.num_rows - 1  # one kept row is a failed decode


def test_threshold_is_inclusive(tmp_path: Path) -> None:
    # (0.8, 0.6) . (1, 0) = 0.8 exactly in float32: at 0.8 a pair, just above it none.
    vectors = np.array([[4, 3, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    folder = write_embeddings(tmp_path / "emb", vectors)
    assert normalize(vectors)[0] @ normalize(vectors)[1] == np.float32(0.8)
    for threshold, groups in (("0.8", 1), ("0.8000001", 0)):
        out = tmp_path / f"dups-{threshold}"
        assert duplicates_main([str(folder), "--out", str(out), "--threshold", threshold]) == 0
        assert json.loads((out / "manifest.json").read_text())["groups"] == groups


def test_duplicates_refuses_a_foreign_out_folder(near_copies, tmp_path: Path, capsys) -> None:
    folder, _, _ = near_copies
    out = tmp_path / "dups"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert fc7(["duplicates", str(folder), "--out", str(out)]) == 1
    assert "not an fc7 duplicates output" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_knn_graph_matches_scikit_learn() -> None:
    vectors = normalize(clustered_vectors(300, 24, seed=5)[0])
    similarities, positions = cosine_knn(vectors, vectors, 10, own=np.arange(300))
    graph = knn_graph(similarities, positions)
    expected = NearestNeighbors(n_neighbors=10, metric="cosine").fit(vectors)
    expected = expected.kneighbors_graph(mode="distance")
    assert (graph.indices.reshape(300, 10) == expected.indices.reshape(300, 10)).mean() > 0.99
    assert np.allclose(graph.data, expected.data, atol=1e-5)
    assert (np.diff(graph.data.reshape(300, 10), axis=1) >= 0).all()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path, np.ndarray, np.ndarray, list[int]]:
    """Train: 5 well separated classes, every 20th label flipped. Test: other rows, the
    first 5 exact copies of training rows."""
    root = tmp_path_factory.mktemp("audit")
    x, y = clustered_vectors(400, 48, clusters=5, spread=0.3, seed=1)
    labels = [f"c{v}" for v in y]
    flipped = list(range(0, 400, 20))
    for i in flipped:
        labels[i] = f"c{(y[i] + 1) % 5}"
    train = write_embeddings(root / "train", x, labels, shards=2)
    x_test, y_test = clustered_vectors(60, 48, clusters=5, spread=0.3, seed=2)
    x_test[:5] = x[10:15]
    test = write_embeddings(root / "test", x_test, [f"c{v}" for v in y_test], id_prefix="t")
    return train, test, x, x_test, flipped


def test_audit_finds_flipped_labels_and_leaks(labelled, tmp_path: Path, capsys) -> None:
    train, test, x, x_test, flipped = labelled
    out = tmp_path / "audit"
    assert audit_main([str(train), "--test", str(test), "--out", str(out), "--pca", "16"]) == 0
    printed = capsys.readouterr().out
    table, manifest, _ = read_results(out, "fc7-audit")
    frame = table.to_pandas()
    rows = frame[frame["split"] == "train"]
    # precision@k at k = flipped labels, ranked by label score
    ranked = rows.sort_values("label_score")["id"].head(len(flipped))
    found = {int(item[4:10]) for item in ranked}
    assert len(found & set(flipped)) / len(flipped) >= 0.9
    assert manifest["label_issues"] == int(rows["label_issue"].sum()) > 0
    # Leaks against the oracle: nearest training row by numpy cosine.
    unit, unit_test = normalize(x), normalize(x_test)
    nearest = (unit_test @ unit.T).max(axis=1) >= np.float32(NEAR_DUPLICATE_COSINE)
    tests = frame[frame["split"] == "test"]
    assert tests["leak"].tolist() == nearest.tolist()
    assert tests["leak_id"].head(5).tolist() == [f"img_{i:06d}.jpg" for i in range(10, 15)]
    assert "5 of 60 images repeat a training image" in printed
    report = (out / "report.md").read_text()
    assert "Suspected label errors" in report and "Leaks" in report
    assert set(manifest["timings"]) >= {"pred_probs", "knn_graph", "datalab", "leaks"}


def test_audit_with_datalab_graph_finds_the_same(labelled, tmp_path: Path) -> None:
    train, _, _, _, _ = labelled
    flags = {}
    for neighbours in ("faiss", "datalab"):
        out = tmp_path / neighbours
        assert audit_main([str(train), "--out", str(out), "--pca", "16",
                           "--neighbours", neighbours]) == 0
        frame = pq.read_table(out / "audit.parquet").to_pandas()
        flags[neighbours] = frame
    faiss_run, datalab_run = flags["faiss"], flags["datalab"]
    assert faiss_run["label_issue"].tolist() == datalab_run["label_issue"].tolist()
    assert np.allclose(faiss_run["outlier_score"], datalab_run["outlier_score"], atol=1e-4)
    assert faiss_run["outlier"].tolist() == datalab_run["outlier"].tolist()


def test_map_pca_is_scikit_learns(labelled, tmp_path: Path) -> None:
    train, _, x, _, _ = labelled
    out = tmp_path / "map"
    assert map_main([str(train), "--out", str(out), "--method", "pca"]) == 0
    table, manifest, _ = read_results(out, "fc7-map")
    expected = PCA(n_components=2, random_state=0).fit_transform(normalize(x))
    assert np.allclose(table["x"].to_numpy(), expected[:, 0], atol=1e-4)
    assert np.allclose(table["y"].to_numpy(), expected[:, 1], atol=1e-4)
    assert manifest["method"] == "pca" and manifest["rows"] == 400

    # The Parquet file's provenance must be the manifest's: a file swapped in is refused.
    parquet = pq.read_table(out / "map.parquet")
    recorded = json.loads(parquet.schema.metadata[PARQUET_METADATA_KEY])
    changed = json.dumps(recorded | {"layer": "fc6"}).encode()
    pq.write_table(parquet.replace_schema_metadata({PARQUET_METADATA_KEY: changed}),
                   out / "map.parquet")
    with pytest.raises(ProvenanceMismatch, match=r"\(map.parquet\).*layer: fc7 vs fc6"):
        read_results(out, "fc7-map")


def test_map_umap_keeps_neighbourhoods_and_transforms_beyond_the_sample(
    labelled, tmp_path: Path
) -> None:
    train, _, x, _, _ = labelled
    _, y = clustered_vectors(400, 48, clusters=5, spread=0.3, seed=1)
    out = tmp_path / "map"
    # Fitted on 300 of 400: the other 100 are placed by UMAP's transform.
    assert map_main([str(train), "--out", str(out), "--sample", "300"]) == 0
    table = pq.read_table(out / "map.parquet")
    points = np.column_stack([table["x"].to_numpy(), table["y"].to_numpy()])
    assert np.isfinite(points).all() and len(points) == 400
    # Each point's 5 nearest map neighbours mostly share its true cluster.
    _, near = NearestNeighbors(n_neighbors=6).fit(points).kneighbors(points)
    assert (y[near[:, 1:]] == y[:, None]).mean() > 0.9



def test_audit_refuses_two_graphs_at_once(capsys) -> None:
    assert fc7(["audit", "emb", "--out", "o", "--index", "idx", "--neighbours", "datalab"]) == 2
    assert "choose one" in capsys.readouterr().err
