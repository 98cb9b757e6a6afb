"""`ray job submit` against a real Ray head started with `ray start`, as on a cluster; and a
local `fc7 extract` that must neither join that head nor hang once it is dead."""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO
from ray_cluster import RAY, RayCluster, free_port

from pipeline.classify import Classifier
from pipeline.search import SimilarityIndex

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not Path(RAY).exists(), reason="the ray command is not installed")
def test_ray_job_submit_runs_extract_index_and_train_on_a_started_head(tmp_path):
    cluster = RayCluster(tmp_path)

    def submit(*job_args: str) -> str:
        job = subprocess.run(
            [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
             "--", "python", *job_args],
            env=cluster.env, capture_output=True, text=True, timeout=600,
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        return job.stdout

    try:
        # The job's driver runs on the head; its workers on the other node, as on a cluster.
        cluster.start_head(cpus=0, dashboard=True)
        cluster.add_node("worker", cpus=2)
        deadline = time.monotonic() + 180
        while subprocess.run([RAY, "job", "list", "--address", cluster.dashboard],
                             env=cluster.env, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "the Ray head's job server did not come up"
            time.sleep(1)
        out = tmp_path / "embeddings"
        logs = submit("jobs/extract.py", str(REPO / "examples/images"), "--out", str(out),
                      "--weights", "random:0")
        assert "embedded 12, failed 0" in logs
        assert pq.read_table(out).num_rows == 12
        # The jobs that read the embeddings, submitted side by side as users of one cluster
        # do (one after another they took 40 s, mostly each driver's imports).
        with ThreadPoolExecutor(3) as jobs:
            flat = jobs.submit(submit, "jobs/build_index.py", str(out),
                               "--out", str(tmp_path / "index"))
            # An IVF index filled by Ray tasks on the cluster's worker node.
            ivf = jobs.submit(submit, "jobs/build_index.py", str(out),
                              "--out", str(tmp_path / "ivf"), "--kind", "ivf-flat",
                              "--runner", "ray")
            classifier = jobs.submit(submit, "jobs/train_classifier.py", str(out),
                                     "--out", str(tmp_path / "classifier"),
                                     "--test-size", "0.34")
            flat.result()
            classifier.result()
            logs = ivf.result()
        assert SimilarityIndex.open(tmp_path / "index").manifest["count"] == 12
        assert "vectors added by Ray tasks" in logs
        assert SimilarityIndex.open(tmp_path / "ivf").manifest["runner"] == "ray"
        assert Classifier.load(tmp_path / "classifier").classes == [
            "airplanes", "dalmatian", "sunflower"]
    finally:
        # SIGKILL, as a crash would: the head's address stays recorded in Ray's temp folder
        # (stop() removes that record after this test's local run below has used it).
        cluster.stop(forget=False)

    # Without RAY_ADDRESS, fc7 starts a Ray of its own; it used to join the recorded (now dead)
    # head and wait for it forever.
    local = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "extract", str(REPO / "examples/images"),
         "--out", str(tmp_path / "local"), "--weights", "random:0"],
        env=cluster.env, capture_output=True, text=True, timeout=300,
    )
    cluster.stop()
    assert local.returncode == 0, local.stderr[-3000:]
    assert "embedded 12, failed 0" in local.stdout


def test_a_ray_address_that_does_not_answer_fails_fast_with_one_line(tmp_path):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    # Before, this waited for good; the timeout makes such a hang a failure.
    run = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "extract", str(REPO / "examples/images"),
         "--out", str(tmp_path / "out"), "--weights", "random:0"],
        env=dict(os.environ, RAY_ADDRESS=dead), capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"fc7 extract: error: RAY_ADDRESS={dead}: no Ray cluster answers there")
