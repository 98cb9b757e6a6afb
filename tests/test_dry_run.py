"""`fc7 extract --dry-run` (pipeline/extract/dryrun.py): exact figures, nothing embedded, the
plan reused by the run that follows, and a plan summed up in bounded memory."""

import re
import shutil
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from jobs.extract import main as extract
from pipeline.extract import ExtractConfig, prepare_output, write_plan
from pipeline.extract.dryrun import plan_figures, sample_rows
from pipeline.model import load_weights, make_provenance
from pipeline.provenance import Provenance
from pipeline.sources import iter_inputs
from pipeline.store import EmbeddingDataset

EXAMPLES = REPO / "examples" / "images"


def _example_files() -> list:
    return sorted(EXAMPLES.rglob("*.jpg"))


def test_dry_run_sums_up_the_plan_exactly_and_embeds_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(EXAMPLES), "--out", str(out), "--weights", "random:0", "--shard-size", "5"]
    assert extract([*argv, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    total = sum(path.stat().st_size for path in _example_files())
    assert len(_example_files()) == 12
    assert "images: 12 in 3 shards of up to 5" in printed
    assert "labels: 3 distinct on 12 images; most common: airplanes 4, dalmatian 4, sunflower 4" \
        in printed
    assert f"bytes: {total:,} (" in printed and "in 12 local files" in printed
    assert "workers: in this process (runner local): 1 replica" in printed
    assert "calibration: 12 of 12 sampled images read, decoded and embedded here" in printed
    assert "estimate: " in printed and "assumes throughput grows linearly" in printed
    # The plan, and only the plan: no part file, not even a temporary one.
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "_plan", "_plan/inputs.parquet", "_plan/plan.json"]

    # The library's figures, read back through the resume path a run takes.
    config = ExtractConfig(source=str(EXAMPLES), out=str(out), weights="random:0", shard_size=5)
    plan = prepare_output(config, make_provenance(load_weights("random:0"), "fc7", "float32"))
    figures = plan_figures(plan)
    assert (figures.images, figures.shards, figures.done_shards, figures.pending_images) == (
        12, 3, 0, 12)
    assert (figures.labels, figures.labelled) == (3, 12)
    assert figures.top_labels == (("airplanes", 4), ("dalmatian", 4), ("sunflower", 4))
    assert (figures.bytes, figures.sized, figures.missing, figures.remote) == (total, 12, 0, 0)
    # The calibration sample is seeded, and drawn from every shard, in plan order.
    everything = [row["id"] for row in sample_rows(plan, 12)]
    assert everything == [item.id for item in iter_inputs(str(EXAMPLES))]
    assert [row["id"] for row in sample_rows(plan, 4)] == [
        row["id"] for row in sample_rows(plan, 4)]


def test_the_run_after_a_dry_run_reuses_its_plan(tmp_path, capsys):
    source, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(EXAMPLES, source)
    argv = [str(source), "--out", str(out), "--weights", "random:0", "--shard-size", "5"]
    assert extract([*argv, "--dry-run"]) == 0
    planned = (out / "_plan/inputs.parquet").read_bytes()
    # An image added after the dry run is not in the plan: the run embeds what was planned.
    shutil.copy(source / "dalmatian/image_0001.jpg", source / "dalmatian/added.jpg")
    assert extract(argv) == 0
    assert (out / "_plan/inputs.parquet").read_bytes() == planned
    data = EmbeddingDataset.open(str(out))
    assert data.count(with_errors=True) == 12
    assert sorted(p.name for p in out.glob("part-*")) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    capsys.readouterr()
    assert extract([*argv, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "(3 already done, 0 images to go)" in printed and "nothing to do" in printed


def test_dry_run_refuses_overwrite_and_deletes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(EXAMPLES), "--out", str(out), "--weights", "random:0"]
    assert extract([*argv, "--dry-run"]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    from jobs import run

    assert run("extract", extract, [*argv, "--dry-run", "--overwrite"]) == 2
    assert "--dry-run --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_dry_run_of_an_int8_run_builds_no_int8_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FC7_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert extract([str(EXAMPLES), "--out", str(out), "--weights", "random:0",
                    "--precision", "int8", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "int8: a dry run does not build the int8 model; the run calibrates it" in printed
    assert "cpu, fp32)" in printed  # measured with fp32: no int8 model to measure
    assert not list(tmp_path.rglob("*.onnx"))


def test_planning_and_summing_up_200k_rows_stream(tmp_path):
    rows = 200_000
    manifest = tmp_path / "list.parquet"
    labels = [None if i % 10 == 0 else f"label_{i % 7}" for i in range(rows)]
    pq.write_table(pa.table({"path": [f"img_{i:07d}.jpg" for i in range(rows)],
                             "label": labels}), manifest)
    expected = {f"label_{k}": sum(1 for label in labels if label == f"label_{k}")
                for k in range(7)}
    del labels
    config = ExtractConfig(source=str(manifest), out=str(tmp_path / "out"))
    provenance = Provenance(weights="random:0", weights_sha256="0" * 64, layer="fc7", dim=4096)
    # Python's own allocations, traced: deterministic, unlike a process's RSS. Measured here:
    # a peak of 17 MB (a manifest batch and a shard), and 75 MB when the same inputs are first
    # made into a list; so the bound catches a plan held whole, at a quarter of this size.
    tracemalloc.start()
    try:
        # The CLI's planning path, then the dry run's streaming passes.
        plan = prepare_output(config, provenance) or write_plan(
            config, provenance, iter_inputs(str(manifest)))
        figures = plan_figures(plan)
        sample = sample_rows(plan)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, f"planning {rows:,} rows peaked at {peak / 2**20:.0f} MB"
    assert (figures.images, figures.shards) == (rows, -(-rows // 256))
    # Exact after the per-shard counts were merged (over 64 shards at a time).
    assert (figures.labels, figures.labelled) == (7, rows - rows // 10)
    assert dict(figures.top_labels) == dict(sorted(
        expected.items(), key=lambda item: (-item[1], item[0]))[:5])
    assert (figures.missing, figures.sized) == (rows, 0)  # the manifest's files do not exist
    assert len(sample) == 32


@pytest.mark.slow
def test_dry_run_on_a_running_ray_shows_its_nodes(tmp_path, capsys, local_ray):
    import ray

    out = tmp_path / "out"
    assert extract([str(EXAMPLES), "--out", str(out), "--weights", "random:0", "--runner",
                    "ray", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"workers: Ray \(runner ray\) on the Ray cluster this process runs: \d+ "
                     r"replicas? on 1 node", printed)
    assert ray.is_initialized()  # a Ray the dry run did not start is left as it was
    assert not list(out.glob("part-*"))
