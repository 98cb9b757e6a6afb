"""`ray job submit` against a real Ray head started with `ray start`, as on a cluster; and a
local `fc7 extract` that must neither join that head nor hang once it is dead."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO
from ray_cluster import RAY, RayCluster, free_port

from jobs import run
from jobs.finetune import main as finetune_main
from pipeline.classify import Classifier
from pipeline.search import SimilarityIndex

pytestmark = pytest.mark.slow


def working_copy(root: Path, job_args: tuple[str, ...]) -> Path:
    """The code a job needs, in a folder of its own. Jobs submitted at once with the same
    working dir share one package, and Ray (since 2.41, ray#49313) replaces a package's local
    copy when another job starts with it: a job could lose its working dir as it started."""
    name = hashlib.sha256(" ".join(job_args).encode()).hexdigest()[:12]
    folder = root / f"working-dir-{name}"
    for part in ("pipeline", "jobs", "configs"):
        shutil.copytree(REPO / part, folder / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "JOB").write_text(" ".join(job_args))  # distinct content, a distinct package
    return folder


# Frozen convolutions, no dropout, no augmentation: the only randomness left is the order
# (seeded), so one worker and two must agree.
FINETUNE = [str(REPO / "examples/images"), "--weights", "random:0", "--epochs", "2",
            "--batch-size", "6", "--lr", "0.02", "--dropout", "0", "--val-fraction", "0.25",
            "--seed", "3"]


@pytest.mark.skipif(not Path(RAY).exists(), reason="the ray command is not installed")
def test_ray_job_submit_runs_extract_index_train_and_finetune_on_a_started_head(tmp_path):
    # The fine-tune puts AlexNet's weights (244 MB) in the object store: room for them, so
    # that nothing is spilled to a disk that may be nearly full.
    cluster = RayCluster(tmp_path, object_store_memory=700_000_000)

    def submit(*job_args: str) -> str:
        job = subprocess.run(
            [RAY, "job", "submit", "--address", cluster.dashboard,
             "--working-dir", str(working_copy(tmp_path, job_args)), "--", "python", *job_args],
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
        with ThreadPoolExecutor(4) as jobs:
            flat = jobs.submit(submit, "jobs/build_index.py", str(out),
                               "--out", str(tmp_path / "index"))
            # An IVF index filled by Ray tasks on the cluster's worker node.
            ivf = jobs.submit(submit, "jobs/build_index.py", str(out),
                              "--out", str(tmp_path / "ivf"), "--kind", "ivf-flat",
                              "--runner", "ray")
            classifier = jobs.submit(submit, "jobs/train_classifier.py", str(out),
                                     "--out", str(tmp_path / "classifier"),
                                     "--test-size", "0.34")
            # Fine-tuning on Ray Train: two DDP workers on the worker node, from the images.
            finetune = jobs.submit(submit, "jobs/finetune.py", *FINETUNE, "--out",
                                   str(tmp_path / "finetune"), "--num-workers", "2")
            flat.result()
            classifier.result()
            tuned = finetune.result()
            logs = ivf.result()
        assert SimilarityIndex.open(tmp_path / "index").manifest["count"] == 12
        assert "vectors added by Ray tasks" in logs
        assert SimilarityIndex.open(tmp_path / "ivf").manifest["runner"] == "ray"
        assert Classifier.load(tmp_path / "classifier").classes == [
            "airplanes", "dalmatian", "sunflower"]
        assert "path: images" in tuned and "epoch 2/2" in tuned, tuned[-2000:]
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

    # The same fine-tune as one worker in this process (Ray Train's local mode): the same
    # global batches and mean loss, so the same curves and weights. Only the order of float32
    # sums differs (each worker sums its half, then DDP adds the halves): a relative 1e-7 per
    # step that two epochs of SGD grow to about 1e-5 at most; a wrong slicing or loss scale
    # would be off by 10%.
    assert run("finetune", finetune_main, [*FINETUNE, "--out", str(tmp_path / "one"),
                                           "--num-workers", "0"]) == 0
    one, two = (json.loads((tmp_path / name / "manifest.json").read_text())
                for name in ("one", "finetune"))
    assert (one["num_workers"], two["num_workers"]) == (0, 2)
    assert two["classes"] == ["airplanes", "dalmatian", "sunflower"]
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
        np.testing.assert_allclose([r[key] for r in two["curves"]],
                                   [r[key] for r in one["curves"]], rtol=1e-4, err_msg=key)
    mine, theirs = (torch.load(tmp_path / name / "model.pt", weights_only=True)
                    for name in ("one", "finetune"))
    for name in mine:
        torch.testing.assert_close(theirs[name], mine[name], rtol=1e-4, atol=1e-5)
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
