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
import torch
from conftest import REPO, attack_corpus, hostile_corpus, jpeg_bytes, write_labelled_folder

from jobs.cli import main as fc7
from jobs.extract import main as extract
from pipeline.decode import decode_image
from pipeline.errors import ArtifactError, OutputError, ProvenanceMismatch, SourceError
from pipeline.model import Embedder, load_weights
from pipeline.provenance import PARQUET_METADATA_KEY
from pipeline.store import EmbeddingDataset, embeddings_to_numpy

# One local Ray for the module, as a notebook user would have: each extract() joins it
# rather than starting and stopping its own.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]
# For runs whose runner does not matter to what the test proves: --out, the plan and
# --overwrite are the driver's (plan.prepare_output) before either runner starts, and both
# runners write the same parts (test_the_local_runner_writes_the_same_rows_as_ray). Each run
# on Ray starts an actor that imports torch and loads the model: about 8 s of a 2-core machine.
LOCAL = ["--runner", "local"]


def _rows(out) -> dict:
    table = pq.read_table(out).sort_by("id")
    return {row["id"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    expected = hostile_corpus(root / "src") | attack_corpus(root / "src")
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


def test_the_local_runner_writes_the_same_rows_as_ray(hostile_run, tmp_path):
    root, _, ray_out = hostile_run
    out = tmp_path / "local"
    assert extract([str(root / "src"), "--out", str(out), "--weights", "random:0",
                    "--shard-size", "5", "--batch-size", "3", "--runner", "local"]) == 0
    by_ray, here = pq.read_table(ray_out), pq.read_table(out)
    assert sorted(p.name for p in out.glob("part-*")) == sorted(
        p.name for p in ray_out.glob("part-*"))
    for column in here.column_names:  # ids, paths, errors and the embeddings' bytes
        assert here[column].equals(by_ray[column]), column


def test_output_schema_provenance_and_other_readers(hostile_run):
    _, expected, out = hostile_run
    parts = sorted(p.name for p in out.iterdir())
    shards = -(-len(expected) // 5)
    assert parts == ["_plan"] + [f"part-{shard:05d}.parquet" for shard in range(shards)]
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
    # Two Ray workers, then one worker in this process (the runners write the same parts).
    for shard, batch, dtype, workers, runner in [("2", "1", "float32", "2", "ray"),
                                                 ("64", "7", "float32", "1", "local"),
                                                 ("3", "4", "float16", "1", "local")]:
        out = tmp_path / f"out-{shard}-{batch}"
        assert extract([str(labelled_images), "--out", str(out), "--weights", "random:2",
                        "--shard-size", shard, "--batch-size", batch, "--dtype", dtype,
                        "--num-workers", workers, "--cpus-per-worker", "1",
                        "--runner", runner]) == 0
        table = pq.read_table(out).sort_by("id")
        runs.append((table["id"].to_pylist(), embeddings_to_numpy(table["embedding"])))
    assert runs[0][0] == runs[1][0] == runs[2][0]
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runs[0][1], runs[2][1], rtol=2e-3, atol=2e-3)


def test_overwrite_replaces_an_output_made_differently(tmp_path, labelled_images):
    out = tmp_path / "out"
    assert extract([str(labelled_images), "--out", str(out), "--weights", "random:0",
                    "--limit", "5", "--shard-size", "2", *LOCAL]) == 0
    assert extract([str(labelled_images), "--out", str(out), "--weights", "random:0",
                    "--layer", "pool5", "--overwrite", *LOCAL]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 12 and table.schema.field("embedding").type.list_size == 9216
    (out / "_plan/plan.json").write_text("{ truncated")  # e.g. a disk that filled up
    with pytest.raises(ArtifactError, match="unreadable run plan"):
        extract([str(labelled_images), "--out", str(out), "--weights", "random:0"])
    assert extract([str(labelled_images), "--out", str(out), "--weights", "random:0",
                    "--limit", "3", "--overwrite", *LOCAL]) == 0
    assert pq.read_table(out).num_rows == 3


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path, runner):
    source = tmp_path / "many"
    for i in range(160):
        (source / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        (source / f"c{i % 4}" / f"{i:03d}.jpg").write_bytes(jpeg_bytes(i, (64, 48)))
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "jobs/extract.py"), str(source), "--out", str(out),
               "--weights", "random:0", "--shard-size", "4", "--batch-size", "2",
               "--runner", runner]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the driver (and the Ray it started)
    process.wait()
    done_before = len(list(out.glob("part-*.parquet")))
    assert 0 < done_before < 40, "the run must be killed part-way"
    assert extract([str(source), "--out", str(out), "--weights", "random:0",
                    "--shard-size", "4", "--batch-size", "2", "--runner", runner]) == 0
    table = pq.read_table(out)
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 160
    assert table["error"].null_count == 160
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_ctrl_c_mid_run_and_during_shutdown_ends_in_one_line(tmp_path, runner):
    source = write_labelled_folder(tmp_path / "src", classes=4, per_class=40)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "extract", str(source), "--out", str(out),
         "--weights", "random:0", "--shard-size", "4", "--batch-size", "2", "--runner", runner],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)  # shutting down now: a second Ctrl-C, as impatient users press it
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "fc7 extract: interrupted" in stderr
    assert process.returncode in (130, -signal.SIGINT)  # -2: the second one came after the line


def test_a_source_without_images_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/readme.txt").write_text("no images here")
    with pytest.raises(SourceError, match="no images found"):
        extract([str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--weights", "random"])


def test_cli_exit_codes_and_messages(tmp_path, capsys):
    # `python -m jobs.cli` exits with what `fc7` returns (one process below shows it); the
    # others run in this process, each a Python start (about 5 s) the shorter.
    assert fc7(["extract", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                "--weights", "random"]) == 1
    assert "no such folder or manifest" in capsys.readouterr().err
    assert fc7(["extract", ".", "--out", "o", "--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err
    unwritable = subprocess.run([sys.executable, "-m", "jobs.cli", "extract",
                                 str(REPO / "examples/images"), "--out", "/proc/fc7-out",
                                 "--weights", "random"],
                                capture_output=True, text=True)
    assert unwritable.returncode == 1 and "cannot write here" in unwritable.stderr
    with pytest.raises(SystemExit) as helptext:
        fc7(["extract", "--help"])
    assert helptext.value.code == 0 and "(default: alexnet)" in capsys.readouterr().out


def test_a_manifest_naming_devices_fifos_and_large_files_gives_error_rows(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(jpeg_bytes(1))
    (tmp_path / "large.jpg").write_bytes(jpeg_bytes(2, (400, 300)))
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "list.txt").write_text("ok.jpg\n/dev/urandom\n/dev/zero\npipe.jpg\nlarge.jpg\n")
    limit = (tmp_path / "large.jpg").stat().st_size - 1
    assert extract([str(tmp_path / "list.txt"), "--out", str(tmp_path / "out"),
                    "--weights", "random:0", "--max-bytes", str(limit), *LOCAL]) == 0
    errors = {row["id"]: row["error"] for row in _rows(tmp_path / "out").values()}
    assert errors == {
        "ok.jpg": None,
        "/dev/urandom": "not a regular file: a character device; only plain files are read",
        "/dev/zero": "not a regular file: a character device; only plain files are read",
        "pipe.jpg": "not a regular file: a FIFO (named pipe); only plain files are read",
        "large.jpg": f"file too large: {limit + 1:,} bytes exceeds max_bytes {limit:,} "
                     "(--max-bytes)",
    }


WORKER_PEAK = """
import json, resource, sys
from pipeline.extract import ExtractConfig, ShardEmbedder, prepare_output, write_plan
from pipeline.model import load_weights, make_provenance
from pipeline.sources import iter_inputs

source, out = sys.argv[1:3]
config = ExtractConfig(source=source, out=out, weights="random:0", shard_size=4,
                       batch_size=4, decode_memory="1GiB")
provenance = make_provenance(load_weights(config.weights), config.layer, config.dtype)
plan = prepare_output(config, provenance) or write_plan(config, provenance, iter_inputs(source))
worker = ShardEmbedder(config, plan, threads=4)  # three decode threads at once
worker(plan.shards - 1)  # a shard of plain photos first: the model's own memory
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
stats = [worker(shard) for shard in range(plan.shards - 1)]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "after": after, "failed": sum(s.failed for s in stats)}))
"""


def test_a_worker_decoding_the_attack_corpus_stays_within_its_decode_memory(tmp_path):
    expected = attack_corpus(tmp_path / "src")
    write_labelled_folder(tmp_path / "src" / "zz-photos", classes=1, per_class=4)
    run = subprocess.run([sys.executable, "-c", WORKER_PEAK, str(tmp_path / "src"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    peak = json.loads(run.stdout.strip().splitlines()[-1])
    growth = peak["after"] - peak["before"]
    print(f"worker peak RSS {peak['after'] / 2**20:,.0f} MiB, +{growth / 2**20:,.0f} MiB over "
          f"the attack corpus")
    # Measured here: about +0.6 GiB (the two 100-megapixel PNGs, one after the other under a
    # 1 GiB budget). Before, the thin PNG alone asked for 32 GB and the worker died.
    assert growth < 2 * 2**30
    assert peak["failed"] == sum(error is not None for error in expected.values())


def _parts(out) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("part-*.parquet")))


def test_overwrite_deletes_only_what_fc7_wrote(tmp_path, labelled_images):
    out = tmp_path / "out"
    (out / "_plan").mkdir(parents=True)
    (out / "_plan/roadmap.md").write_text("my plans")
    for flags in ([], ["--overwrite"]):  # not an fc7 output: refused either way
        with pytest.raises(OutputError, match="not empty and is not an fc7 extraction output "
                                              "\\(it holds _plan/roadmap.md\\)"):
            extract([str(labelled_images), "--out", str(out), "--weights", "random:0", *flags])
    (out / "_plan/roadmap.md").unlink()
    assert extract([str(labelled_images), "--out", str(out), "--weights", "random:0",
                    "--shard-size", "5", *LOCAL]) == 0
    planted = {"part-time-jobs.xlsx": "salary", "_plan/notes.md": "notes",
               "part-x/inside.txt": "kept", ".part-mine.tmp": "mine"}
    for name, text in planted.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    pq.write_table(pa.table({"x": [1]}), out / "part-00099.parquet")  # not fc7's
    assert extract([str(labelled_images), "--out", str(out), "--weights", "random:0"]) == 0
    # On Ray: its run record and its sweep of temporary parts meet the planted files.
    assert extract([str(labelled_images), "--out", str(out), "--weights", "random:0",
                    "--layer", "fc6", "--shard-size", "4", "--overwrite", "--runner", "ray"]) == 0
    assert len(list(out.glob("_plan/run-*.json"))) == 1
    (out / "_plan/plan.json").write_text("{ truncated")  # an unreadable plan
    assert extract([str(labelled_images), "--out", str(out), "--weights", "random:0",
                    "--limit", "5", "--shard-size", "3", "--overwrite", *LOCAL]) == 0
    assert not list(out.glob("_plan/run-*.json"))  # the Ray run's record went with its run
    for name, text in planted.items():
        assert (out / name).read_text() == text, name
    assert pq.read_table(out / "part-00099.parquet").num_rows == 1
    fc7_parts = [p for p in out.glob("part-0000*.parquet")]
    assert sorted(p.name for p in fc7_parts) == ["part-00000.parquet", "part-00001.parquet"]
    assert sum(pq.read_table(p).num_rows for p in fc7_parts) == 5


# huge.pth's values overflow float16 on purpose; the local run casts them in this process.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_non_finite_embeddings_become_error_rows(tmp_path, labelled_images):
    state = load_weights("random:0").state_dict
    broken = {name: tensor.clone() for name, tensor in state.items()}
    broken["classifier.4.bias"][7] = float("nan")  # fc7's unit 7 for every image
    torch.save(broken, tmp_path / "nan.pth")
    huge = {name: tensor.clone() for name, tensor in state.items()}
    huge["classifier.4.bias"] += 1e5  # fine in float32, beyond float16's 65504
    torch.save(huge, tmp_path / "huge.pth")
    # The first on Ray, whose actor loads the weights file itself.
    for weights, dtype, runner in [("nan.pth", "float32", "ray"),
                                   ("huge.pth", "float16", "local")]:
        out = tmp_path / f"out-{weights}"
        assert extract([str(labelled_images), "--out", str(out), "--weights",
                        str(tmp_path / weights), "--dtype", dtype, "--runner", runner]) == 0
        errors = pq.read_table(out)["error"].to_pylist()
        assert len(errors) == 12
        assert all(e.startswith("non-finite embedding") for e in errors), errors[:2]
    out = tmp_path / "out-float32"
    assert extract([str(labelled_images), "--out", str(out), "--weights",
                    str(tmp_path / "huge.pth"), *LOCAL]) == 0
    assert pq.read_table(out)["error"].null_count == 12
