"""End-to-end extraction through `fc7 extract` (jobs/extract.py) on a local Ray."""

import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, hostile_corpus, jpeg_bytes

from jobs.extract import main as extract
from pipeline.decode import decode_image
from pipeline.errors import ArtifactError, OutputError, ProvenanceMismatch, SourceError
from pipeline.model import Embedder, load_weights
from pipeline.provenance import PARQUET_METADATA_KEY
from pipeline.store import EmbeddingDataset, embeddings_to_numpy

pytestmark = pytest.mark.slow


def _rows(out) -> dict:
    table = pq.read_table(out).sort_by("id")
    return {row["id"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    expected = hostile_corpus(root / "src")
    out = root / "out"
    assert extract([str(root / "src"), "--out", str(out), "--weights", "random:0",
                    "--shard-size", "5", "--batch-size", "3"]) == 0
    return root, expected, out


def test_every_file_becomes_one_row_with_embedding_or_error(hostile_run):
    root, expected, out = hostile_run
    rows = _rows(out)
    assert set(rows) == set(expected)
    for name, error in expected.items():
        row = rows[name]
        assert row["path"] == str(root / "src" / name)
        if error is None:
            assert row["error"] is None and len(row["embedding"]) == 4096, name
            assert row["width"] > 0 and len(row["sha256"]) == 64
        else:
            assert row["embedding"] is None and row["error"].startswith(error), (name, row)
    assert rows["odd/folder.jpg/inside.png"]["label"] == "odd"
    assert rows["top-level.JPEG"]["label"] is None


def test_embeddings_equal_the_single_process_model(hostile_run):
    root, _, out = hostile_run
    embedder = Embedder(load_weights("random:0"), device="cpu")
    rows = _rows(out)
    name = "odd/ünïcødé 名前.jpg"
    tensor = decode_image((root / "src" / name).read_bytes(), embedder.preprocessing)[0]
    expected = embedder(tensor[None])[0]
    np.testing.assert_allclose(rows[name]["embedding"], expected, rtol=1e-5, atol=1e-5)


def test_output_schema_provenance_and_other_readers(hostile_run):
    _, expected, out = hostile_run
    parts = sorted(p.name for p in out.iterdir())
    assert parts == ["_plan", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet",
                     "part-00003.parquet"]
    schema = pq.read_schema(out / "part-00000.parquet")
    embedding = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(embedding) and embedding.list_size == 4096
    assert embedding.value_type == pa.float32()
    provenance = json.loads(schema.metadata[PARQUET_METADATA_KEY])
    assert provenance["layer"] == "fc7" and provenance["weights"] == "random:0"
    assert provenance["model"] == "alexnet" and provenance["created_at"]
    assert EmbeddingDataset.open(str(out)).count() == sum(e is None for e in expected.values())
    frame = pd.read_parquet(out)
    fine = sum(e is None for e in expected.values())
    assert len(frame) == len(expected) and len(frame.dropna(subset=["embedding"])) == fine
    assert pl.read_parquet(f"{out}/*.parquet").height == len(expected)
    dims = duckdb.sql(f"select len(embedding) from '{out}/*.parquet' where error is null")
    assert {d for (d,) in dims.fetchall()} == {4096}


def test_rerun_does_nothing_and_other_settings_are_refused(hostile_run, capsys):
    _, _, out = hostile_run
    before = {p: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert extract([str(hostile_run[0] / "src"), "--out", str(out), "--weights", "random:0",
                    "--shard-size", "5"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("part-*")} == before
    with pytest.raises(ProvenanceMismatch, match="layer: fc7 vs fc6"):
        extract([str(hostile_run[0] / "src"), "--out", str(out), "--weights", "random:0",
                 "--layer", "fc6"])
    with pytest.raises(OutputError, match="holds a run over"):
        extract([str(REPO / "examples/images"), "--out", str(out), "--weights", "random:0"])


def test_results_do_not_depend_on_shards_batches_or_workers(tmp_path, labelled_images):
    runs = []
    for shard, batch, dtype, workers in [("2", "1", "float32", "2"), ("64", "7", "float32", "1"),
                                         ("3", "4", "float16", "1")]:
        out = tmp_path / f"out-{shard}-{batch}"
        assert extract([str(labelled_images), "--out", str(out), "--weights", "random:2",
                        "--shard-size", shard, "--batch-size", batch, "--dtype", dtype,
                        "--num-workers", workers, "--cpus-per-worker", "1"]) == 0
        table = pq.read_table(out).sort_by("id")
        runs.append((table["id"].to_pylist(), embeddings_to_numpy(table["embedding"])))
    assert runs[0][0] == runs[1][0] == runs[2][0]
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runs[0][1], runs[2][1], rtol=2e-3, atol=2e-3)


def test_overwrite_replaces_an_output_made_differently(tmp_path, labelled_images):
    out = tmp_path / "out"
    assert extract([str(labelled_images), "--out", str(out), "--weights", "random:0",
                    "--limit", "5", "--shard-size", "2"]) == 0
    assert extract([str(labelled_images), "--out", str(out), "--weights", "random:0",
                    "--layer", "pool5", "--overwrite"]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 12 and table.schema.field("embedding").type.list_size == 9216
    (out / "_plan/plan.json").write_text("{ truncated")  # e.g. a disk that filled up
    with pytest.raises(ArtifactError, match="unreadable run plan"):
        extract([str(labelled_images), "--out", str(out), "--weights", "random:0"])
    assert extract([str(labelled_images), "--out", str(out), "--weights", "random:0",
                    "--limit", "3", "--overwrite"]) == 0
    assert pq.read_table(out).num_rows == 3


def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path):
    source = tmp_path / "many"
    for i in range(160):
        (source / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        (source / f"c{i % 4}" / f"{i:03d}.jpg").write_bytes(jpeg_bytes(i, (64, 48)))
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "jobs/extract.py"), str(source), "--out", str(out),
               "--weights", "random:0", "--shard-size", "4", "--batch-size", "2"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
    process.wait()
    done_before = len(list(out.glob("part-*.parquet")))
    assert 0 < done_before < 40, "the run must be killed part-way"
    assert extract([str(source), "--out", str(out), "--weights", "random:0",
                    "--shard-size", "4", "--batch-size", "2"]) == 0
    table = pq.read_table(out)
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 160
    assert table["error"].null_count == 160
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_source_without_images_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/readme.txt").write_text("no images here")
    with pytest.raises(SourceError, match="no images found"):
        extract([str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--weights", "random"])


def test_cli_exit_codes_and_messages(tmp_path):
    fc7 = [sys.executable, "-m", "pipeline.cli"]
    missing = subprocess.run([*fc7, "extract", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "o"), "--weights", "random"],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "no such folder or manifest" in missing.stderr
    bad = subprocess.run([*fc7, "extract", ".", "--out", "o", "--batch-size", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--batch-size 0" in bad.stderr
    unwritable = subprocess.run([*fc7, "extract", str(REPO / "examples/images"), "--out",
                                 "/proc/fc7-out", "--weights", "random"],
                                capture_output=True, text=True)
    assert unwritable.returncode == 1 and "cannot write here" in unwritable.stderr
    helptext = subprocess.run([*fc7, "extract", "--help"], capture_output=True, text=True)
    assert helptext.returncode == 0 and "(default: fc7)" in helptext.stdout
