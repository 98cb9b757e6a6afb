"""The embeddings store: what is written is what is read, and mixed or foreign data is refused."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
from conftest import test_provenance, write_embeddings

from pipeline.errors import ArtifactError, ProvenanceMismatch
from pipeline.store import EmbeddingDataset, describe_entries, embeddings_to_numpy, foreign_entries


def test_rows_come_back_exactly_in_order_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.random((50, 16), dtype=np.float32)
    errors = [None if i % 7 else f"cannot decode: bad {i}" for i in range(50)]
    write_embeddings(tmp_path, vectors, labels=[f"c{i % 3}" for i in range(50)],
                     shards=4, errors=errors)
    data = EmbeddingDataset.open(str(tmp_path))
    good = [i for i in range(50) if errors[i] is None]
    assert data.count() == len(good) and data.count(with_errors=True) == 50
    batches = list(data.batches(["id", "embedding", "label"], batch_size=5))
    assert max(batch.num_rows for batch in batches) <= 5
    ids = [value for batch in batches for value in batch["id"].to_pylist()]
    assert ids == [f"img_{i:06d}.jpg" for i in good]
    read = np.concatenate([embeddings_to_numpy(batch["embedding"]) for batch in batches])
    np.testing.assert_array_equal(read, vectors[good])
    every = list(data.batches(["error"], with_errors=True))
    assert [e for batch in every for e in batch["error"].to_pylist()] == errors


def test_float16_vectors_are_read_as_float32(tmp_path):
    vectors = np.random.default_rng(1).random((4, 8), dtype=np.float32)
    write_embeddings(tmp_path, vectors, provenance=test_provenance(dim=8, dtype="float16"))
    batch = next(EmbeddingDataset.open(str(tmp_path)).batches(["embedding"]))
    read = embeddings_to_numpy(batch["embedding"])
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, vectors.astype(np.float16).astype(np.float32))


def test_a_row_filter_and_a_file_subset_select_exactly_those_rows(tmp_path):
    write_embeddings(tmp_path, np.ones((10, 4), dtype=np.float32), shards=2)
    data = EmbeddingDataset.open(str(tmp_path))
    wanted = pads.field("id").isin(["img_000001.jpg", "img_000008.jpg"])
    found = [i for b in data.batches(["id"], where=wanted) for i in b["id"].to_pylist()]
    assert found == ["img_000001.jpg", "img_000008.jpg"]
    second = [i for b in data.batches(["id"], files=[data.files[1]]) for i in b["id"].to_pylist()]
    assert second == [f"img_{i:06d}.jpg" for i in range(5, 10)]


def test_part_files_with_other_features_or_dtype_are_refused(tmp_path):
    write_embeddings(tmp_path / "a", np.ones((2, 8), dtype=np.float32))
    write_embeddings(tmp_path / "a" / "more", np.ones((2, 8), dtype=np.float32),
                     provenance=test_provenance(dim=8, layer="fc6"))
    with pytest.raises(ProvenanceMismatch, match="layer: fc[67] vs fc[67]"):
        EmbeddingDataset.open(str(tmp_path / "a"))
    write_embeddings(tmp_path / "b", np.ones((2, 8), dtype=np.float32))
    write_embeddings(tmp_path / "b" / "more", np.ones((2, 8), dtype=np.float32),
                     provenance=test_provenance(dim=8, dtype="float16"))
    with pytest.raises(ProvenanceMismatch, match="dtype: float(32|16) vs float(16|32)"):
        EmbeddingDataset.open(str(tmp_path / "b"))


def test_missing_empty_and_foreign_folders_are_named(tmp_path):
    with pytest.raises(ArtifactError, match="no such embeddings folder"):
        EmbeddingDataset.open(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="holds no Parquet part files"):
        EmbeddingDataset.open(str(tmp_path / "empty"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "other").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other" / "part-0.parquet")
    with pytest.raises(ArtifactError, match="not an fc7 embeddings file"):
        EmbeddingDataset.open(str(tmp_path / "other"))


def test_foreign_entries_lists_what_is_not_ours(tmp_path):
    for name in ("manifest.json", "notes.md", "b.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    names = foreign_entries(pafs.LocalFileSystem(), str(tmp_path),
                            lambda info: info.base_name == "manifest.json")
    assert names == ["b.txt", "notes.md", "sub/"]
    assert describe_entries([f"f{i}" for i in range(7)], limit=3) == "f0, f1, f2 and 4 more"
