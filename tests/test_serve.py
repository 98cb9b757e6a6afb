"""`fc7 serve`: every endpoint through FastAPI's test client, on an index built by `fc7 index`.

Oracles: neighbours are recomputed with numpy from the stored embeddings (exact index), query
images are embedded independently with `Embedder`, predictions with the loaded `Classifier`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from conftest import (
    EPS_BYTES,
    clustered_vectors,
    jpeg_bytes,
    test_provenance,
    write_embeddings,
    write_labelled_folder,
)
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from jobs.build_index import main as build_index
from jobs.serve import main
from jobs.train_classifier import main as train_classifier
from pipeline.classify import Classifier
from pipeline.config import parse_config
from pipeline.errors import ArtifactError, ConfigError, ProvenanceMismatch
from pipeline.fs import resolve
from pipeline.model import Embedder, load_weights
from pipeline.serve import ServeConfig, background_server, create_app, default_allowed_hosts
from pipeline.sources import iter_inputs
from pipeline.store import EmbeddingDataset, build_table, embeddings_to_numpy
from pipeline.store import write_table_atomically as write_atomically

CLASSES, PER_CLASS = 3, 5
# The server answers loopback host names only; TestClient's default host is "testserver".
LOCAL = "http://127.0.0.1"


def local(app: FastAPI) -> TestClient:
    """A test client that names the loopback host, as a browser on this machine would."""
    return TestClient(app, base_url=LOCAL)


def extract(folder: Path, out: Path) -> Path:
    """An extraction output of `folder` (random:0 fc7), as `fc7 extract` writes it, without Ray."""
    inputs = list(iter_inputs(str(folder)))
    embedder = Embedder(load_weights("random:0"), "fc7", "cpu")
    data = [Path(i.path).read_bytes() for i in inputs]
    vectors, errors = embedder.embed_bytes(data)
    table = build_table(
        embedder.provenance.stamped(),
        [i.id for i in inputs],
        [i.path for i in inputs],
        [i.label for i in inputs],
        vectors,
        errors,
        [hashlib.sha256(d).hexdigest() for d in data],  # as fc7 extract records it
    )
    out.mkdir(parents=True)
    fs, base = resolve(str(out))
    write_atomically(table, fs, f"{base}/part-00000.parquet")
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Images, their embeddings, an exact index and a classifier, built once for the module."""
    root = tmp_path_factory.mktemp("serve")
    images = write_labelled_folder(root / "images", CLASSES, PER_CLASS)
    embeddings = extract(images, root / "embeddings")
    assert build_index([str(embeddings), "--out", str(root / "index")]) == 0
    assert train_classifier([str(embeddings), "--out", str(root / "classifier")]) == 0
    dataset = EmbeddingDataset.open(str(embeddings))
    table = next(dataset.batches(["id", "path", "label", "embedding"]))
    return {
        "root": root,
        "images": images,
        "index": root / "index",
        "classifier": root / "classifier",
        "ids": table["id"].to_pylist(),
        "paths": table["path"].to_pylist(),
        "labels": table["label"].to_pylist(),
        "vectors": embeddings_to_numpy(table["embedding"]),
    }


@pytest.fixture(scope="module")
def client(built: dict) -> TestClient:
    return local(create_app(str(built["index"]), str(built["classifier"]), device="cpu"))


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(load_weights("random:0"), "fc7", "cpu")


def oracle(built: dict, query: np.ndarray, metric: str) -> tuple[list[str], np.ndarray]:
    """Exact neighbours of `query` among the stored vectors: ids and scores, best first."""
    vectors = built["vectors"]
    if metric == "l2":
        scores = ((vectors - query) ** 2).sum(axis=1)
        order = np.argsort(scores, kind="stable")
    elif metric == "ip":
        scores = vectors @ query
        order = np.argsort(-scores, kind="stable")
    else:  # cosine similarity: inner product of unit vectors
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        scores = unit @ (query / np.linalg.norm(query))
        order = np.argsort(-scores, kind="stable")
    return [built["ids"][i] for i in order], scores[order]


# --- id queries, items, info ----------------------------------------------------------------------


def test_health_and_info_describe_the_index(client: TestClient, built: dict) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["items"] == CLASSES * PER_CLASS
    assert health["mmap"] is False  # a small index is read into memory unless --mmap
    info = client.get("/info").json()
    assert info["size"] == CLASSES * PER_CLASS
    manifest = json.loads((built["index"] / "manifest.json").read_text())
    assert info["dim"] == 4096 == manifest["dim"]
    assert (info["kind"], info["factory"]) == (manifest["kind"], manifest["factory"])
    # 15 rows: `--kind auto` searches exactly, and exact search is its own oracle.
    assert info["kind"] == "flat" and info["recall"] == manifest["recall_at_10"] == 1.0
    stored = EmbeddingDataset.open(str(built["root"] / "embeddings")).provenance
    assert info["provenance"]["weights_sha256"] == stored.weights_sha256
    assert info["provenance"]["layer"] == "fc7"
    assert sorted(info["classifier"]["classes"]) == [f"class_{c}" for c in range(CLASSES)]


def test_items_return_what_the_index_recorded(client: TestClient, built: dict) -> None:
    for item_id, path, label in zip(built["ids"], built["paths"], built["labels"], strict=True):
        assert client.get(f"/items/{item_id}").json() == {
            "id": item_id,
            "path": path,
            "label": label,
        }
    response = client.get("/items/class_9/nothing.jpg")
    assert response.status_code == 404 and "nothing.jpg" in response.json()["detail"]


def test_id_search_matches_numpy_and_never_loads_the_model(built: dict) -> None:
    client = local(create_app(str(built["index"]), device="cpu"))
    metric = client.get("/info").json()["metric"]
    for row, item_id in enumerate(built["ids"]):
        body = client.get("/search", params={"id": item_id, "k": 6}).json()
        ids, scores = oracle(built, built["vectors"][row], metric)
        ids, scores = ids[1:7], scores[1:7]  # without the item itself
        assert body["query"]["id"] == item_id
        assert [r["id"] for r in body["results"]] == ids
        np.testing.assert_allclose([r["score"] for r in body["results"]], scores, atol=1e-4)
        assert all(r["label"] == r["id"].split("/")[0] for r in body["results"])
    itself = client.get("/search", params={"id": built["ids"][0], "k": 1, "include_self": True})
    assert itself.json()["results"][0]["id"] == built["ids"][0]
    assert client.get("/health").json()["model_loaded"] is False


def test_paging_returns_slices_of_the_full_ranking(client: TestClient, built: dict) -> None:
    first = built["ids"][3]
    full = client.get("/search", params={"id": first, "k": 12}).json()["results"]
    pages = [
        client.get("/search", params={"id": first, "k": 4, "offset": offset}).json()
        for offset in (0, 4, 8)
    ]
    assert [r for page in pages for r in page["results"]] == full
    assert [page["offset"] for page in pages] == [0, 4, 8]
    # Asking past the end of the index returns what there is, not an error.
    tail = client.get("/search", params={"id": first, "k": 50, "offset": 10}).json()
    assert len(tail["results"]) == CLASSES * PER_CLASS - 1 - 10


def test_a_memory_mapped_ivf_index_serves_what_it_serves_from_memory(tmp_path: Path) -> None:
    # Id queries only: generated vectors have no model. A mapped IVF index keeps no direct map,
    # so its id queries re-read the item's vector from the source embeddings.
    x, labels = clustered_vectors(1500, 32, seed=21)
    embeddings = write_embeddings(tmp_path / "embeddings", x, labels=[str(c) for c in labels])
    index = str(tmp_path / "index")
    assert build_index([str(embeddings), "--out", index, "--kind", "ivf-flat"]) == 0
    mapped = local(create_app(index, device="cpu", mmap=True))
    read = local(create_app(index, device="cpu", mmap=False))
    assert mapped.get("/health").json()["mmap"] is True
    assert read.get("/health").json()["mmap"] is False
    for row in range(0, 1500, 100):
        params = {"id": f"img_{row:06d}.jpg", "k": 8, "offset": 2}
        by_mapped = mapped.get("/search", params=params).json()
        by_read = read.get("/search", params=params).json()
        assert [r["id"] for r in by_mapped["results"]] == [r["id"] for r in by_read["results"]]
        np.testing.assert_allclose(
            [r["score"] for r in by_mapped["results"]],
            [r["score"] for r in by_read["results"]],
            atol=1e-6,
        )
        assert by_mapped["query"] == by_read["query"]
    assert mapped.get("/search", params={"id": "nope.jpg"}).status_code == 404


@pytest.mark.parametrize(
    "params",
    [{"id": "nope.jpg"}, {"id": "../images/class_0/img_0.jpg"}],
)
def test_id_search_for_unknown_ids_is_404(client: TestClient, params: dict) -> None:
    response = client.get("/search", params=params)
    assert response.status_code == 404 and params["id"] in response.json()["detail"]


@pytest.mark.parametrize("params", [{"k": 0}, {"k": 100_000}, {"offset": -1}, {}])
def test_bad_query_parameters_are_422(client: TestClient, built: dict, params: dict) -> None:
    if params:
        params = {"id": built["ids"][0]} | params
    assert client.get("/search", params=params).status_code == 422


# --- image queries ------------------------------------------------------------------------------


def test_an_uploaded_indexed_image_finds_itself_first(
    client: TestClient, built: dict, embedder: Embedder
) -> None:
    metric = client.get("/info").json()["metric"]
    for path in built["paths"][::4]:
        data = Path(path).read_bytes()
        body = client.post("/search", params={"k": 5}, files={"image": ("q.jpg", data)}).json()
        query = embedder.embed_bytes([data])[0][0]
        ids, scores = oracle(built, query, metric)
        assert body["results"][0]["path"] == path
        assert [r["id"] for r in body["results"]] == ids[:5]
        np.testing.assert_allclose([r["score"] for r in body["results"]], scores[:5], atol=1e-3)
    assert client.get("/health").json()["model_loaded"] is True


def test_image_search_and_classify_return_the_classifier_prediction(
    client: TestClient, built: dict, embedder: Embedder
) -> None:
    classifier = Classifier.load(str(built["classifier"]))
    data = jpeg_bytes(seed=77)
    expected = classifier.predict_proba_top(embedder.embed_bytes([data])[0], k=3)[0]
    searched = client.post("/search", params={"top": 3}, files={"image": ("x.jpg", data)})
    classified = client.post("/classify", params={"top": 3}, files={"image": ("x.jpg", data)})
    for prediction in (searched.json()["prediction"], classified.json()):
        assert prediction["label"] == expected[0][0]
        assert prediction["score_kind"] == classifier.score_kind == "probability"
        assert [entry["label"] for entry in prediction["top"]] == [e[0] for e in expected]
        np.testing.assert_allclose(
            [entry["score"] for entry in prediction["top"]],
            [e[1] for e in expected],
            atol=1e-4,
        )


def test_without_a_classifier_there_is_no_prediction(built: dict) -> None:
    client = local(create_app(str(built["index"]), device="cpu"))
    data = Path(built["paths"][0]).read_bytes()
    assert "prediction" not in client.post("/search", files={"image": ("a.jpg", data)}).json()
    response = client.post("/classify", files={"image": ("a.jpg", data)})
    assert response.status_code == 404 and "--classifier" in response.json()["detail"]


def test_a_classifier_of_other_features_is_refused(built: dict, tmp_path: Path) -> None:
    vectors = np.random.default_rng(0).random((12, 4096), dtype=np.float32)
    other = write_embeddings(tmp_path / "other", vectors, labels=["a", "b", "c"] * 4)
    assert train_classifier([str(other), "--out", str(tmp_path / "model")]) == 0
    with pytest.raises(ProvenanceMismatch, match="classifier"):
        create_app(str(built["index"]), str(tmp_path / "model"), device="cpu")


def test_an_index_whose_model_cannot_be_rebuilt_still_answers_id_queries(tmp_path: Path) -> None:
    # Generated vectors carry a made-up weights sha256: random:0 rebuilt here does not match it.
    vectors = np.random.default_rng(1).random((8, 4096), dtype=np.float32)
    embeddings = write_embeddings(tmp_path / "embeddings", vectors)
    assert build_index([str(embeddings), "--out", str(tmp_path / "index")]) == 0
    client = local(create_app(str(tmp_path / "index"), device="cpu"))
    assert (
        len(client.get("/search", params={"id": "img_000003.jpg", "k": 3}).json()["results"]) == 3
    )
    response = client.post("/search", files={"image": ("a.jpg", jpeg_bytes(seed=1))})
    assert response.status_code == 503 and "sha256" in response.json()["detail"]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", 0)
        + b"IEND"
        + struct.pack(">I", zlib.crc32(b"IEND"))
    )


@pytest.mark.parametrize(
    ("name", "data", "status", "words"),
    [
        ("notes.txt", b"hello, I am not a picture\n" * 20, 415, "not an image"),
        ("empty.jpg", b"", 400, "empty"),
        ("header.jpg", jpeg_bytes(seed=5)[:300], 400, "unreadable image header"),
        ("cut.jpg", jpeg_bytes(seed=5, size=(300, 200))[:1500], 400, "truncated"),
        ("bomb.png", _png_header(50_000, 50_000), 413, "max-pixels"),
        ("page.html", b"<html><body>../../etc/passwd</body></html>", 415, "not an image"),
        ("vector.jpg", EPS_BYTES, 415, "not an image"),  # Pillow would run Ghostscript on it
        ("thin.png", _png_header(2, 1_000_000), 413, "aspect ratio"),
    ],
)
def test_unusable_uploads_get_a_clear_4xx(
    client: TestClient, name: str, data: bytes, status: int, words: str
) -> None:
    for endpoint in ("/search", "/classify"):
        response = client.post(endpoint, files={"image": (name, data)})
        assert response.status_code == status, response.text
        assert words in response.json()["detail"]
    assert client.get("/health").json()["status"] == "ok"


def test_pixel_limit_is_configurable(built: dict) -> None:
    client = local(create_app(str(built["index"]), max_pixels=96 * 72 - 1, device="cpu"))
    response = client.post("/search", files={"image": ("a.jpg", jpeg_bytes(seed=1))})
    assert response.status_code == 413 and "96x72" in response.json()["detail"]


def _noise_jpeg(width: int, height: int) -> bytes:
    """A JPEG that does not compress much (random pixels), to reach a size on purpose."""
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_oversize_uploads_are_413_declared_or_streamed(built: dict) -> None:
    client = local(create_app(str(built["index"]), max_upload=20_000, device="cpu"))
    small, large, near = _noise_jpeg(40, 30), _noise_jpeg(400, 300), _noise_jpeg(140, 140)
    assert len(small) < 20_000 < len(near) < 20_000 + 64 * 1024 < len(large)
    assert client.post("/search", files={"image": ("s.jpg", small)}).status_code == 200
    declared = client.post("/search", files={"image": ("l.jpg", large)})
    assert declared.status_code == 413 and "max-upload" in declared.json()["detail"]
    # No Content-Length: the body is counted as it arrives.
    request = client.build_request("POST", "/search", files={"image": ("l.jpg", large)})
    body = request.read()
    streamed = client.post(
        "/search",
        content=iter([body[i : i + 8192] for i in range(0, len(body), 8192)]),
        headers={"content-type": request.headers["content-type"]},
    )
    assert streamed.status_code == 413 and "max-upload" in streamed.json()["detail"]
    # Within the multipart envelope's slack, the endpoint's own check of the file answers.
    response = client.post("/search", files={"image": ("n.jpg", near)})
    assert response.status_code == 413
    assert "larger than --max-upload 20,000" in response.json()["detail"]


# --- thumbnails and path traversal ---------------------------------------------------------------


def test_thumbnails_are_small_jpegs_of_the_indexed_image(client: TestClient, built: dict) -> None:
    for item_id, path in zip(built["ids"][:3], built["paths"][:3], strict=True):
        response = client.get(f"/thumbnails/{item_id}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(response.content))
        original = Image.open(path)
        assert thumb.format == "JPEG" and max(thumb.size) <= 192
        assert abs(thumb.width / thumb.height - original.width / original.height) < 0.05
        # Same picture: compare with the original scaled down the same way.
        reference = np.asarray(original.convert("RGB").resize(thumb.size), dtype=np.float32)
        assert np.abs(np.asarray(thumb, dtype=np.float32) - reference).mean() < 12
        assert client.get(f"/thumbnails/{item_id}").content == response.content


def test_thumbnail_of_a_deleted_file_is_404_not_500(built: dict, tmp_path: Path) -> None:
    images = write_labelled_folder(tmp_path / "images", classes=1, per_class=3)
    embeddings = extract(images, tmp_path / "embeddings")
    assert build_index([str(embeddings), "--out", str(tmp_path / "index")]) == 0
    client = local(create_app(str(tmp_path / "index"), device="cpu"))
    (images / "class_0" / "img_1.jpg").unlink()
    (images / "class_0" / "img_2.jpg").write_bytes(b"no longer an image")
    assert client.get("/thumbnails/class_0/img_0.jpg").status_code == 200
    for gone in ("class_0/img_1.jpg", "class_0/img_2.jpg"):
        response = client.get(f"/thumbnails/{gone}")
        assert response.status_code == 404 and "indexed" in response.json()["detail"]


class _Audited:
    """What this process does, seen through Python's audit hooks: files opened under a folder
    (event "open"), or processes started ("subprocess.Popen", "os.posix_spawn", ...).

    Audit hooks cannot be removed, so one hook is installed once and records only while a
    recorder is active.
    """

    active: list[_Audited] = []
    installed = False

    def __init__(self, *events: str, under: Path | None = None):
        self.events = events
        self.under = None if under is None else str(under)
        self.seen: list[str] = []
        self.lock = threading.Lock()
        if not _Audited.installed:
            sys.addaudithook(_Audited._hook)
            _Audited.installed = True

    @staticmethod
    def _hook(event: str, args: tuple) -> None:
        for recorder in list(_Audited.active):
            if event in recorder.events:
                recorder._record(event, args)

    def _record(self, event: str, args: tuple) -> None:
        if self.under is None:
            seen = f"{event} {args[:2]!r}"
        elif isinstance(args[0], (str, Path)):
            seen = os.path.abspath(os.fspath(args[0]))
            if not seen.startswith(self.under):
                return
        else:
            return
        with self.lock:
            self.seen.append(seen)

    def __enter__(self) -> _Audited:
        _Audited.active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _Audited.active.remove(self)


SPAWNING = ("subprocess.Popen", "os.posix_spawn", "os.exec", "os.spawn", "os.system")


def test_path_traversal_is_refused_and_reads_only_indexed_files(
    built: dict, tmp_path_factory: pytest.TempPathFactory
) -> None:
    client = local(create_app(str(built["index"]), device="cpu"))  # empty thumbnail cache
    base = tmp_path_factory.getbasetemp()
    secret = base / "secret.jpg"
    secret.write_bytes(jpeg_bytes(seed=999))
    indexed = built["images"] / "class_0" / "img_0.jpg"
    relative = os.path.relpath(secret, built["images"] / "class_0")
    attempts = [
        f"/thumbnails/class_0/{relative}",
        "/thumbnails/../../../../etc/passwd",
        "/thumbnails/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/thumbnails/%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.jpg",
        "/thumbnails/class_0/%2e%2e/%2e%2e/%2e%2e/secret.jpg",
        f"/thumbnails/{secret}",
        f"/thumbnails//{secret}",
        f"/thumbnails/{str(secret).replace('/', '%2F')}",
        f"/thumbnails/file://{secret}",
        f"/thumbnails/{indexed}",  # the path of an indexed file is not its id
        f"/items/{secret}",
        "/items/..%2F..%2Fsecret.jpg",
        f"/search?id={secret}",
        "/search?id=..%2F..%2F..%2Fsecret.jpg",
        "/static/../../secret.jpg",
        "/static/%2e%2e%2f%2e%2e%2fserve.py",
        "/static/..%2fserve.py",
    ]
    with _Audited("open", under=base) as opened:
        for url in attempts:
            response = client.get(url)
            assert response.status_code in (400, 404), url
            assert response.headers["content-type"] != "image/jpeg", url
            assert b"def create_app" not in response.content, url
        assert not opened.seen, opened.seen
        assert client.get("/thumbnails/class_0/img_0.jpg").status_code == 200
    assert opened.seen == [str(indexed)]


# --- hostile clients: foreign hosts and origins, stalled requests -------------------------------


def _every_kind_of_request(built: dict) -> list[tuple[str, str, dict]]:
    item = built["ids"][0]
    return [
        ("GET", "/", {}),
        ("GET", "/info", {}),
        ("GET", f"/items/{item}", {}),
        ("GET", f"/thumbnails/{item}", {}),
        ("GET", "/search", {"params": {"id": item}}),
        ("POST", "/search", {"files": {"image": ("a.jpg", jpeg_bytes(seed=1))}}),
    ]


def test_requests_naming_a_foreign_host_are_400(client: TestClient, built: dict) -> None:
    # What a page on attacker.example sends after rebinding its name to 127.0.0.1.
    foreign = ["attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example"]
    for host in foreign:
        for method, url, kwargs in _every_kind_of_request(built):
            response = client.request(method, url, headers={"host": host}, **kwargs)
            assert response.status_code == 400, (host, method, url)
            assert "host" in response.text.lower()
            assert b"class_0" not in response.content
    for host in ("127.0.0.1", "127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000"):
        assert client.get("/info", headers={"host": host}).status_code == 200, host


def test_allowed_hosts_default_to_the_bound_address_and_can_be_named(built: dict) -> None:
    loopback = ["127.0.0.1", "localhost", "::1", "[::1]"]
    for host in ("127.0.0.1", "localhost", "::1"):
        assert default_allowed_hosts(host) == loopback
    assert default_allowed_hosts("192.0.2.7") == ["192.0.2.7", *loopback]
    assert default_allowed_hosts("fe80::1") == ["fe80::1", "[fe80::1]", *loopback]
    assert default_allowed_hosts("0.0.0.0") == default_allowed_hosts("::") == ["*"]

    named = local(
        create_app(str(built["index"]), device="cpu", allowed_hosts=["search.example.org"])
    )
    assert named.get("/info", headers={"host": "search.example.org:8000"}).status_code == 200
    assert named.get("/info").status_code == 400  # loopback names only when none are given
    wildcard = local(create_app(str(built["index"]), device="cpu", allowed_hosts=["*.example.net"]))
    assert wildcard.get("/info", headers={"host": "a.example.net"}).status_code == 200
    assert wildcard.get("/info", headers={"host": "example.org"}).status_code == 400
    anyone = local(create_app(str(built["index"]), device="cpu", allowed_hosts=["*"]))
    assert anyone.get("/info", headers={"host": "attacker.example"}).status_code == 200

    for bad in ([], ["a*b.example"], ["http://a.example"], ["two words"]):
        with pytest.raises(ConfigError, match="allowed hosts"):
            create_app(str(built["index"]), device="cpu", allowed_hosts=bad)
    with pytest.raises(ConfigError, match="--allowed-hosts"):
        main([str(built["index"]), "--allowed-hosts", "search.example.org,*bad.example"])


def test_unsafe_requests_from_another_origin_are_403(built: dict) -> None:
    client = local(create_app(str(built["index"]), str(built["classifier"]), device="cpu"))
    files = {"image": ("a.jpg", jpeg_bytes(seed=3))}
    foreign = [
        "http://attacker.example",
        "http://127.0.0.1:8000",  # another port is another origin
        "https://127.0.0.1",  # and so is another scheme (port 443)
        "http://127.0.0.1.attacker.example",
        "null",  # a sandboxed frame or a file: page
    ]
    for origin in foreign:
        for endpoint in ("/search", "/classify"):
            response = client.post(endpoint, files=files, headers={"origin": origin})
            assert response.status_code == 403, (origin, endpoint)
            assert origin in response.json()["detail"]
    # Refused before any work: no upload reached the model.
    assert client.get("/health").json()["model_loaded"] is False
    assert client.get("/info", headers={"origin": "http://attacker.example"}).status_code == 200
    assert client.post("/search", files=files, headers={"origin": LOCAL}).status_code == 200
    assert client.post("/classify", files=files).status_code == 200  # no Origin: curl, scripts


def test_every_response_carries_the_security_headers(client: TestClient, built: dict) -> None:
    item = built["ids"][0]
    responses = {
        "page": client.get("/"),
        "info": client.get("/info"),
        "item": client.get(f"/items/{item}"),
        "thumbnail": client.get(f"/thumbnails/{item}"),
        "script": client.get("/static/app.js"),
        "404": client.get("/items/nothing.jpg"),
        "422": client.get("/search", params={"id": item, "k": 0}),
        "415": client.post("/search", files={"image": ("a.txt", b"plain text " * 9)}),
        "400 host": client.get("/info", headers={"host": "attacker.example"}),
        "403 origin": client.post("/search", headers={"origin": "http://attacker.example"}),
    }
    for name, response in responses.items():
        assert response.headers["x-content-type-options"] == "nosniff", name
        assert response.headers["x-frame-options"] == "DENY", name
        assert response.headers["referrer-policy"] == "no-referrer", name
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"], name
    policy = dict(
        directive.strip().split(" ", 1)
        for directive in responses["page"].headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'self'" and "script-src" not in policy
    assert "unsafe" not in responses["page"].headers["content-security-policy"]
    assert policy["object-src"] == "'none'" and policy["base-uri"] == "'none'"
    # The policy allows no inline code, so the page must have none: no inline script or style
    # element, no event-handler or style attribute.
    page = responses["page"].text
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page)
    assert not re.search(r"<style|\son[a-z]+\s*=|\sstyle\s*=", page, re.IGNORECASE)
    for linked in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
        response = client.get(linked)
        assert response.status_code == 200, linked
        kind = "javascript" if linked.endswith(".js") else "css"
        assert kind in response.headers["content-type"], linked
    # FastAPI's API docs load Swagger UI from a CDN with inline code: no page policy there.
    docs = client.get("/docs")
    assert "content-security-policy" not in docs.headers
    assert docs.headers["x-content-type-options"] == "nosniff"


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _read_until_closed(sock: socket.socket, limit: float = 15) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when that was."""
    sock.settimeout(limit)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic()


def test_a_client_that_stalls_mid_request_is_cut_off(built: dict) -> None:
    app = create_app(str(built["index"]), device="cpu", request_timeout=1.0)
    request = httpx.Request(
        "POST", "http://127.0.0.1/search", files={"image": ("q.jpg", jpeg_bytes(seed=4))}
    )
    body = request.read()
    head = (
        "POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: {request.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with background_server(app) as url:
        # Half a body, then nothing: 408 once the deadline passes, and the connection closed.
        with socket.create_connection(_host_port(url)) as sock:
            started = time.monotonic()
            sock.sendall(head + body[: len(body) // 2])
            answer, ended = _read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"connection: close" in answer.lower() and b"--request-timeout" in answer
        assert 0.9 < ended - started < 4

        # A body trickled a byte at a time: the deadline is for the whole body, not per read.
        with socket.create_connection(_host_port(url)) as sock:
            started = time.monotonic()
            sock.sendall(head)
            sock.settimeout(0.1)
            answer = b""
            for byte in body:
                with contextlib.suppress(OSError):  # the server may have answered and closed
                    sock.sendall(bytes([byte]))
                with contextlib.suppress(TimeoutError):
                    answer = sock.recv(65536)
                if answer or time.monotonic() - started > 10:
                    break
            ended = time.monotonic()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert 0.9 < ended - started < 4

        # Half a request head, or nothing at all: closed without an answer.
        for partial in (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", b""):
            with socket.create_connection(_host_port(url)) as sock:
                started = time.monotonic()
                sock.sendall(partial)
                answer, ended = _read_until_closed(sock)
            assert answer == b"", answer[:300]
            assert 0.9 < ended - started < 4, partial

        # A prompt client on a kept-alive connection is unaffected.
        with httpx.Client(base_url=url) as http:
            for _ in range(2):
                response = http.post("/search", files={"image": ("q.jpg", jpeg_bytes(seed=4))})
                assert response.status_code == 200
                time.sleep(0.6)  # twice that exceeds the deadline, but each request is prompt


def test_connections_beyond_max_connections_get_503(built: dict) -> None:
    app = create_app(str(built["index"]), device="cpu")
    with background_server(app, max_connections=3) as url:
        idle = [socket.create_connection(_host_port(url)) for _ in range(2)]
        try:
            # A third connection is refused once the server has registered the idle two.
            deadline = time.monotonic() + 10
            while (status := httpx.get(url + "/health").status_code) != 503:
                assert status == 200 and time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 10
        while (status := httpx.get(url + "/health").status_code) == 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert status == 200


# --- hostile files: formats, bombs, memory, odd ids -----------------------------------------------

# Ids that a URL or Starlette's `path` convertor could get wrong: a newline and other control
# characters, percent signs, the query and fragment delimiters, dot segments, unicode.
ODD_IDS = [
    "new\nline.jpg",
    "tab\tand\rreturn\x07.jpg",
    "100% sure.jpg",
    "%2F..%2Fencoded.jpg",
    "what?k=5.jpg",
    "#hash.jpg",
    "../escape.jpg",
    "a/../b.jpg",
    "ünïcødé 名前.jpg",
    "trailing newline\n",
]


def _png(mode: str, size: tuple[int, int], color: int | tuple = 0) -> bytes:
    """A PNG of one color: a few KB however many pixels it has."""
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index whose ids are ODD_IDS (small JPEGs), plus "vector.eps", an EPS file, and
    "huge.png", a 100-megapixel 1-bit PNG: files an index may name but a server must not
    decode blindly."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "images").mkdir()
    paths = []
    for i, _ in enumerate(ODD_IDS):
        paths.append(root / "images" / f"{i}.jpg")
        paths[-1].write_bytes(jpeg_bytes(seed=i))
    paths.append(root / "images" / "vector.eps")
    paths[-1].write_bytes(EPS_BYTES)
    paths.append(root / "images" / "huge.png")
    paths[-1].write_bytes(_png("1", (10_000, 10_000), 1))
    ids = [*ODD_IDS, "vector.eps", "huge.png"]
    vectors = np.random.default_rng(0).random((len(ids), 64), dtype=np.float32)
    table = build_table(
        test_provenance(dim=64),
        ids,
        [str(path) for path in paths],
        [None] * len(ids),
        vectors,
        [None] * len(ids),
    )
    (root / "embeddings").mkdir()
    fs, base = resolve(str(root / "embeddings"))
    write_atomically(table, fs, f"{base}/part-00000.parquet")
    assert build_index([str(root / "embeddings"), "--out", str(root / "index")]) == 0
    return root / "index"


def test_ids_with_newlines_and_url_characters_resolve(hostile_index: Path) -> None:
    # Through uvicorn: Starlette's TestClient decodes a path twice, so "%25" would reach the app
    # as "%" and then as whatever follows it.
    app = create_app(str(hostile_index), device="cpu")
    with background_server(app) as url, httpx.Client(base_url=url) as client:
        for item in ODD_IDS:
            quoted = quote(item, safe="")
            found = client.get(f"/items/{quoted}")
            assert found.status_code == 200, item
            assert found.json()["id"] == item
            thumbnail = client.get(f"/thumbnails/{quoted}")
            assert thumbnail.status_code == 200, item
            assert thumbnail.content[:3] == b"\xff\xd8\xff"
            body = client.get("/search", params={"id": item, "k": 3}).json()
            assert body["query"]["id"] == item and len(body["results"]) == 3
        assert client.get("/items/" + quote("new\nline.jpg\n", safe="")).status_code == 404


def test_eps_is_refused_by_format_as_upload_and_as_thumbnail(hostile_index: Path) -> None:
    client = local(create_app(str(hostile_index), device="cpu"))
    with _Audited(*SPAWNING) as spawned:
        upload = client.post("/search", files={"image": ("vector.eps", EPS_BYTES)})
        as_jpeg = client.post("/search", files={"image": ("photo.jpg", EPS_BYTES)})
        thumbnail = client.get("/thumbnails/vector.eps")
    for response in (upload, as_jpeg):
        assert response.status_code == 415, response.text
        assert "not an image" in response.json()["detail"]
        assert "JPEG, PNG" in response.json()["detail"]
    assert thumbnail.status_code == 404 and "not an image" in thumbnail.json()["detail"]
    assert not spawned.seen, spawned.seen  # Pillow's EPS plugin would start Ghostscript


class _PeakRSS:
    """The largest resident set size growth of this process during a block, sampled every 2 ms
    (ru_maxrss cannot tell: it keeps the peak of whatever ran before)."""

    def __enter__(self) -> _PeakRSS:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


MiB = 1024**2


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_huge_and_thin_uploads_are_refused_or_embedded_in_bounded_memory(built: dict) -> None:
    # Measured here: each refusal below grows RSS by under 1 MiB, the 2000x2000 upload by about
    # 50 MiB. Unguarded, "bits" takes 620 MiB and "thin" 98 GB (its resize to 256 pixels wide).
    client = local(create_app(str(built["index"]), device="cpu", decode_memory=256 * MiB))
    assert client.post("/search", files={"image": ("a.jpg", jpeg_bytes(seed=1))}).status_code == 200
    refused = {
        "thin": (_png("L", (2, 1_000_000)), "extreme aspect ratio"),
        "wide": (_png("L", (100_000, 4)), "extreme aspect ratio"),
        "tall": (_png("RGB", (4, 100_000)), "extreme aspect ratio"),
        "bits": (_png("1", (10_000, 10_000), 1), "--decode-memory"),  # 100 MP, 32 KB
    }
    for name, (data, words) in refused.items():
        with _PeakRSS() as rss:
            response = client.post("/search", files={"image": (f"{name}.png", data)})
        assert response.status_code == 413, (name, response.text)
        assert words in response.json()["detail"], name
        assert rss.growth < 64 * MiB, (name, rss.growth)
    with _PeakRSS() as rss:
        big = client.post("/search", files={"image": ("big.png", _png("RGB", (2000, 2000), 90))})
    assert big.status_code == 200 and len(big.json()["results"]) == 10
    assert rss.growth < 512 * MiB, rss.growth


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_thumbnails_are_bounded_by_the_decode_memory(hostile_index: Path) -> None:
    client = local(create_app(str(hostile_index), device="cpu", decode_memory=256 * MiB))
    with _PeakRSS() as rss:
        response = client.get("/thumbnails/huge.png")
    assert response.status_code == 404
    assert "too large to decode" in response.json()["detail"]
    assert rss.growth < 64 * MiB, rss.growth
    assert client.get("/thumbnails/" + quote(ODD_IDS[0], safe="")).status_code == 200


def test_uploads_and_thumbnails_wait_for_the_shared_decode_budget(built: dict) -> None:
    app = create_app(str(built["index"]), device="cpu")
    client = local(app)
    files = {"image": ("a.jpg", jpeg_bytes(seed=2))}
    assert client.post("/search", files=files).status_code == 200  # loads the model
    budget = app.state.service.decode_budget
    assert app.state.service.index.embedder().decode_budget is budget
    with ThreadPoolExecutor(2) as pool:
        with budget.reserve(budget.capacity - 1000, "this test"):
            thumbnail = pool.submit(client.get, f"/thumbnails/{built['ids'][1]}")
            upload = pool.submit(client.post, "/search", files=files)
            done, _ = wait([thumbnail, upload], timeout=1.0)
            assert not done  # both wait while the memory is held
        assert thumbnail.result(timeout=60).status_code == 200
        assert upload.result(timeout=60).status_code == 200


# --- the page, the API description, the command line ---------------------------------------------


def test_page_and_openapi_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="results"' in page.text and 'id="file"' in page.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/search",
        "/items/{item_id}",
        "/thumbnails/{item_id}",
        "/health",
        "/info",
        "/classify",
        "/map",
        "/duplicates",
        "/issues",
    } <= set(paths)
    assert set(paths["/search"]) == {"get", "post"}
    assert client.get("/docs").status_code == 200


def test_concurrent_requests_on_a_real_server_match_serial_answers(built: dict) -> None:
    app = create_app(str(built["index"]), device="cpu")
    ids = built["ids"]
    images = [Path(p).read_bytes() for p in built["paths"][:4]]
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:

        def by_id(item_id: str) -> list[str]:
            response = http.get("/search", params={"id": item_id, "k": 5})
            response.raise_for_status()
            return [r["id"] for r in response.json()["results"]]

        def by_image(data: bytes) -> list[str]:
            response = http.post("/search", params={"k": 5}, files={"image": ("q.jpg", data)})
            response.raise_for_status()
            return [r["id"] for r in response.json()["results"]]

        serial_ids = [by_id(i) for i in ids]
        serial_images = [by_image(d) for d in images]
        with ThreadPoolExecutor(8) as pool:
            id_futures = [pool.submit(by_id, i) for i in ids * 3]
            image_futures = [pool.submit(by_image, d) for d in images * 2]
            assert [f.result() for f in id_futures] == serial_ids * 3
            assert [f.result() for f in image_futures] == serial_images * 2


def test_allowed_hosts_are_one_comma_separated_flag_or_a_yaml_list(tmp_path: Path) -> None:
    # One argument, so that INDEX_DIR may follow the flag.
    config = parse_config(
        ServeConfig, ["--allowed-hosts", "a.example, *.b.example", "out/index"], "fc7 serve", ""
    )
    assert config.index_dir == "out/index"
    assert config.host_patterns == ["a.example", "*.b.example"]
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text("index_dir: out/index\nallowed_hosts: [a.example, '*']\n")
    from_yaml = parse_config(ServeConfig, ["--config", str(yaml_file)], "fc7 serve", "")
    assert from_yaml.host_patterns == ["a.example", "*"]
    assert parse_config(ServeConfig, ["out/index"], "fc7 serve", "").host_patterns is None


def test_cli_help_shows_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in (
        "(default: 127.0.0.1)",
        "(default: 8000)",
        "(default: 20MB)",
        "(default: 100000000)",
        "(default: none)",
        "(default: 2GiB)",
        "(default: 30.0)",
        "(default: 100)",
    ):
        assert expected in text
    for flag in (
        "--allowed-hosts",
        "--decode-memory",
        "--request-timeout",
        "--max-connections",
        "--mmap",
        "--map MAP_DIR",
        "--duplicates DUP_DIR",
        "--audit AUDIT_DIR",
    ):
        assert flag in text


def test_fc7_serve_command_serves_the_index_on_loopback(built: dict) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "serve",
        str(built["index"]),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "warning",
        "--allowed-hosts",
        "127.0.0.1,search.example.org",
        "--decode-memory",
        "1MiB",
        "--mmap",
    ]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "fc7 serve did not start"
                time.sleep(0.2)
        assert health.json()["items"] == CLASSES * PER_CLASS
        assert health.json()["mmap"] is True
        item = httpx.get(f"http://127.0.0.1:{port}/items/{built['ids'][0]}").json()
        assert item["path"] == built["paths"][0]
        url = f"http://127.0.0.1:{port}/info"
        named = httpx.get(url, headers={"host": "search.example.org"}).json()
        assert named["limits"]["decode_memory"] == 1024 * 1024
        assert httpx.get(url, headers={"host": "localhost"}).status_code == 400  # not listed
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in stderr
    assert "(memory-mapped, searched on the CPU)" in stderr


def test_cli_refuses_bad_options_and_missing_index(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--max-upload"):
        main([str(tmp_path), "--max-upload", "lots"])
    with pytest.raises(ConfigError, match="--port"):
        main([str(tmp_path), "--port", "70000"])
    with pytest.raises(ConfigError, match="--decode-memory"):
        main([str(tmp_path), "--decode-memory", "lots"])
    with pytest.raises(ConfigError, match="--request-timeout"):
        main([str(tmp_path), "--request-timeout", "0"])
    with pytest.raises(ArtifactError):
        main([str(tmp_path / "missing")])
