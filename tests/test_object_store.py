"""Extraction from and to an object store: a real S3 API (moto's server) on loopback."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray
from conftest import REPO

import pipeline.fs
from jobs.extract import main as extract
from pipeline.store import EmbeddingDataset

pytestmark = pytest.mark.slow
MOTO = Path(sys.executable).with_name("moto_server")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}


@pytest.fixture(scope="module")
def s3_query():
    """An S3 server on a free loopback port; yields the URI query that points pyarrow at it."""
    if not MOTO.exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = dict(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1")
    # Credentials come from the environment, as on a real cluster; Ray's workers inherit it,
    # so the Ray this process may have started earlier is stopped first.
    saved = {key: os.environ.get(key) for key in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    ray.shutdown()
    try:
        s3 = pafs.S3FileSystem(allow_bucket_creation=True, **options)
        deadline = time.monotonic() + 30
        while True:
            try:
                s3.create_dir("photos")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for path in sorted((REPO / "examples/images").rglob("*.jpg")):
            relative = path.relative_to(REPO / "examples/images")
            with s3.open_output_stream(f"photos/in/{relative}") as stream:
                stream.write(path.read_bytes())
        with s3.open_output_stream("photos/in/broken/not-an-image.jpg") as stream:
            stream.write(b"<html>nope</html>")
        yield "&".join(f"{key}={value}" for key, value in options.items())
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.wait(timeout=30)


def test_extract_reads_and_writes_s3_and_resumes(s3_query, capsys):
    source, out = f"s3://photos/in?{s3_query}", f"s3://photos/embeddings?{s3_query}"
    assert extract([source, "--out", out, "--weights", "random:0", "--shard-size", "5"]) == 0
    data = EmbeddingDataset.open(out)
    assert data.count() == 12 and data.count(with_errors=True) == 13
    rows = {r["id"]: r for r in data.dataset.to_table(columns=["id", "path", "label", "error"])
            .to_pylist()}
    assert rows["dalmatian/image_0001.jpg"]["label"] == "dalmatian"
    assert rows["dalmatian/image_0001.jpg"]["path"].startswith("s3://photos/in/dalmatian/")
    assert rows["broken/not-an-image.jpg"]["error"].startswith("not an image")
    assert extract([source, "--out", out, "--weights", "random:0", "--shard-size", "5"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_worker_makes_one_s3_client_for_all_its_shards(s3_query, monkeypatch):
    made = []

    class CountingPyarrowFs:
        """pyarrow.fs as pipeline.fs sees it, recording every file system it makes."""

        def __getattr__(self, name):
            return getattr(pafs, name)

        class FileSystem:
            @staticmethod
            def from_uri(uri):
                made.append(uri)
                return pafs.FileSystem.from_uri(uri)

    monkeypatch.setattr(pipeline.fs, "pafs", CountingPyarrowFs())
    pipeline.fs._filesystem.cache_clear()
    source, out = f"s3://photos/in?{s3_query}", f"s3://photos/counted?{s3_query}"
    assert extract([source, "--out", out, "--weights", "random:0", "--shard-size", "4",
                    "--runner", "local"]) == 0
    assert EmbeddingDataset.open(out).count(with_errors=True) == 13  # 4 shards, 13 reads
    assert made == [f"s3://photos?{s3_query}"]
