"""`fc7 serve`: every endpoint through FastAPI's test client, on an index built by `fc7 index`.

Oracles: neighbours are recomputed with numpy from the stored embeddings (exact index), query
images are embedded independently with `Embedder`, predictions with the loaded `Classifier`.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import jpeg_bytes, write_embeddings, write_labelled_folder
from fastapi.testclient import TestClient
from PIL import Image

from jobs.build_index import main as build_index
from jobs.train_classifier import main as train_classifier
from pipeline.classify import Classifier
from pipeline.config import parse_size
from pipeline.errors import ArtifactError, ConfigError, ProvenanceMismatch
from pipeline.model import Embedder, load_weights
from pipeline.serve import background_server, create_app, main
from pipeline.sources import iter_inputs
from pipeline.store import EmbeddingDataset, build_table, embeddings_to_numpy, resolve
from pipeline.store import write_table_atomically as write_atomically

CLASSES, PER_CLASS = 3, 5


def extract(folder: Path, out: Path) -> Path:
    """An extraction output of `folder` (random:0 fc7), as `fc7 extract` writes it, without Ray."""
    inputs = list(iter_inputs(str(folder)))
    embedder = Embedder(load_weights("random:0"), "fc7", "cpu")
    vectors, errors = embedder.embed_bytes([Path(i.path).read_bytes() for i in inputs])
    table = build_table(
        embedder.provenance.stamped(),
        [i.id for i in inputs],
        [i.path for i in inputs],
        [i.label for i in inputs],
        vectors,
        errors,
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
    return TestClient(create_app(str(built["index"]), str(built["classifier"]), device="cpu"))


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
    info = client.get("/info").json()
    assert info["size"] == CLASSES * PER_CLASS
    assert info["dim"] == 4096 and info["kind"]
    assert info["recall"] is None or 0.0 <= info["recall"] <= 1.0
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
    client = TestClient(create_app(str(built["index"]), device="cpu"))
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
    client = TestClient(create_app(str(built["index"]), device="cpu"))
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
    client = TestClient(create_app(str(tmp_path / "index"), device="cpu"))
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
        ("header.jpg", jpeg_bytes(seed=5)[:300], 400, "unreadable header"),
        ("cut.jpg", jpeg_bytes(seed=5, size=(300, 200))[:1500], 400, "truncated"),
        ("bomb.png", _png_header(50_000, 50_000), 413, "max-pixels"),
        ("page.html", b"<html><body>../../etc/passwd</body></html>", 415, "not an image"),
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
    client = TestClient(create_app(str(built["index"]), max_pixels=96 * 72 - 1, device="cpu"))
    response = client.post("/search", files={"image": ("a.jpg", jpeg_bytes(seed=1))})
    assert response.status_code == 413 and "96x72" in response.json()["detail"]


def _noise_jpeg(width: int, height: int) -> bytes:
    """A JPEG that does not compress much (random pixels), to reach a size on purpose."""
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_oversize_uploads_are_413_declared_or_streamed(built: dict) -> None:
    client = TestClient(create_app(str(built["index"]), max_upload=20_000, device="cpu"))
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
    client = TestClient(create_app(str(tmp_path / "index"), device="cpu"))
    (images / "class_0" / "img_1.jpg").unlink()
    (images / "class_0" / "img_2.jpg").write_bytes(b"no longer an image")
    assert client.get("/thumbnails/class_0/img_0.jpg").status_code == 200
    for gone in ("class_0/img_1.jpg", "class_0/img_2.jpg"):
        response = client.get(f"/thumbnails/{gone}")
        assert response.status_code == 404 and "indexed" in response.json()["detail"]


class _OpenedFiles:
    """Files opened by this process under a folder, seen through Python's audit hooks.

    Audit hooks cannot be removed, so one hook is installed once and records only while a
    recorder is active.
    """

    active: list[_OpenedFiles] = []
    installed = False

    def __init__(self, under: Path):
        self.under = str(under)
        self.paths: list[str] = []
        self.lock = threading.Lock()
        if not _OpenedFiles.installed:
            sys.addaudithook(_OpenedFiles._hook)
            _OpenedFiles.installed = True

    @staticmethod
    def _hook(event: str, args: tuple) -> None:
        if event != "open" or not _OpenedFiles.active or not isinstance(args[0], (str, Path)):
            return
        path = os.path.abspath(os.fspath(args[0]))
        for recorder in _OpenedFiles.active:
            if path.startswith(recorder.under):
                with recorder.lock:
                    recorder.paths.append(path)

    def __enter__(self) -> _OpenedFiles:
        _OpenedFiles.active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _OpenedFiles.active.remove(self)


def test_path_traversal_is_refused_and_reads_only_indexed_files(
    built: dict, tmp_path_factory: pytest.TempPathFactory
) -> None:
    client = TestClient(create_app(str(built["index"]), device="cpu"))  # empty thumbnail cache
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
    with _OpenedFiles(base) as opened:
        for url in attempts:
            response = client.get(url)
            assert response.status_code in (400, 404), url
            assert response.headers["content-type"] != "image/jpeg", url
            assert b"def create_app" not in response.content, url
        assert not opened.paths, opened.paths
        assert client.get("/thumbnails/class_0/img_0.jpg").status_code == 200
    assert opened.paths == [str(indexed)]


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


def test_parse_size() -> None:
    assert parse_size("20MB") == 20_000_000
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("1.5g") == 1_500_000_000
    assert parse_size("123") == 123 and parse_size(7) == 7
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


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
    ):
        assert expected in text


def test_fc7_serve_command_serves_the_index_on_loopback(built: dict) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "serve",
        str(built["index"]),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "warning",
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
        item = httpx.get(f"http://127.0.0.1:{port}/items/{built['ids'][0]}").json()
        assert item["path"] == built["paths"][0]
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in stderr


def test_cli_refuses_bad_options_and_missing_index(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--max-upload"):
        main([str(tmp_path), "--max-upload", "lots"])
    with pytest.raises(ConfigError, match="--port"):
        main([str(tmp_path), "--port", "70000"])
    with pytest.raises(ArtifactError):
        main([str(tmp_path / "missing")])
