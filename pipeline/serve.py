"""`fc7 serve`: a built similarity index over HTTP, with a search web page.

One index is opened at start-up and shared read-only by all requests; the embedding model is
loaded on the first image query only, so a server answering id queries never pays for it.
Endpoints are plain `def` functions, which FastAPI runs in its thread pool: the event loop keeps
accepting requests while a query embeds an image or searches the index.

Safety: an id from a request is only ever a key into the index's id map, never part of a file
path, so `/thumbnails/../../etc/passwd` is an unknown id (404) and the only files this server
reads are the images the index names. Uploads are refused above `max_upload` bytes (413) before
they are parsed, and above `max_pixels` pixels from the image header, before decoding (413).

Example:
    $ fc7 serve out/index --classifier out/classifier --port 8000
    $ curl -F image=@cat.jpg 'http://127.0.0.1:8000/search?k=5'
    $ curl 'http://127.0.0.1:8000/search?id=cats/cat1.jpg&k=5'
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field, field_validator

from pipeline import __version__
from pipeline.classify import Classifier
from pipeline.config import JobConfig, add_option, load_config, new_parser, parse_size
from pipeline.decode import DEFAULT_MAX_PIXELS, ImageDecodeError
from pipeline.errors import ArtifactError, ConfigError, PipelineError
from pipeline.model import Embedder
from pipeline.search import Match, SimilarityIndex
from pipeline.sources import read_image_bytes

STATIC = Path(__file__).resolve().parent / "static"
MAX_K = 1000
# Room for the multipart envelope (boundaries, part headers, a `k` field) around the image.
MULTIPART_SLACK = 64 * 1024
THUMBNAIL_CACHE_BYTES = 64 * 1024 * 1024
# Query parameters shared by the endpoints (module level: annotations are resolved by name).
K = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
OFFSET = Annotated[int, Query(ge=0, le=MAX_K, description="results to skip (paging)")]
TOP = Annotated[int, Query(ge=1, le=100, description="classes in a prediction")]
IMAGE = Annotated[UploadFile, File(description="an image file")]


class ServeConfig(JobConfig):
    """Options of `fc7 serve`."""

    index_dir: str
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    classifier: str | None = None
    max_upload: int = Field("20MB", validate_default=True, gt=0)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    thumbnail_size: int = Field(192, ge=16, le=1024)
    device: Literal["auto", "cpu", "gpu"] = "auto"
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    @field_validator("max_upload", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)


class _Service:
    """What the endpoints share: the index, an optional classifier, the lazy model, thumbnails."""

    def __init__(
        self,
        index: SimilarityIndex,
        classifier: Classifier | None,
        max_upload: int,
        max_pixels: int,
        thumbnail_size: int,
    ):
        self.index = index
        self.classifier = classifier
        self.max_upload = max_upload
        self.max_pixels = max_pixels
        self.thumbnail_size = thumbnail_size
        self._model_loaded = False
        self._thumbnails: OrderedDict[str, bytes] = OrderedDict()
        self._thumbnail_bytes = 0
        self._thumbnail_lock = threading.Lock()

    @property
    def model_loaded(self) -> bool:
        return self._model_loaded

    def embedder(self) -> Embedder:
        """The model the index was built with; the index loads it once, on first use."""
        embedder = self.index.embedder()
        self._model_loaded = True
        return embedder

    def embed_upload(self, data: bytes) -> np.ndarray:
        """One uploaded image as a (1, dim) vector; HTTPException 4xx when it is not usable."""
        if len(data) > self.max_upload:
            raise HTTPException(
                413,
                f"the uploaded file is larger than --max-upload {self.max_upload:,} bytes; "
                "send a smaller image",
            )
        check_image_header(data, self.max_pixels)
        vectors, errors = self.embedder().embed_bytes([data], max_pixels=self.max_pixels)
        if errors[0] is not None:
            raise HTTPException(400, f"cannot use the uploaded image: {errors[0]}")
        return vectors

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[Match]:
        # SimilarityIndex may be searched from several threads (it locks a GPU index itself).
        return self.index.search_vectors(vectors, k=k)[0]

    def search_id(self, item_id: str, k: int, include_self: bool) -> list[Match]:
        try:
            return self.index.search_ids([item_id], k=k, include_self=include_self)[0]
        except KeyError:
            raise HTTPException(404, f"no item with id {item_id!r} in this index") from None

    def thumbnail(self, item_id: str) -> bytes:
        """A small JPEG of the indexed image `item_id`, made once and kept in a bounded cache."""
        with self._thumbnail_lock:
            if item_id in self._thumbnails:
                self._thumbnails.move_to_end(item_id)
                return self._thumbnails[item_id]
        # The path comes from the index's own map, never from the request.
        path = lookup(self.index, item_id).path
        data = make_thumbnail(read_indexed_file(path), self.thumbnail_size, self.max_pixels)
        with self._thumbnail_lock:
            if item_id not in self._thumbnails:
                self._thumbnails[item_id] = data
                self._thumbnail_bytes += len(data)
            while self._thumbnail_bytes > THUMBNAIL_CACHE_BYTES and len(self._thumbnails) > 1:
                _, dropped = self._thumbnails.popitem(last=False)
                self._thumbnail_bytes -= len(dropped)
        return data


def check_image_header(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """Refuse what is not an image (415) or has too many pixels (413), from the header only.

    Args:
        data: the uploaded bytes.
        max_pixels: the largest width*height accepted (the decompression-bomb guard).

    Returns:
        (format, width, height) as the header gives them.

    Raises:
        HTTPException: 400 empty or unreadable header, 415 not an image format, 413 too large.

    Example:
        >>> check_image_header(open("cat.jpg", "rb").read(), 10**8)  # doctest: +SKIP
        ('JPEG', 500, 375)
    """
    if not data:
        raise HTTPException(400, "the uploaded file is empty (0 bytes); send an image file")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise HTTPException(
            415,
            f"the uploaded file is not an image (it starts with {data[:16]!r}); "
            "send a JPEG, PNG, GIF, BMP, TIFF or WebP file",
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise HTTPException(400, f"the uploaded image has an unreadable header: {err}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise HTTPException(
            413,
            f"the uploaded image is {width}x{height} = {width * height:,} pixels, more than "
            f"--max-pixels {max_pixels:,}; send a smaller image",
        )
    return image.format or "unknown", width, height


def read_indexed_file(path: str) -> bytes:
    """The bytes of an image named by the index (a local path or a URI such as s3://...).

    Raises:
        HTTPException: 404 when the file is gone or unreadable.
    """
    try:
        return read_image_bytes(path)
    except (OSError, ValueError) as err:
        raise HTTPException(404, f"the indexed image {path} cannot be read: {err}") from None


def make_thumbnail(data: bytes, size: int, max_pixels: int) -> bytes:
    """A JPEG at most `size` pixels on its longer side, upright (EXIF) and in RGB.

    Raises:
        HTTPException: 404 when the indexed file is not a decodable image any more.
    """
    # No warnings.catch_warnings() here: it is not thread-safe, and requests run in threads.
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ImageDecodeError(f"{image.width}x{image.height} exceeds --max-pixels")
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
        image = ImageOps.exif_transpose(image).convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    except (ImageDecodeError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise HTTPException(
            404, f"no thumbnail: the indexed file is not a usable image ({err})"
        ) from None
    return buffer.getvalue()


def lookup(index: SimilarityIndex, item_id: str) -> Match:
    """The indexed item `item_id`; HTTPException 404 when the index has no such id."""
    try:
        return index.item(item_id)
    except KeyError:
        raise HTTPException(404, f"no item with id {item_id!r} in this index") from None


def _match(match: Match) -> dict[str, Any]:
    return {"id": match.id, "path": match.path, "label": match.label, "score": match.score}


class _UploadLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413 before parsing them.

    A declared Content-Length is checked before reading anything; a chunked body is counted as
    it arrives, so a client cannot make the server spool an unbounded upload to disk.
    """

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send, declared.decode(errors="replace") + " bytes")
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.limit:
                await self._refuse(send, f"more than {total:,} bytes")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any, size: str) -> None:
        upload = self.limit - MULTIPART_SLACK
        response = JSONResponse(
            {
                "detail": f"request body of {size} exceeds the upload limit "
                f"(--max-upload {upload:,} bytes); send a smaller image"
            },
            status_code=413,
            headers={"Connection": "close"},
        )
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


def create_app(
    index_dir: str,
    classifier_dir: str | None = None,
    max_upload: int = 20_000_000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    thumbnail_size: int = 192,
    device: str = "auto",
) -> FastAPI:
    """The FastAPI application serving the index in `index_dir`.

    Args:
        index_dir: an index built by `fc7 index`.
        classifier_dir: a classifier trained by `fc7 train` on the same features, or None.
        max_upload: largest accepted upload, in bytes (413 above it).
        max_pixels: largest accepted width*height of an uploaded image (413 above it).
        thumbnail_size: longer side of thumbnails, in pixels.
        device: "auto" (a GPU for the index and the model when there is one), "cpu" or "gpu".

    Returns:
        The app; run it with uvicorn, or test it with `fastapi.testclient.TestClient`.

    Raises:
        ArtifactError: the index or classifier is missing or corrupt.
        ProvenanceMismatch: the classifier was trained on different features than the index.

    Example:
        >>> app = create_app("out/index")  # doctest: +SKIP
        >>> TestClient(app).get("/info").json()["size"]  # doctest: +SKIP
        8677
    """
    index = SimilarityIndex.open(index_dir, device=device)
    classifier = None
    if classifier_dir is not None:
        classifier = Classifier.load(classifier_dir)
        index.provenance.require_compatible(
            classifier.provenance, mine=f"index {index_dir}", theirs=f"classifier {classifier_dir}"
        )
    service = _Service(index, classifier, max_upload, max_pixels, thumbnail_size)
    app = FastAPI(
        title="fc7 similar images",
        version=__version__,
        description="Find the indexed images most similar to an uploaded image or an indexed id.",
    )
    app.state.service = service
    app.add_middleware(_UploadLimit, limit=max_upload + MULTIPART_SLACK)

    @app.exception_handler(PipelineError)
    def _pipeline_error(request: Any, err: PipelineError) -> JSONResponse:
        # E.g. the recorded weights cannot be loaded here: the service is up, image queries not.
        return JSONResponse({"detail": str(err)}, status_code=503)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", summary="Liveness, and whether the model is loaded yet")
    def health() -> dict[str, Any]:
        return {"status": "ok", "items": len(index), "model_loaded": service.model_loaded}

    @app.get("/info", summary="The index: kind, size, dimension, recall, provenance")
    def info() -> dict[str, Any]:
        manifest = index.manifest
        return {
            "kind": manifest.get("kind"),
            "factory": manifest.get("factory"),
            "metric": index.metric,
            "score": index.score_meaning,
            "size": len(index),
            "dim": index.dim,
            "recall": manifest.get("recall_at_10"),
            "provenance": index.provenance.model_dump(mode="json"),
            "classifier": None
            if classifier is None
            else {
                "classes": list(classifier.classes),
                "provenance": classifier.provenance.model_dump(mode="json"),
            },
            "limits": {"max_upload": max_upload, "max_pixels": max_pixels, "max_k": MAX_K},
        }

    @app.get("/items/{item_id:path}", summary="An indexed item's id, path and label")
    def item(item_id: str) -> dict[str, Any]:
        found = lookup(index, item_id)
        return {"id": found.id, "path": found.path, "label": found.label}

    @app.get(
        "/thumbnails/{item_id:path}",
        summary="A small JPEG of an indexed image",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    def thumbnail(item_id: str) -> Response:
        return Response(
            service.thumbnail(item_id),
            media_type="image/jpeg",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    @app.get("/search", summary="Neighbours of an indexed item, from its stored vector")
    def search_by_id(
        id: Annotated[str, Query(description="an id of the index")],
        k: K = 10,
        offset: OFFSET = 0,
        include_self: bool = False,
    ) -> dict[str, Any]:
        query = lookup(index, id)
        matches = service.search_id(id, _depth(index, k, offset), include_self)
        return {
            "query": _match(query) | {"score": None},
            "offset": offset,
            "results": [_match(m) for m in matches[offset : offset + k]],
        }

    @app.post("/search", summary="Neighbours of an uploaded image (embedded like the index)")
    def search_by_image(
        image: IMAGE,
        k: K = 10,
        offset: OFFSET = 0,
        top: TOP = 5,
    ) -> dict[str, Any]:
        vectors = service.embed_upload(_read(image, max_upload))
        matches = service.search_vectors(vectors, _depth(index, k, offset))
        answer: dict[str, Any] = {
            "offset": offset,
            "results": [_match(m) for m in matches[offset : offset + k]],
        }
        if classifier is not None:
            answer["prediction"] = _prediction(classifier, vectors, top)
        return answer

    @app.post("/classify", summary="The classifier's label for an uploaded image")
    def classify(
        image: IMAGE,
        top: TOP = 5,
    ) -> dict[str, Any]:
        if classifier is None:
            raise HTTPException(404, "no classifier loaded: start the server with --classifier")
        return _prediction(classifier, service.embed_upload(_read(image, max_upload)), top)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _read(upload: UploadFile, max_upload: int) -> bytes:
    # One byte more than allowed is enough to know it is too large.
    return upload.file.read(max_upload + 1)


def _depth(index: SimilarityIndex, k: int, offset: int) -> int:
    return max(1, min(k + offset, len(index)))


def _prediction(classifier: Classifier, vectors: np.ndarray, top: int) -> dict[str, Any]:
    ranked = classifier.predict_proba_top(vectors, k=min(top, len(classifier.classes)))[0]
    return {
        "label": ranked[0][0],
        # "probability" for probabilistic classifiers, else "decision_function" scores.
        "score_kind": classifier.score_kind,
        "top": [{"label": label, "score": float(score)} for label, score in ranked],
    }


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread (tests, benchmarks, notebooks).

    Args:
        app: from `create_app`.
        host: address to bind.
        port: TCP port; 0 picks a free one.

    Returns:
        A context manager giving the base URL, e.g. "http://127.0.0.1:54321"; the server stops
        when the block ends.

    Raises:
        RuntimeError: the server did not start within 30 seconds.

    Example:
        >>> with background_server(create_app("out/index")) as url:  # doctest: +SKIP
        ...     httpx.get(url + "/health").json()
    """
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fc7-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{host}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def main(argv: list[str] | None = None) -> int:
    """`fc7 serve INDEX_DIR [options]`: open the index, then serve it until interrupted.

    Raises:
        ConfigError: an invalid option.
        ArtifactError, ProvenanceMismatch: the index or classifier cannot be used.
    """
    parser = new_parser(
        prog="fc7 serve",
        description="Serve an index built by `fc7 index` over HTTP, with a search page at /\n"
        "and the API documented at /docs.",
        epilog="example:\n  fc7 serve out/index --classifier out/classifier --port 8000\n"
        "  then open http://127.0.0.1:8000/",
    )
    parser.add_argument("index_dir", metavar="INDEX_DIR", help="an index built by `fc7 index`")
    add_option(
        parser, "--host", ServeConfig, "address to bind; 0.0.0.0 exposes the service to the network"
    )
    add_option(parser, "--port", ServeConfig, "TCP port (0 picks a free one)", type=int)
    add_option(
        parser,
        "--classifier",
        ServeConfig,
        "a model folder from `fc7 train`: image searches also return its predicted label",
        metavar="MODEL_DIR",
    )
    add_option(
        parser,
        "--max-upload",
        ServeConfig,
        "largest accepted upload, e.g. 20MB, 512KiB",
        metavar="SIZE",
    )
    add_option(
        parser,
        "--max-pixels",
        ServeConfig,
        "largest accepted width*height of an uploaded image (decompression-bomb guard)",
        type=int,
        metavar="N",
    )
    add_option(
        parser,
        "--thumbnail-size",
        ServeConfig,
        "longer side of thumbnails in pixels",
        type=int,
        metavar="PX",
    )
    add_option(
        parser,
        "--device",
        ServeConfig,
        "auto (a GPU for FAISS and the model when there is one), cpu or gpu",
        choices=["auto", "cpu", "gpu"],
    )
    add_option(
        parser,
        "--log-level",
        ServeConfig,
        "uvicorn log level: critical, error, warning, info, debug",
    )
    config = load_config(ServeConfig, parser.parse_args(argv))
    try:
        import uvicorn
    except ImportError as err:  # pragma: no cover - uvicorn is a core dependency
        raise ConfigError("fc7 serve needs uvicorn: pip install 'uvicorn>=0.27'") from err
    if not Path(config.index_dir).exists() and "://" not in config.index_dir:
        raise ArtifactError(f"{config.index_dir}: no such index folder (build one with fc7 index)")
    app = create_app(
        config.index_dir,
        config.classifier,
        config.max_upload,
        config.max_pixels,
        config.thumbnail_size,
        config.device,
    )
    size = len(app.state.service.index)
    print(
        f"fc7 serve: {size:,} items from {config.index_dir}; open "
        f"http://{config.host}:{config.port}/ (API docs at /docs)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
    return 0
