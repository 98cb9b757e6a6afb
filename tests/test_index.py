"""Index building, evaluation, --add and the index folder, against an exact numpy oracle."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from jobs.build_index import main as index_main
from pipeline.errors import ArtifactError, ConfigError, OutputError, ProvenanceMismatch
from pipeline.index import (
    BuildResult,
    IndexConfig,
    add_to_index,
    build_index,
    load_index,
    plan_index,
)
from pipeline.index.build import _gather, _sample_positions
from pipeline.index.faiss_env import (
    faiss,
    normalize,
    openblas_coretype,
    set_search_params,
)
from pipeline.index.format import INDEX_FILE, MANIFEST_FILE
from pipeline.index.idmap import IDS_FILE, IDS_METADATA_KEY
from pipeline.index.tune import ExactSearch, recall_at_k
from pipeline.provenance import file_sha256
from pipeline.search import SimilarityIndex
from pipeline.store import EmbeddingDataset
from tests.conftest import REPO, clustered_vectors, test_provenance, write_embeddings

DIM = 64


def exact_top_k(base: np.ndarray, queries: np.ndarray, metric: str, k: int):
    """Brute-force oracle: (scores, positions), best first, in the index's score convention."""
    if metric == "cosine":
        base = base / np.linalg.norm(base, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    if metric == "l2":
        values = ((queries[:, None, :] - base[None, :, :]) ** 2).sum(-1)
        order = np.argsort(values, axis=1)[:, :k]
    else:
        values = queries @ base.T
        order = np.argsort(-values, axis=1)[:, :k]
    return np.take_along_axis(values, order, axis=1), order


def build(embeddings: Path, out: Path, **options) -> BuildResult:
    config = IndexConfig(embeddings=str(embeddings), out=str(out), **options)
    data = EmbeddingDataset.open(str(embeddings))
    if config.add:
        return add_to_index(config, data)
    return build_index(config, data)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """4,000 indexed vectors in 3 shards, and 300 fresh queries from the same distribution."""
    x, _ = clustered_vectors(4300, DIM, clusters=30, spread=0.3, seed=7)
    folder = tmp_path_factory.mktemp("clustered") / "emb"
    write_embeddings(folder, x[:4000], shards=3)
    return folder, x[:4000], x[4000:]


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_flat_matches_the_exact_oracle(tmp_path: Path, metric: str) -> None:
    x, _ = clustered_vectors(1200, DIM, seed=1)
    errors = [("broken file" if i % 97 == 0 else None) for i in range(len(x))]
    write_embeddings(tmp_path / "emb", x, shards=4, errors=errors)
    result = build(tmp_path / "emb", tmp_path / "index", kind="flat", metric=metric)
    kept = np.array([e is None for e in errors])
    assert result.skipped_errors == (~kept).sum()
    assert result.manifest["count"] == kept.sum()
    assert result.manifest["recall_at_10"] == 1.0

    index = SimilarityIndex.open(tmp_path / "index", device="cpu")
    queries, _ = clustered_vectors(50, DIM, seed=1)  # same centres, the first rows
    queries = queries + np.random.default_rng(5).normal(0, 0.1, queries.shape)
    scores, positions = exact_top_k(x[kept], queries.astype(np.float32), metric, k=10)
    ids = np.array([f"img_{i:06d}.jpg" for i in np.flatnonzero(kept)])
    for row, matches in enumerate(index.search_vectors(queries, k=10)):
        assert [m.id for m in matches] == list(ids[positions[row]])
        np.testing.assert_allclose([m.score for m in matches], scores[row], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf-flat", "ivf-pq", "PCA48,IVF32,Flat"])
def test_approximate_kinds_keep_their_stored_recall_on_fresh_queries(
    clustered, tmp_path: Path, kind: str
) -> None:
    folder, base, fresh = clustered
    result = build(folder, tmp_path / "index", kind=kind, eval_queries=300)
    stored = result.manifest["recall_at_10"]
    assert result.manifest["recall_queries"] == 300
    index = SimilarityIndex.open(tmp_path / "index", device="cpu")
    _, truth = exact_top_k(base, fresh, "cosine", k=10)
    found = index.search_vectors(fresh, k=10)
    recall = np.mean(
        [
            len({int(m.id[4:10]) for m in matches} & set(row)) / 10
            for matches, row in zip(found, truth, strict=True)
        ]
    )
    assert recall >= stored - 0.02, (kind, recall, stored)
    if "PCA" not in kind:  # PCA to 48 of 64 noisy dimensions may not keep 0.95 of the top-10
        assert stored >= 0.95


def test_tuning_stops_at_the_cheapest_setting_reaching_the_target(clustered, tmp_path) -> None:
    folder, _, _ = clustered
    loose = build(folder, tmp_path / "loose", kind="ivf-flat", target_recall=0.5).manifest
    tight = build(folder, tmp_path / "tight", kind="ivf-flat", target_recall=0.99).manifest
    assert loose["search_params"]["nprobe"] < tight["search_params"]["nprobe"]
    assert loose["recall_at_10"] >= 0.5 and tight["recall_at_10"] >= 0.99
    # Every setting tried before the chosen one missed the target.
    assert all(t["recall_at_10"] < 0.99 for t in tight["tuning"][:-1])


def test_exact_search_keeps_the_exact_top_k_across_batches_and_processes() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1000, 16)).astype(np.float32)
    queries = rng.normal(size=(20, 16)).astype(np.float32)
    for metric in ("ip", "l2"):
        _, expected = exact_top_k(base, queries, metric, k=11)
        oracle = ExactSearch(queries, metric, k=11)
        for start in range(0, 1000, 128):
            oracle.add(base[start : start + 128], start)
        np.testing.assert_array_equal(oracle.positions(), expected)
        # Two halves ranked apart (as Ray tasks do), then merged: the same top-k.
        first, second = ExactSearch(queries, metric, 11), ExactSearch(queries, metric, 11)
        first.add(base[:600], 0)
        second.add(base[600:], 600)
        first.merge(*second.results())
        np.testing.assert_array_equal(first.positions(), expected)


def test_recorded_recall_of_every_setting_tried_matches_an_exact_oracle(tmp_path: Path) -> None:
    # Every row is a held-out query (--eval-queries above the row count), so the oracle needs
    # nothing of the build's sampling: numpy's exact top-10 of each row, itself left out.
    x, _ = clustered_vectors(1500, DIM, clusters=30, seed=9)
    write_embeddings(tmp_path / "emb", x, shards=2)
    manifest = build(
        tmp_path / "emb", tmp_path / "index", kind="ivf-flat", eval_queries=2000,
        target_recall=0.99,
    ).manifest
    assert manifest["recall_queries"] == 1500
    _, truth = exact_top_k(x, x, "cosine", k=11)
    index = load_index(tmp_path / "index").index
    queries, own = normalize(x), np.arange(len(x))

    def oracle_recall() -> float:
        _, found = index.search(queries, 11)
        hits = [len(set(f[f != i][:10]) & set(t[t != i][:10])) for f, t, i in
                zip(found, truth, own, strict=True)]
        return float(np.mean(hits)) / 10

    assert oracle_recall() == pytest.approx(manifest["recall_at_10"], abs=1e-4)
    for tried in manifest["tuning"]:
        set_search_params(index, {"nprobe": tried["nprobe"]})
        assert oracle_recall() == pytest.approx(tried["recall_at_10"], abs=1e-4), tried
    recalls = [tried["recall_at_10"] for tried in manifest["tuning"]]
    assert recalls[-1] >= 0.99 > max(recalls[:-1])  # the cheapest setting reaching the target


def test_search_parameters_set_through_parameter_space_change_the_results() -> None:
    x, _ = clustered_vectors(3000, DIM, clusters=30, seed=10)
    queries = x[:200] + np.random.default_rng(1).normal(0, 0.2, (200, DIM)).astype(np.float32)
    _, truth = exact_top_k(x, queries, "l2", k=10)
    no_self = np.full(len(queries), -1)
    index = faiss.index_factory(DIM, "IVF64,Flat")
    index.train(x)
    index.add(x)
    recalls = {}
    for nprobe in (1, 64):
        set_search_params(index, {"nprobe": nprobe})
        recalls[nprobe] = recall_at_k(index.search(queries, 10)[1], truth, no_self, 10)
    assert recalls[64] == 1.0 > 0.9 > recalls[1]  # all 64 lists: exhaustive, so exact

    refined = faiss.index_factory(DIM, "PCA16,HNSW32,Refine(Flat)")
    refined.train(x)
    refined.add(x)
    set_search_params(refined, {"efSearch": 16, "k_factor": 1})
    cheap = recall_at_k(refined.search(queries, 10)[1], truth, no_self, 10)
    set_search_params(refined, {"efSearch": 256, "k_factor": 32})
    costly = recall_at_k(refined.search(queries, 10)[1], truth, no_self, 10)
    assert costly > cheap
    assert faiss.downcast_index(refined).k_factor == 32
    with pytest.raises(ArtifactError, match="nprobe: this index has no part that uses it"):
        set_search_params(refined, {"nprobe": 4})


def test_samples_are_random_rows_across_all_shards(tmp_path: Path) -> None:
    x, _ = clustered_vectors(1000, 8, seed=2)
    write_embeddings(tmp_path / "emb", x, shards=5)
    data = EmbeddingDataset.open(str(tmp_path / "emb"))
    queries, train = _sample_positions(1000, 200, 300, np.random.default_rng(0))
    assert not set(queries) & set(train)  # training rows are held apart from queries
    assert len({p // 200 for p in train}) == 5  # every shard contributes
    got_queries, got_train = _gather(data, [queries, train], batch_size=64)
    np.testing.assert_array_equal(got_queries, x[queries])
    np.testing.assert_array_equal(got_train, x[train])


def test_auto_follows_size_and_memory_budget() -> None:
    gb = 10**9
    assert plan_index("auto", 5_000, 4096, "cosine").kind == "flat"
    roomy = plan_index("auto", 100_000, 4096, "cosine", budget=4 * gb)
    assert roomy.factory == "HNSW32"
    medium = plan_index("auto", 100_000, 4096, "cosine", budget=1 * gb)
    assert medium.kind == "ivf-pq" and medium.factory.endswith("Refine(SQ8)")
    tight = plan_index("auto", 1_000_000, 4096, "cosine", budget=gb // 10)
    assert tight.factory.startswith("PCAR256,IVF") and "Refine" not in tight.factory
    m = int(tight.factory.split(",PQ")[1].split("x")[0])
    assert 1_000_000 * m / 2 <= gb // 10
    with_pca = plan_index("hnsw", 1000, 512, "cosine", pca=64)
    assert with_pca.factory == "PCA64,HNSW32" and with_pca.needs_training


def test_bad_kind_pca_and_memory_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--kind IVFbogus"):
        plan_index("IVFbogus", 1000, DIM, "cosine")
    with pytest.raises(ConfigError, match="--pca 128"):
        plan_index("flat", 1000, DIM, "cosine", pca=128)
    with pytest.raises(ConfigError, match="--max-memory lots"):
        index_main([str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), "--max-memory", "lots"])
    config = IndexConfig(embeddings="e", out="o", max_memory="1.5GB", device="gpu")
    assert (config.max_memory, config.device) == (1_500_000_000, "cuda")


def test_add_appends_only_new_ids_and_matches_a_fresh_build(tmp_path: Path) -> None:
    x, _ = clustered_vectors(1500, DIM, seed=3)
    write_embeddings(tmp_path / "first", x[:1000], shards=2)
    write_embeddings(tmp_path / "all", x, shards=3)  # a superset: same ids for x[:1000]
    build(tmp_path / "first", tmp_path / "index", kind="hnsw")
    added = build(tmp_path / "all", tmp_path / "index", add=True)
    assert (added.added, added.skipped_duplicates) == (500, 1000)
    manifest = json.loads((tmp_path / "index" / MANIFEST_FILE).read_text())
    assert manifest["count"] == 1500 and len(manifest["sources"]) == 2
    index = SimilarityIndex.open(tmp_path / "index", device="cpu")
    assert len(index) == 1500
    assert index.item("img_001499.jpg").path == "/images/img_001499.jpg"
    again = build(tmp_path / "all", tmp_path / "index", add=True)
    assert again.added == 0
    # The new rows are searchable: each finds itself first.
    for matches, i in zip(index.search_vectors(x[1400:1410], k=1), range(1400, 1410), strict=True):
        assert matches[0].id == f"img_{i:06d}.jpg"


def test_add_refuses_embeddings_with_other_provenance(tmp_path: Path) -> None:
    x, _ = clustered_vectors(300, DIM, seed=4)
    write_embeddings(tmp_path / "a", x)
    other = test_provenance(dim=DIM, weights_sha256="f" * 64, weights="/models/other.pth")
    write_embeddings(tmp_path / "b", x, provenance=other, id_prefix="new")
    build(tmp_path / "a", tmp_path / "index", kind="flat")
    before = (tmp_path / "index" / INDEX_FILE).read_bytes()
    with pytest.raises(ProvenanceMismatch, match="weights_sha256"):
        build(tmp_path / "b", tmp_path / "index", add=True)
    assert (tmp_path / "index" / INDEX_FILE).read_bytes() == before


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path) -> None:
    x, _ = clustered_vectors(300, DIM, seed=4)
    write_embeddings(tmp_path / "emb", x)
    build(tmp_path / "emb", tmp_path / "index", kind="flat")
    with pytest.raises(OutputError, match="--add"):
        build(tmp_path / "emb", tmp_path / "index", kind="hnsw")
    build(tmp_path / "emb", tmp_path / "index", kind="hnsw", overwrite=True)
    assert SimilarityIndex.open(tmp_path / "index").manifest["kind"] == "hnsw"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "index"]  # no staging left


@pytest.fixture
def small_index(tmp_path: Path) -> Path:
    x, _ = clustered_vectors(300, DIM, seed=4)
    write_embeddings(tmp_path / "emb", x)
    build(tmp_path / "emb", tmp_path / "index", kind="flat")
    return tmp_path / "index"


def test_corrupt_index_file_is_named(small_index: Path) -> None:
    path = small_index / INDEX_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"index\.faiss: corrupt"):
        load_index(small_index)


def test_unreadable_index_file_is_named_even_when_the_manifest_agrees(small_index: Path) -> None:
    path = small_index / INDEX_FILE
    path.write_bytes(b"not a faiss index")
    manifest = json.loads((small_index / MANIFEST_FILE).read_text())
    manifest["files"]["index_sha256"] = file_sha256(path)
    (small_index / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a readable FAISS index"):
        load_index(small_index)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"count": 299}, "holds 300 vectors"),
        ({"dim": 32}, "dimension disagrees"),
        ({"schema_version": 99}, "written by a newer fc7 .schema 99, this one reads 2."),
        ({"schema_version": "1"}, "no valid schema version"),
        ({"schema_version": 1}, "written by an older fc7 .schema 1"),
        ({"format": "other"}, "not an fc7 index manifest"),
    ],
)
def test_index_map_and_manifest_must_agree(small_index: Path, change, message) -> None:
    manifest = json.loads((small_index / MANIFEST_FILE).read_text())
    manifest.update(change)
    (small_index / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        load_index(small_index)


def test_missing_folder_and_files(tmp_path: Path, small_index: Path) -> None:
    with pytest.raises(ArtifactError, match="no such index folder"):
        load_index(tmp_path / "nowhere")
    (small_index / IDS_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"ids\.arrow: missing"):
        load_index(small_index)


def test_cli_builds_and_reports(tmp_path: Path, capsys) -> None:
    x, _ = clustered_vectors(600, DIM, seed=6)
    write_embeddings(tmp_path / "emb", x, shards=2)
    config = tmp_path / "index.yaml"
    config.write_text(yaml.safe_dump({"kind": "ivf-flat", "target_recall": 0.9}))
    argv = [str(tmp_path / "emb"), "--out", str(tmp_path / "index"), "--config", str(config)]
    assert index_main([*argv, "--metric", "l2"]) == 0
    printed = capsys.readouterr().out
    assert "kind ivf-flat" in printed and "metric l2" in printed and "recall@10" in printed
    manifest = json.loads((tmp_path / "index" / MANIFEST_FILE).read_text())
    assert manifest["metric"] == "l2" and manifest["target_recall"] == 0.9
    assert (
        manifest["source_fingerprint"] == EmbeddingDataset.open(str(tmp_path / "emb")).fingerprint()
    )
    assert manifest["provenance"]["weights_sha256"] == "0" * 64


def test_documented_config_file_is_valid() -> None:
    values = yaml.safe_load((REPO / "configs" / "index.yaml").read_text())
    config = IndexConfig(embeddings="e", out="o", **values)
    assert config == IndexConfig(embeddings="e", out="o")


def test_faiss_is_imported_only_by_faiss_env() -> None:
    # faiss_env sets OPENBLAS_CORETYPE before faiss loads; any other import could come first.
    importing = re.compile(r"^\s*(import faiss|from faiss[ .])", re.MULTILINE)
    found = [
        path.relative_to(REPO).as_posix()
        for folder in ("pipeline", "jobs", "bench")
        for path in (REPO / folder).rglob("*.py")
        if importing.search(path.read_text())
    ]
    assert found == ["pipeline/index/faiss_env.py"]


def test_openblas_core_type_from_cpu_flags() -> None:
    assert (
        openblas_coretype("flags\t: fpu avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl")
        == "SkylakeX"
    )
    assert openblas_coretype("flags\t: fpu sse4_2 avx2 fma") == "Haswell"
    assert openblas_coretype("flags\t: fpu sse4_2") is None
    assert openblas_coretype("processor : 0") is None


def test_add_refuses_settings_it_would_ignore(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--add keeps the index's own settings; drop --kind"):
        index_main([str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), "--add",
                    "--kind", "hnsw"])


# ---------------------------------------------------------------------------------------------
# Corrupt index folders whose manifest was updated to match: named, never used


def update_sha(index_dir: Path, name: str = INDEX_FILE) -> None:
    """Give the manifest the sha256 of `name` as it is now (as a careless repair would)."""
    manifest = json.loads((index_dir / MANIFEST_FILE).read_text())
    key = "index_sha256" if name == INDEX_FILE else "ids_sha256"
    manifest["files"][key] = file_sha256(index_dir / name)
    (index_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


# The largest code vector FAISS agrees to allocate before reading it (256 GiB).
HUGE = faiss.get_deserialization_vector_byte_limit() // 4 - 1


def flat_with_size_field(data: bytes, size: int) -> bytes:
    # IndexFlat: fourcc, d, ntotal, 2 dummies, is_trained, metric (37 bytes), then the size of
    # its code vector.
    return data[:37] + size.to_bytes(8, "little") + data[45:]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[: len(data) // 2], "not a readable FAISS index"),
        (lambda data: np.random.default_rng(0).bytes(len(data)), "not a readable FAISS index"),
        (
            lambda data: data[:60] + np.random.default_rng(0).bytes(len(data) - 60),
            "corrupt: stored vectors that are not finite",
        ),
        (lambda data: flat_with_size_field(data, HUGE), "more data than this machine's memory"),
    ],
    ids=["truncated", "random-bytes", "random-vectors", "huge-size-field"],
)
def test_corrupt_index_file_with_a_matching_sha_is_named(small_index: Path, damage, message):
    if message.startswith("more data"):
        overcommit = Path("/proc/sys/vm/overcommit_memory")
        # Physical memory, not what is available now: what the kernel could hand FAISS.
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if physical >= HUGE or (
            overcommit.is_file() and overcommit.read_text().strip() == "1"
        ):
            pytest.skip("this machine could grant the allocation (and FAISS would fill it)")
    path = small_index / INDEX_FILE
    path.write_bytes(damage(path.read_bytes()))
    update_sha(small_index)
    with pytest.raises(ArtifactError, match=rf"^{path}: .*{message}"):
        load_index(small_index)


def test_scrambled_inverted_lists_and_graph_links_are_refused(tmp_path: Path) -> None:
    x, _ = clustered_vectors(800, DIM, seed=8)
    write_embeddings(tmp_path / "emb", x)
    for kind in ("ivf-flat", "hnsw"):
        folder = tmp_path / kind
        build(tmp_path / "emb", folder, kind=kind)
        index = faiss.read_index(str(folder / INDEX_FILE))
        part = faiss.downcast_index(index)
        if kind == "ivf-flat":  # an id beyond the 800 vectors: search would name no item
            code = faiss.rev_swig_ptr(part.invlists.get_single_code(0, 0), part.code_size)
            part.invlists.update_entry(0, 0, 10**6, faiss.swig_ptr(code.copy()))
        else:  # a link beyond the stored vectors: search would read outside memory
            links = part.hnsw.neighbors
            faiss.rev_swig_ptr(links.data(), links.size())[5] = 10**6
        faiss.write_index(index, str(folder / INDEX_FILE))
        update_sha(folder)
        with pytest.raises(ArtifactError, match=rf"^{folder / INDEX_FILE}: "):
            load_index(folder)


@pytest.mark.parametrize(
    "built, written, faiss_metric",
    [("cosine", "ip", "L2"), ("l2", "ip", "L2"), ("ip", "cosine", "inner product")],
)
def test_manifest_metric_must_match_the_faiss_metric(tmp_path, built, written, faiss_metric):
    x, _ = clustered_vectors(300, DIM, seed=4)
    write_embeddings(tmp_path / "emb", x)
    build(tmp_path / "emb", tmp_path / "index", kind="flat", metric=built)
    load_index(tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / MANIFEST_FILE).read_text())
    manifest["metric"] = written
    (tmp_path / "index" / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(
        ArtifactError, match=f"searches by {faiss_metric} but the manifest's metric is {written}"
    ):
        load_index(tmp_path / "index")


def rewrite_ids(index_dir: Path, metadata: dict[bytes, bytes]) -> None:
    path = index_dir / IDS_FILE
    with pa.OSFile(str(path)) as source:  # read, not mapped: the file is rewritten below
        table = pa.ipc.open_file(source).read_all()
    table = table.replace_schema_metadata(metadata)
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    update_sha(index_dir, IDS_FILE)


def test_the_id_map_version_is_checked(small_index: Path) -> None:
    with pa.memory_map(str(small_index / IDS_FILE)) as source:
        metadata = pa.ipc.open_file(source).schema.metadata
    assert json.loads(metadata[IDS_METADATA_KEY]) == {"id_map_version": 1}
    rewrite_ids(small_index, metadata)  # rewritten as it was: still loads
    assert load_index(small_index).manifest["count"] == 300
    rewrite_ids(small_index, {**metadata, IDS_METADATA_KEY: b'{"id_map_version": 2}'})
    with pytest.raises(ArtifactError, match=r"ids\.arrow \(id map\): written by a newer fc7"):
        load_index(small_index)
    rewrite_ids(small_index, {k: v for k, v in metadata.items() if k != IDS_METADATA_KEY})
    with pytest.raises(ArtifactError, match=r"ids\.arrow: not an fc7 id map"):
        load_index(small_index)


def test_a_damaged_id_map_is_named(small_index: Path) -> None:
    path = small_index / IDS_FILE
    data = bytearray(path.read_bytes())
    data[-12:-6] = b"\xff" * 6  # the footer's length
    path.write_bytes(bytes(data))
    update_sha(small_index, IDS_FILE)
    with pytest.raises(ArtifactError, match="unreadable id map"):
        load_index(small_index)
