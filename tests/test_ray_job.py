"""`ray job submit` against a real Ray head started with `ray start`, as on a cluster."""

import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from conftest import REPO

from pipeline.classify import Classifier
from pipeline.search import SimilarityIndex

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not shutil.which(RAY), reason="the ray command is not installed")
def test_ray_job_submit_runs_extract_index_and_train_on_a_started_head(tmp_path):
    # `ray stop` ends every Ray on this machine, so let go of this process's own first.
    ray.shutdown()
    # Ray 2.60's head wants token authentication; a fresh machine has no ~/.ray/auth_token, so
    # this cluster gets its own token, shared with its clients through the environment.
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=f"{Path(RAY).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    subprocess.run(
        [RAY, "start", "--head", f"--port={_free_port()}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
         "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=180,
    )
    def submit(*job_args: str) -> str:
        job = subprocess.run(
            [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
             "--working-dir", str(REPO), "--", "python", *job_args],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        return job.stdout

    try:
        out = tmp_path / "embeddings"
        logs = submit("jobs/extract.py", str(REPO / "examples/images"), "--out", str(out),
                      "--weights", "random:0")
        assert "embedded 12, failed 0" in logs
        assert pq.read_table(out).num_rows == 12
        submit("jobs/build_index.py", str(out), "--out", str(tmp_path / "index"))
        assert SimilarityIndex.open(tmp_path / "index").manifest["count"] == 12
        submit("jobs/train_classifier.py", str(out), "--out", str(tmp_path / "classifier"),
               "--test-size", "0.34")
        assert Classifier.load(tmp_path / "classifier").classes == [
            "airplanes", "dalmatian", "sunflower"]
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
