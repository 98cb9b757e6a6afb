"""`fc7 extract` on a real multi-node Ray cluster on this machine: workers on every node, a
node lost mid-run, a node that joins mid-run, and a shard that crashes every worker; and on the
same cluster, `fc7 index --runner ray` with a node lost mid-build.

The head has no CPUs, so every worker runs on a worker node of one CPU (one worker each).
"""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, clustered_vectors, jpeg_bytes, write_embeddings
from ray_cluster import RAY, RayCluster, two_worker_nodes

from pipeline.index import IndexConfig, build_index
from pipeline.index.idmap import IDS_FILE, LOOKUP_FILE
from pipeline.store import EmbeddingDataset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(RAY).exists(), reason="the ray command is not installed"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    # The test-only hook of pipeline/extract/worker.py: a worker crashes on the ids listed in
    # this file (absent unless a test writes it).
    crash_file = root / "crash-on"
    with two_worker_nodes(root, {"FC7_TEST_CRASH_FILE": str(crash_file)}) as cluster:
        cluster.crash_file = crash_file
        yield cluster


def make_images(root: Path, count: int) -> Path:
    for i in range(count):
        folder = root / f"class_{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:05d}.jpg").write_bytes(jpeg_bytes(seed=i, size=(64, 48)))
    return root


class Extract:
    """`fc7 extract` as a user runs it against the cluster, its output read as it comes."""

    def __init__(self, cluster: RayCluster, *args: str):
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "extract", *args, "--weights", "random:0"],
            env=dict(cluster.client_env(), PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        self.errors: list[str] = []
        threading.Thread(target=self._read, args=(self.process.stdout, self.lines),
                         daemon=True).start()
        threading.Thread(target=self._read, args=(self.process.stderr, self.errors),
                         daemon=True).start()

    def __enter__(self) -> Extract:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:  # the test failed while it ran
            self.process.kill()
            self.process.wait(timeout=30)

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_for(self, condition, what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"fc7 extract ended before {what}: {self.output}"
            assert time.monotonic() < deadline, f"no {what} in {timeout} s: {self.output}"
            time.sleep(0.2)

    def finish(self, timeout: float = 400) -> int:
        code = self.process.wait(timeout=timeout)
        time.sleep(0.2)  # the reader threads take the last lines
        return code

    @property
    def text(self) -> str:
        """Everything the run printed, both streams."""
        return "".join(self.lines) + "".join(self.errors)

    @property
    def error(self) -> str:
        """The error `fc7 extract` ended with: its last `error:` line, not a Ray log line
        printed after it (a raylet's warning about a full disk, say)."""
        errors = [line for line in self.errors if line.startswith("fc7 extract: error:")]
        assert errors, f"fc7 extract printed no error: {self.output}"
        return errors[-1]

    @property
    def output(self) -> str:
        """The ends of both streams, for failure messages."""
        return "".join(self.lines)[-4000:] + "".join(self.errors)[-4000:]


def run_record(out: Path) -> dict:
    (record,) = sorted((out / "_plan").glob("run-*.json"))[-1:]
    return json.loads(record.read_text())


def nodes_by_label(record: dict) -> dict[str, str]:
    return {label: node for node, info in record["nodes"].items() for label in info["labels"]}


def assert_each_image_once(out: Path, images: Path) -> None:
    ids = pq.read_table(out, columns=["id"]).column("id").to_pylist()
    expected = {str(p.relative_to(images)) for p in images.rglob("*.jpg")}
    assert len(ids) == len(set(ids)) and set(ids) == expected
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_lost_node_and_a_joining_node_mid_run(cluster, tmp_path):
    images = make_images(tmp_path / "images", 2400)
    out = tmp_path / "out"
    with Extract(cluster, str(images), "--out", str(out), "--shard-size", "16") as run:
        run.wait_for(lambda: sum("+1 worker" in line for line in run.lines) >= 2, "two workers")
        run.wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 6, "six parts")
        # A node vanishes with work in flight, as a preempted spot node does; another joins.
        cluster.kill_node("node_b")
        cluster.add_node("node_c")
        assert run.finish() == 0, run.output

    record = run_record(out)
    node = nodes_by_label(record)
    ran_on = {shard["node"] for shard in record["shards"].values()}
    # Parts were written on both first nodes, and on the node that joined.
    assert {node["node_a"], node["node_b"], node["node_c"]} <= ran_on
    assert record["outcome"] == "complete" and record["lost_workers"] >= 1
    events = " | ".join(event["event"] for event in record["events"])
    assert "-1 worker on node" in events and "joined" in events, events
    # The whole text: Ray's logs of the lost node can push these lines out of `output`'s tail.
    assert "-1 worker on node" in run.text and "shards given back" in run.text, run.output
    assert_each_image_once(out, images)
    assert len(record["shards"]) == 2400 // 16


def test_a_shard_that_crashes_every_worker_ends_the_run_named(cluster, tmp_path):
    images = make_images(tmp_path / "images", 60)
    out = tmp_path / "out"
    args = (str(images), "--out", str(out), "--shard-size", "6")
    poison = "class_1/img_00031.jpg"  # the first of shard 5: folders are planned in order
    cluster.crash_file.write_text(poison + "\n")
    try:
        with Extract(cluster, *args) as run:
            assert run.finish() == 1, run.output
    finally:
        cluster.crash_file.unlink()
    message = run.error
    assert "shard 5 failed on 3 different workers" in message, run.output
    assert f"first inputs: {images / poison}, " in message, message  # where to look
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert run_record(out)["outcome"].startswith("failed: PoisonShardError")

    # Without the fault, the same command finishes the run: each image once.
    with Extract(cluster, *args) as again:
        assert again.finish() == 0, again.output
    assert_each_image_once(out, images)


def test_a_worker_larger_than_every_node_fails_at_once_naming_the_nodes(cluster, tmp_path):
    images = make_images(tmp_path / "images", 3)
    args = (str(images), "--out", str(tmp_path / "out"), "--cpus-per-worker", "4")
    with Extract(cluster, *args) as run:
        assert run.finish(timeout=120) == 2, run.output  # a usage error, before any actor
    message = run.error
    assert "no node of the Ray cluster can hold one worker of 4 CPU (nodes: " in message
    assert message.count("(1 CPU, 0 GPU)") == 2 and "(0 CPU, 0 GPU)" in message


# The index build on the same cluster (a cluster's start is half a minute of the suite): Ray
# tasks fill the IVF lists, one node is lost mid-build, and the index equals the one built in a
# single process byte for byte.
def build(embeddings: Path, out: Path, **options):
    config = IndexConfig(embeddings=str(embeddings), out=str(out), **options)
    return build_index(config, EmbeddingDataset.open(str(embeddings)))


def test_ray_build_on_two_nodes_equals_the_local_build_with_a_node_lost(
    cluster: RayCluster, tmp_path: Path
) -> None:
    # After the tests above, node_b is lost and node_c has joined: two nodes all the same.
    *_, victim = live = cluster.live_workers()
    assert len(live) == 2, live
    x, labels = clustered_vectors(200_000, 32, clusters=200, seed=5)
    emb = write_embeddings(tmp_path / "emb", x, labels=[str(c) for c in labels], shards=40)
    options = ["--kind", "ivf-pq", "--train-sample", "20000"]
    build(emb, tmp_path / "local", kind="ivf-pq", train_sample=20000, runner="local")

    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "index", str(emb), "--out", str(tmp_path / "ray"),
         *options, "--runner", "ray"],
        env=dict(cluster.client_env(), PYTHONUNBUFFERED="1"), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Both streams read by threads to the end: `communicate` would race them for the lines.
    output: list[str] = []
    errors: list[str] = []
    readers = [
        threading.Thread(target=lambda: output.extend(process.stdout), daemon=True),
        threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("merged range 1/" in line for line in errors):
            assert process.poll() is None, "".join(errors)
            assert time.monotonic() < deadline, "".join(errors)
            time.sleep(0.05)
        cluster.kill_node(victim)  # mid-build: its task and the parts it holds are lost
        killed_at = len(errors)
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    for reader in readers:
        reader.join(timeout=30)
    out = "".join(output)
    log = "".join(errors)
    assert process.returncode == 0, log
    total = int(log.split("merged range 1/")[1].split()[0])
    assert any(f"merged range {total}/{total}" in line for line in errors[killed_at:]), log
    assert "vectors added by Ray tasks" in out
    for name in ("index.faiss", IDS_FILE, LOOKUP_FILE):
        assert filecmp.cmp(tmp_path / "local" / name, tmp_path / "ray" / name, shallow=False)
    local = json.loads((tmp_path / "local" / "manifest.json").read_text())
    ray = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert ray["runner"] == "ray" and local["runner"] == "local"
    assert ray["recall_at_10"] == local["recall_at_10"]
    assert ray["search_params"] == local["search_params"]


