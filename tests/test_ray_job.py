"""`ray job submit` against a real Ray head started with `ray start`, as on a cluster; and a
local `fc7 extract` that must neither join that head nor hang once it is dead."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO

from pipeline.classify import Classifier
from pipeline.search import SimilarityIndex

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_pids(session: int) -> list[int]:
    """Live processes of one session: the `ray start --block` we started and all it started."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                state = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0]
                if os.getsid(int(entry)) == session and state != "Z":  # zombies are gone
                    pids.append(int(entry))
            except (OSError, IndexError):  # ended meanwhile
                pass
    return pids


def _stop_session(session: int, sig: signal.Signals = signal.SIGTERM) -> None:
    """Stop only what this test started, by pid (never `ray stop`, which stops every Ray)."""
    deadline = time.monotonic() + 30
    for current in (sig, signal.SIGKILL):
        for pid in _session_pids(session):
            try:
                os.kill(pid, current)
            except ProcessLookupError:
                pass
        while _session_pids(session) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _session_pids(session):
            return
    assert not _session_pids(session), "processes of the test's Ray head survived SIGKILL"


@pytest.mark.skipif(not shutil.which(RAY), reason="the ray command is not installed")
def test_ray_job_submit_runs_extract_index_and_train_on_a_started_head(tmp_path):
    # Ray 2.60's head wants token authentication; a fresh machine has no ~/.ray/auth_token, so
    # this cluster gets its own token, shared with its clients through the environment.
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=f"{Path(RAY).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    dashboard, gcs = _free_port(), _free_port()
    with open(tmp_path / "head.log", "wb") as log:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={gcs}",
             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
             "--include-dashboard=true", "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    address = f"http://127.0.0.1:{dashboard}"

    def submit(*job_args: str) -> str:
        job = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
             "python", *job_args],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        return job.stdout

    try:
        deadline = time.monotonic() + 180
        while subprocess.run([RAY, "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not come up in 180 s"
            time.sleep(1)
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
        # SIGKILL, as a crash would: the head's address stays recorded in Ray's temp folder.
        _stop_session(head.pid, signal.SIGKILL)
        head.wait(timeout=30)

    # Without RAY_ADDRESS, fc7 starts a Ray of its own; it used to join the recorded (now dead)
    # head and wait for it forever.
    local = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "extract", str(REPO / "examples/images"),
         "--out", str(tmp_path / "local"), "--weights", "random:0"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    assert "embedded 12, failed 0" in local.stdout
    # Leave no record of our dead head behind for the next `ray.init()` on this machine (but
    # keep one that names another cluster).
    record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if record.is_file() and record.read_text().strip().endswith(f":{gcs}"):
        record.unlink()


def test_a_ray_address_that_does_not_answer_fails_fast_with_one_line(tmp_path):
    dead = f"127.0.0.1:{_free_port()}"  # nothing listens there
    # Before, this waited for good; the timeout makes such a hang a failure.
    run = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "extract", str(REPO / "examples/images"),
         "--out", str(tmp_path / "out"), "--weights", "random:0"],
        env=dict(os.environ, RAY_ADDRESS=dead), capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"fc7 extract: error: RAY_ADDRESS={dead}: no Ray cluster answers there")
