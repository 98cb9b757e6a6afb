"""The query API and `fc7 query`, against exact numpy search over the stored vectors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from jobs.cli import main as fc7
from pipeline.decode import ImageDecodeError
from pipeline.errors import ArtifactError, ConfigError, ProvenanceMismatch
from pipeline.index import IndexConfig, build_index, load_index
from pipeline.index.faiss_env import gpu_count
from pipeline.search import Match, SimilarityIndex
from pipeline.store import EmbeddingDataset
from tests.conftest import clustered_vectors, write_embeddings, write_labelled_folder

DIM = 32


def build(embeddings: Path, out: Path, **options) -> None:
    config = IndexConfig(embeddings=str(embeddings), out=str(out), **options)
    build_index(config, EmbeddingDataset.open(str(embeddings)))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A flat cosine index over 800 labelled clustered vectors."""
    root = tmp_path_factory.mktemp("search")
    x, labels = clustered_vectors(800, DIM, seed=11)
    write_embeddings(root / "emb", x, labels=[f"class_{c}" for c in labels], shards=2)
    build(root / "emb", root / "index", kind="flat")
    return root / "index", x


def cosine_top(x: np.ndarray, query: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores = unit @ (query / np.linalg.norm(query))
    order = np.argsort(-scores)[:k]
    return [f"img_{i:06d}.jpg" for i in order], scores[order]


def test_search_ids_leaves_the_item_out_unless_asked(indexed) -> None:
    folder, x = indexed
    index = SimilarityIndex.open(folder, device="cpu")
    expected_ids, expected_scores = cosine_top(x, x[42], k=6)
    with_self = index.search_ids(["img_000042.jpg"], k=6, include_self=True)[0]
    assert [m.id for m in with_self] == expected_ids
    np.testing.assert_array_almost_equal([m.score for m in with_self], expected_scores, 5)
    without = index.search_ids(["img_000042.jpg"], k=5)[0]
    assert [m.id for m in without] == expected_ids[1:]


def test_item_and_unknown_ids(indexed) -> None:
    index = SimilarityIndex.open(indexed[0], device="cpu")
    item = index.item("img_000003.jpg")
    assert isinstance(item, Match) and item.path == "/images/img_000003.jpg"
    assert item.label.startswith("class_") and item.score == 0.0
    assert len(index) == 800
    with pytest.raises(KeyError, match="nope.jpg"):
        index.search_ids(["img_000001.jpg", "nope.jpg"])
    with pytest.raises(KeyError):
        index.item("nope.jpg")


def test_vectors_of_the_wrong_dimension_are_refused(indexed) -> None:
    index = SimilarityIndex.open(indexed[0], device="cpu")
    with pytest.raises(ProvenanceMismatch, match="32-d"):
        index.search_vectors(np.ones((2, 16), dtype=np.float32))


def test_batches_and_threads_give_the_same_results(indexed) -> None:
    folder, x = indexed
    index = SimilarityIndex.open(folder, device="cpu")
    queries = x[:40] + 0.05
    serial = [index.search_vectors(q, k=7)[0] for q in queries]
    assert index.search_vectors(queries, k=7) == serial
    results: dict[int, list[Match]] = {}

    def work(start: int) -> None:
        for i in range(start, 40, 4):
            results[i] = index.search_vectors(queries[i], k=7)[0]

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(40)] == serial


@pytest.mark.parametrize(
    "options", [{"kind": "flat", "pca": 8, "whiten": True}, {"kind": "IVF16,PQ8x4fs"}]
)
def test_search_ids_uses_the_stored_vector_whatever_the_index(tmp_path, options) -> None:
    # Behind a whitened PCA FAISS cannot invert the transform; fast-scan PQ cannot give
    # vectors back: an id query must still search with exactly what a vector query would.
    x, _ = clustered_vectors(700, DIM, seed=12)
    write_embeddings(tmp_path / "emb", x)
    build(tmp_path / "emb", tmp_path / "index", **options)
    index = SimilarityIndex.open(tmp_path / "index", device="cpu")
    by_id = index.search_ids(["img_000010.jpg"], k=5, include_self=True)[0]
    by_vector = index.search_vectors(x[10], k=5)[0]
    assert [m.id for m in by_id] == [m.id for m in by_vector]
    np.testing.assert_allclose([m.score for m in by_id], [m.score for m in by_vector], atol=1e-5)


def test_query_cli_json_and_table(indexed, capsys) -> None:
    folder, x = indexed
    assert (
        fc7(["query", str(folder), "--id", "img_000007.jpg", "img_000008.jpg", "-k", "3", "--json"])
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert [entry["query"] for entry in printed] == ["img_000007.jpg", "img_000008.jpg"]
    expected_ids, expected_scores = cosine_top(x, x[7], k=4)
    assert [r["id"] for r in printed[0]["results"]] == expected_ids[1:]
    assert set(printed[0]["results"][0]) == {"id", "path", "label", "score"}
    assert printed[0]["results"][0]["score"] == pytest.approx(expected_scores[1], abs=1e-5)
    assert fc7(["query", str(folder), "--id", "img_000007.jpg", "-k", "2"]) == 0
    table = capsys.readouterr().out
    assert "cosine similarity" in table and expected_ids[1] in table


def test_query_cli_errors_are_one_line(indexed, tmp_path, capsys) -> None:
    folder, _ = indexed
    assert fc7(["query", str(folder), "--id", "missing.jpg"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--id missing.jpg: not in the index" in error and "\n" not in error
    assert fc7(["query", str(tmp_path / "no-index"), "--id", "x"]) == 1
    assert "no such index folder" in capsys.readouterr().err
    assert fc7(["query", str(folder)]) == 2
    assert "--image PATH... or --id ID..." in capsys.readouterr().err


@pytest.mark.slow  # fc7 extract starts Ray
def test_image_query_end_to_end(tmp_path: Path, capsys) -> None:
    """Extract generated JPEGs, index them, query by one of the files: it comes first."""
    from jobs.extract import main as extract

    images = write_labelled_folder(tmp_path / "images", classes=4, per_class=8)
    (images / "class_0" / "not-an-image.jpg").write_bytes(b"this is text")
    embeddings = tmp_path / "emb"
    assert (
        extract(
            [
                str(images),
                "--out",
                str(embeddings),
                "--weights",
                "random:0",
                "--device",
                "cpu",
                "--num-workers",
                "1",
            ]
        )
        == 0
    )
    assert fc7(["index", str(embeddings), "--out", str(tmp_path / "index")]) == 0
    assert "1 skipped with errors" in capsys.readouterr().out

    index = SimilarityIndex.open(tmp_path / "index", device="cpu")
    assert len(index) == 32
    query = images / "class_2" / "img_5.jpg"
    top = index.search_images([query.read_bytes()], k=3)[0]
    assert top[0].path.endswith("class_2/img_5.jpg")
    assert top[0].score == pytest.approx(1.0, abs=1e-4)
    assert top[0].label == "class_2"

    with pytest.raises(ImageDecodeError, match="image 2"):
        index.search_images([query.read_bytes(), b"garbage"])
    assert fc7(["query", str(tmp_path / "index"), "--image", str(query), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["results"][0]["path"] == top[0].path
    bad = images / "class_0" / "not-an-image.jpg"
    assert fc7(["query", str(tmp_path / "index"), "--image", str(bad)]) == 1
    error = capsys.readouterr().err.strip()
    assert f"--image {bad}" in error and "\n" not in error


def test_reread_vectors_are_checked_like_every_read(tmp_path: Path, capsys) -> None:
    # Fast-scan PQ gives no vectors back, so an id query re-reads the source embeddings; a
    # damaged source keeps its size and row count (so its fingerprint) but fails its checksum.
    x, _ = clustered_vectors(700, DIM, seed=12)
    write_embeddings(tmp_path / "emb", x, shards=2)
    build(tmp_path / "emb", tmp_path / "index", kind="IVF16,PQ8x4fs")
    part = tmp_path / "emb" / "part-00001.parquet"
    data = bytearray(part.read_bytes())
    for position in range(len(data) // 2, len(data) // 2 + 20):
        data[position] ^= 0xFF
    part.write_bytes(bytes(data))
    index = SimilarityIndex.open(tmp_path / "index", device="cpu")
    with pytest.raises(ArtifactError, match=rf"^{part}: damaged .*checksum"):
        index.search_ids(["img_000600.jpg"], k=3)
    assert fc7(["query", str(tmp_path / "index"), "--id", "img_000600.jpg"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"fc7 query: error: {part}: damaged") and "\n" not in error


def test_a_position_beyond_the_id_map_is_an_error_not_a_dropped_result(indexed, tmp_path) -> None:
    # A FAISS index holding more vectors than its id map has rows (load_index refuses such a
    # folder; here the two come from different folders): search must not drop the extra hits.
    x = indexed[1]
    write_embeddings(tmp_path / "emb", x[:5])
    build(tmp_path / "emb", tmp_path / "small", kind="flat")
    loaded = load_index(indexed[0])
    damaged = replace(loaded, id_map=load_index(tmp_path / "small").id_map)
    index = SimilarityIndex(damaged, device="cpu")
    with pytest.raises(ArtifactError, match="beyond its 5 ids; the index is corrupt"):
        index.search_vectors(x[700], k=3)


def test_devices_are_auto_cpu_or_cuda_with_gpu_as_an_alias(indexed) -> None:
    with pytest.raises(ConfigError, match="--device tpu: must be auto, cpu or cuda"):
        SimilarityIndex.open(indexed[0], device="tpu")
    if gpu_count() == 0:
        for device in ("cuda", "gpu", "cuda:0"):
            with pytest.raises(ConfigError, match="--device cuda: FAISS has no GPU here"):
                SimilarityIndex.open(indexed[0], device=device)
    assert len(SimilarityIndex.open(indexed[0], device="auto")) == 800


def test_the_query_api_does_not_load_the_build_code() -> None:
    # Every query and serve process imports pipeline.search: it must stay light.
    code = (
        "import sys, pipeline.search; "
        "loaded = sorted(m for m in sys.modules if m.startswith('pipeline.index.')); "
        "print(loaded); "
        "assert not {'pipeline.index.build', 'pipeline.index.tune', 'pipeline.index.plan'} "
        "& set(loaded), loaded"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "pipeline.index.format" in done.stdout  # the check ran on what search does import


# --- memory-mapped indexes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ivf_indexes(tmp_path_factory) -> tuple[dict[str, Path], np.ndarray]:
    """IVF-Flat and IVF-PQ indexes over 3,000 clustered vectors."""
    root = tmp_path_factory.mktemp("ivf")
    x, labels = clustered_vectors(3000, DIM, seed=13)
    write_embeddings(root / "emb", x, labels=[f"class_{c}" for c in labels], shards=3)
    folders = {}
    for kind in ("ivf-flat", "ivf-pq"):
        build(root / "emb", root / kind, kind=kind, eval_queries=200)
        folders[kind] = root / kind
    return folders, x


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-pq"])
def test_a_memory_mapped_index_answers_like_one_in_memory(ivf_indexes, kind) -> None:
    folders, x = ivf_indexes
    mapped = SimilarityIndex.open(folders[kind], device="cpu", mmap=True)
    read = SimilarityIndex.open(folders[kind], device="cpu", mmap=False)
    assert (mapped.mmap, read.mmap) == (True, False)
    assert len(mapped) == len(read) == 3000
    assert mapped.item("img_000123.jpg") == read.item("img_000123.jpg")
    queries = x[::150] + 0.05
    assert mapped.search_vectors(queries, k=10) == read.search_vectors(queries, k=10)
    # A mapped IVF index keeps no direct map: its id queries re-read the source embeddings.
    ids = [f"img_{i:06d}.jpg" for i in range(0, 3000, 250)]
    by_mapped = mapped.search_ids(ids, k=10)
    by_read = read.search_ids(ids, k=10)
    assert [[m.id for m in ms] for ms in by_mapped] == [[m.id for m in ms] for ms in by_read]
    np.testing.assert_allclose(
        [[m.score for m in ms] for ms in by_mapped],
        [[m.score for m in ms] for ms in by_read],
        atol=1e-6,
    )
    with pytest.raises(KeyError, match="nope.jpg"):
        mapped.search_ids([ids[0], "nope.jpg"])


def test_mmap_by_default_only_when_the_index_is_large_for_this_machine(
    ivf_indexes, monkeypatch
) -> None:
    folder = ivf_indexes[0]["ivf-flat"]
    size = (folder / "index.faiss").stat().st_size
    monkeypatch.setattr("pipeline.search.available_memory", lambda: 4 * size - 1)
    assert SimilarityIndex.open(folder, device="cpu").mmap is True
    assert SimilarityIndex.open(folder, device="cpu", mmap=False).mmap is False
    monkeypatch.setattr("pipeline.search.available_memory", lambda: 4 * size + 1)
    assert SimilarityIndex.open(folder, device="cpu").mmap is False
    assert SimilarityIndex.open(folder, device="cpu", mmap=True).mmap is True


def test_query_cli_mmap_prints_what_the_index_in_memory_prints(
    ivf_indexes, tmp_path, capsys
) -> None:
    folder = str(ivf_indexes[0]["ivf-flat"])
    query = ["query", folder, "--id", "img_000007.jpg", "img_002999.jpg", "-k", "5", "--json"]
    assert fc7([*query, "--mmap"]) == 0
    mapped = json.loads(capsys.readouterr().out)
    (tmp_path / "query.yaml").write_text("mmap: false\n")  # the way to refuse mapping
    assert fc7([*query, "--config", str(tmp_path / "query.yaml")]) == 0
    assert json.loads(capsys.readouterr().out) == mapped
    assert [len(entry["results"]) for entry in mapped] == [5, 5]
    with pytest.raises(SystemExit):
        fc7(["query", "--help"])
    assert "--mmap" in capsys.readouterr().out


# Opens an index in a fresh interpreter, so that memory the tests took before does not count,
# and prints how much anonymous (not file-backed) memory the open and one search took.
RSS_PROBE = """
import sys
import numpy as np
from pipeline.search import SimilarityIndex

def anon():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))

before = anon()
index = SimilarityIndex.open(sys.argv[1], device="cpu", mmap=sys.argv[2] == "mmap")
index.search_vectors(np.ones((4, index.dim), np.float32), k=10)
print(anon() - before, index.mmap)
"""


@pytest.fixture(scope="module")
def large_ivf_flat(tmp_path_factory) -> Path:
    """An IVF-Flat index of 50,000 x 256 float32 vectors: a ~52 MB index.faiss."""
    root = tmp_path_factory.mktemp("large")
    x, _ = clustered_vectors(50_000, 256, seed=14)
    write_embeddings(root / "emb", x, shards=2)
    build(root / "emb", root / "index", kind="ivf-flat", eval_queries=200, train_sample=20_000)
    return root / "index"


def _anon_growths(folder: Path, modes: list[str]) -> list[int]:
    # One probe per mode, side by side: each measures its own process's memory.
    probes = [
        subprocess.Popen(
            [sys.executable, "-c", RSS_PROBE, str(folder), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for mode in modes
    ]
    growths = []
    for mode, probe in zip(modes, probes, strict=True):
        try:
            stdout, stderr = probe.communicate(timeout=120)
        finally:
            if probe.poll() is None:
                probe.kill()
                probe.communicate()
        assert probe.returncode == 0, stderr
        growth, mapped = stdout.split()
        assert mapped == str(mode == "mmap")
        growths.append(int(growth))
    return growths


def test_a_memory_mapped_index_is_not_read_into_memory(large_ivf_flat) -> None:
    size = (large_ivf_flat / "index.faiss").stat().st_size
    assert size > 50_000_000
    mapped, read = _anon_growths(large_ivf_flat, ["mmap", "read"])
    assert mapped < 0.25 * size, (mapped, size)
    assert read >= 0.9 * size, (read, size)  # the probe sees what reading the index costs
