"""`fc7 serve`: a built similarity index over HTTP, with a search web page.

One index is opened at start-up and shared read-only by all requests; the embedding model is
loaded on the first image query only, so a server answering id queries never pays for it.
Endpoints are plain `def` functions, which FastAPI runs in its thread pool: the event loop keeps
accepting requests while a query embeds an image or searches the index.

Safety: an id from a request is only ever a key into the index's id map, never part of a file
path, so `/thumbnails/../../etc/passwd` is an unknown id (404) and the only files this server
reads are the images the index names. Only requests naming an allowed host are answered (DNS
rebinding), and a browser's unsafe request from another origin is refused (403). Uploads are
refused above `max_upload` bytes (413) before they are parsed, and from the image header, before
decoding: formats outside `pipeline.decode.ALLOWED_FORMATS` (415), more than `max_pixels` (413).
Every decode, of an upload or a thumbnail, holds its estimated memory in one `DecodeBudget`, so
concurrent huge images wait for each other or are refused (413) rather than exhaust memory. A
request's head and body must arrive within `request_timeout` seconds.

Example:
    $ fc7 serve out/index --classifier out/classifier --port 8000
    $ curl -F image=@cat.jpg 'http://127.0.0.1:8000/search?k=5'
    $ curl 'http://127.0.0.1:8000/search?id=cats/cat1.jpg&k=5'
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import anyio
import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import ImageOps
from pydantic import Field, field_validator
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.trustedhost import TrustedHostMiddleware

from pipeline import __version__
from pipeline.classify import Classifier
from pipeline.config import JobConfig, add_option, load_config, new_parser, parse_size
from pipeline.decode import (
    DEFAULT_DECODE_MEMORY,
    DEFAULT_MAX_PIXELS,
    DecodeBudget,
    ImageDecodeError,
    decode_image,
    read_header,
)
from pipeline.errors import ArtifactError, ConfigError, PipelineError
from pipeline.model import Embedder
from pipeline.search import Match, SimilarityIndex
from pipeline.sources import read_image_bytes

STATIC = Path(__file__).resolve().parent / "static"
MAX_K = 1000
# Room for the multipart envelope (boundaries, part headers, a `k` field) around the image.
MULTIPART_SLACK = 64 * 1024
THUMBNAIL_CACHE_BYTES = 64 * 1024 * 1024
# Peak bytes per (drafted) source pixel while a thumbnail is made: the decoded image, its
# upright copy and its RGB copy, like `pipeline.decode`'s estimate for Pillow's color path.
THUMBNAIL_BYTES_PER_PIXEL = 16
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 100
# Names a loopback server is reached by; Starlette compares the Host header's host part, which
# keeps an IPv6 literal's brackets.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
ANY_ADDRESS = ("0.0.0.0", "::", "")
# The page loads its script and styles from /static and shows blob: previews of uploads; nothing
# inline, nothing from elsewhere, and no other site may frame it.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
DEFAULT_PORTS = {"http": 80, "https": 443}
# An ImageDecodeError's kind as an HTTP status: the client's file, not the server, is at fault.
DECODE_STATUS = {"empty": 400, "corrupt": 400, "format": 415, "size": 413}
# Query parameters shared by the endpoints (module level: annotations are resolved by name).
K = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
OFFSET = Annotated[int, Query(ge=0, le=MAX_K, description="results to skip (paging)")]
TOP = Annotated[int, Query(ge=1, le=100, description="classes in a prediction")]
IMAGE = Annotated[UploadFile, File(description="an image file")]


class _AnyId(Convertor[str]):
    """Starlette's `path` convertor matches `.*`, which stops at a newline: an id may hold any
    character, so `/items/{item_id:fc7_id}` matches everything after the prefix."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("fc7_id", _AnyId())


class ServeConfig(JobConfig):
    """Options of `fc7 serve`."""

    index_dir: str
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    allowed_hosts: list[str] | None = None
    classifier: str | None = None
    max_upload: int = Field("20MB", validate_default=True, gt=0)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    decode_memory: int = Field(
        f"{DEFAULT_DECODE_MEMORY / 1024**3:g}GiB", validate_default=True, gt=0
    )
    request_timeout: float = Field(DEFAULT_REQUEST_TIMEOUT, gt=0, le=3600)
    max_connections: int = Field(DEFAULT_MAX_CONNECTIONS, ge=1)
    thumbnail_size: int = Field(192, ge=16, le=1024)
    device: Literal["auto", "cpu", "gpu"] = "auto"
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    @field_validator("max_upload", "decode_memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        if isinstance(value, str):  # the flag, or YAML's `allowed_hosts: a.example,b.example`
            value = value.split(",")
        if isinstance(value, list):
            value = [str(host).strip() for host in value if str(host).strip()]
            check_host_patterns(value)
        return value


class _Service:
    """What the endpoints share: the index, an optional classifier, the lazy model, thumbnails."""

    def __init__(
        self,
        index: SimilarityIndex,
        classifier: Classifier | None,
        max_upload: int,
        max_pixels: int,
        thumbnail_size: int,
        decode_memory: int,
    ):
        self.index = index
        self.classifier = classifier
        self.max_upload = max_upload
        self.max_pixels = max_pixels
        self.thumbnail_size = thumbnail_size
        # One budget for every decode in this server: uploads (through the embedder) and
        # thumbnails, so neither kind can take the memory the other was promised.
        self.decode_budget = DecodeBudget(decode_memory)
        self._model_loaded = False
        self._embedder_lock = threading.Lock()
        self._thumbnails: OrderedDict[str, bytes] = OrderedDict()
        self._thumbnail_bytes = 0
        self._thumbnail_lock = threading.Lock()

    @property
    def model_loaded(self) -> bool:
        return self._model_loaded

    def embedder(self) -> Embedder:
        """The model the index was built with; the index loads it once, on first use."""
        embedder = self.index.embedder()
        with self._embedder_lock:
            if not self._model_loaded:
                # Embedder.matching gives it a budget of its own: share this server's instead.
                embedder.decode_budget = self.decode_budget
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
        try:
            read_header(data, self.max_pixels)  # a file that is no image never loads the model
            embedder = self.embedder()
            # decode_image rather than embed_bytes: its error keeps the kind (the status).
            tensor, _, _ = decode_image(
                data, embedder.preprocessing, self.max_pixels, self.decode_budget
            )
        except ImageDecodeError as err:
            raise self.refusal(err) from None
        return embedder(tensor[None])

    def refusal(self, err: ImageDecodeError) -> HTTPException:
        """The HTTP answer to an unusable upload: 400 empty or corrupt, 415 format, 413 size."""
        detail = f"cannot use the uploaded image: {err}"
        if err.kind == "size":
            memory = self.decode_budget.capacity / 1024**2
            detail += (
                f" (limits here: --max-pixels {self.max_pixels:,}, "
                f"--decode-memory {memory:,.0f} MiB)"
            )
        return HTTPException(DECODE_STATUS[err.kind], detail)

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
        data = make_thumbnail(
            read_indexed_file(path), self.thumbnail_size, self.max_pixels, self.decode_budget
        )
        with self._thumbnail_lock:
            if item_id not in self._thumbnails:
                self._thumbnails[item_id] = data
                self._thumbnail_bytes += len(data)
            while self._thumbnail_bytes > THUMBNAIL_CACHE_BYTES and len(self._thumbnails) > 1:
                _, dropped = self._thumbnails.popitem(last=False)
                self._thumbnail_bytes -= len(dropped)
        return data


def read_indexed_file(path: str) -> bytes:
    """The bytes of an image named by the index (a local path or a URI such as s3://...).

    Raises:
        HTTPException: 404 when the file is gone or unreadable.
    """
    try:
        return read_image_bytes(path)
    except (OSError, ValueError) as err:
        raise HTTPException(404, f"the indexed image {path} cannot be read: {err}") from None


def make_thumbnail(data: bytes, size: int, max_pixels: int, budget: DecodeBudget) -> bytes:
    """A JPEG at most `size` pixels on its longer side, upright (EXIF) and in RGB.

    The file is opened like any upload (`read_header`: allowed formats only, at most
    `max_pixels`), and decoded while holding its estimated memory in `budget`.

    Args:
        data: the indexed file's bytes.
        size: longer side of the thumbnail, in pixels.
        max_pixels: the largest width*height decoded.
        budget: the memory shared with the server's other decodes.

    Returns:
        The JPEG's bytes.

    Raises:
        HTTPException: 404 when the indexed file is not a usable image (any more), or too large
            to decode within `max_pixels` or `budget`.

    Example:
        >>> data = open("cat.jpg", "rb").read()  # doctest: +SKIP
        >>> make_thumbnail(data, 192, 10**8, DecodeBudget())[:3]  # doctest: +SKIP
        b'\xff\xd8\xff'
    """
    # No warnings.catch_warnings() here: it is not thread-safe, and requests run in threads.
    try:
        image = read_header(data, max_pixels)
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
        width, height = image.size  # after draft: the size that will be decoded
        needed = width * height * THUMBNAIL_BYTES_PER_PIXEL + len(data)
        with budget.reserve(needed, f"a {width}x{height} thumbnail"):
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except (ImageDecodeError, OSError, SyntaxError, ValueError, EOFError) as err:
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


def check_host_patterns(hosts: Sequence[str]) -> None:
    """Refuse host patterns that Starlette's TrustedHostMiddleware cannot use.

    Args:
        hosts: names or addresses (`search.example.org`, `192.0.2.7`, `[::1]`), `*.domain`
            patterns, or `*` for any host.

    Raises:
        ValueError: no host at all, or a pattern that is none of these.

    Example:
        >>> check_host_patterns(["search.example.org", "*.example.net"])
        >>> check_host_patterns(["http://search.example.org"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: 'http://search.example.org' is not a host name pattern: ...
    """
    if not hosts:
        raise ValueError("give at least one host name, or * to allow any host")
    for host in hosts:
        name = host.removeprefix("*.")
        odd = not name or "*" in name or any(c.isspace() or c in "/,@?#" for c in name)
        if host != "*" and odd:
            raise ValueError(
                f"{host!r} is not a host name pattern: use names like search.example.org, "
                "an address like 192.0.2.7, *.example.org, or * for any host"
            )


def default_allowed_hosts(host: str) -> list[str]:
    """The host names a server bound to `host` answers by default (see `--allowed-hosts`).

    A loopback bind answers loopback names only, so a web page that rebinds its own name to
    127.0.0.1 (DNS rebinding) gets 400; a specific address answers that address and loopback
    names; the any-address binds (0.0.0.0, ::) answer any host, since their names are unknown.

    Args:
        host: the address given to `--host`.

    Returns:
        Patterns for `TrustedHostMiddleware`; `["*"]` for any host.

    Example:
        >>> default_allowed_hosts("127.0.0.1")
        ['127.0.0.1', 'localhost', '::1', '[::1]']
        >>> default_allowed_hosts("192.0.2.7")
        ['192.0.2.7', '127.0.0.1', 'localhost', '::1', '[::1]']
    """
    if host in ANY_ADDRESS:
        return ["*"]
    if host in LOOPBACK_HOSTS:
        return list(LOOPBACK_HOSTS)
    # An IPv6 literal arrives in the Host header in brackets.
    own = [host, f"[{host}]"] if ":" in host else [host]
    return own + [name for name in LOOPBACK_HOSTS if name not in own]


class _SecurityHeaders:
    """ASGI middleware: headers every response carries, so a browser never sniffs a JSON answer
    or a thumbnail into HTML, never frames the page, and sends no Referer with its requests."""

    def __init__(self, app: Any, unpoliced: Sequence[str]):
        self.app = app
        # FastAPI's /docs and /redoc load Swagger UI and ReDoc from a CDN with inline scripts.
        self.unpoliced = set(unpoliced)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policed = scope["path"] not in self.unpoliced

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "no-referrer")
                if policed:
                    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _SameOrigin:
    """ASGI middleware: refuse (403) an unsafe request that a browser sent from another origin.

    Browsers send `Origin` with every POST; a page on another site could otherwise make a
    visitor's browser upload files here (cross-site request forgery). No Origin (curl, scripts)
    is allowed: only browsers are confused deputies. Same origin means the Origin's scheme, host
    and port are the request's scheme and Host header (behind a TLS proxy, uvicorn takes the
    scheme from X-Forwarded-Proto).
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            host = headers.get("host", "")
            if origin is not None and not _same_origin(origin, host, scope["scheme"]):
                detail = (
                    f"cross-origin request refused: Origin {origin!r} is not this server "
                    f"(Host {host!r}); use the page this server serves, or send no Origin"
                )
                await _answer(send, 403, detail)
                return
        await self.app(scope, receive, send)


def _same_origin(origin: str, host: str, scheme: str) -> bool:
    """Whether a browser's Origin is the server it sent the request to: same scheme, host and
    port, a port left out being the scheme's default (as browsers leave out 80 and 443)."""
    try:
        theirs, ours = urlsplit(origin), urlsplit(f"{scheme}://{host}")
        # "null" (sandboxed frames, file: pages) and anything odd has no scheme or hostname.
        if theirs.scheme not in DEFAULT_PORTS or not theirs.hostname or not ours.hostname:
            return False
        their_port = theirs.port or DEFAULT_PORTS[theirs.scheme]
        our_port = ours.port or DEFAULT_PORTS.get(scheme)
        return (theirs.scheme, theirs.hostname, their_port) == (scheme, ours.hostname, our_port)
    except ValueError:  # a port that is not a number
        return False


class _UploadLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes (413) before parsing them, and
    bodies that take longer than `timeout` seconds to arrive (408).

    A declared Content-Length is checked before reading anything; a chunked body is counted as
    it arrives, so a client cannot make the server spool an unbounded upload to disk. The
    deadline covers the whole body, so a client that sends half a body and stops, or trickles a
    byte at a time, holds its connection for `timeout` seconds at most.
    """

    def __init__(self, app: Any, limit: int, timeout: float):
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send, declared.decode(errors="replace") + " bytes")
            return
        try:
            with anyio.fail_after(self.timeout):
                body = await self._read(receive, send)
        except TimeoutError:
            detail = (
                f"the request body did not arrive within {self.timeout:g} seconds "
                "(--request-timeout); send it again"
            )
            await _answer(send, 408, detail)
            return
        if body is None:
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Any, send: Any) -> bytes | None:
        """The whole body, or None when the client left or the body was refused (answered)."""
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.limit:
                await self._refuse(send, f"more than {total:,} bytes")
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, send: Any, size: str) -> None:
        upload = self.limit - MULTIPART_SLACK
        detail = (
            f"request body of {size} exceeds the upload limit "
            f"(--max-upload {upload:,} bytes); send a smaller image"
        )
        await _answer(send, 413, detail)


async def _answer(send: Any, status: int, detail: str) -> None:
    """A JSON error sent from middleware, closing the connection: the rest of the request (a
    body not read, or still coming) must not be taken for the next request."""
    response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
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
    allowed_hosts: Sequence[str] | None = None,
    decode_memory: int = DEFAULT_DECODE_MEMORY,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> FastAPI:
    """The FastAPI application serving the index in `index_dir`.

    Args:
        index_dir: an index built by `fc7 index`.
        classifier_dir: a classifier trained by `fc7 train` on the same features, or None.
        max_upload: largest accepted upload, in bytes (413 above it).
        max_pixels: largest accepted width*height of an uploaded image (413 above it).
        thumbnail_size: longer side of thumbnails, in pixels.
        device: "auto" (a GPU for the index and the model when there is one), "cpu" or "gpu".
        allowed_hosts: host names (patterns like `*.example.org`, or `*`) requests may name in
            their Host header, others get 400; None allows the loopback names only (see
            `default_allowed_hosts`).
        decode_memory: bytes that concurrent decodes (uploads, thumbnails) may hold at once;
            an image needing more on its own is refused (413 upload, 404 thumbnail).
        request_timeout: seconds a request body may take to arrive (408 after it); `main` and
            `background_server` also give a request's head this long.

    Returns:
        The app; run it with uvicorn, or test it with `fastapi.testclient.TestClient` (with a
        loopback base URL: its default host, "testserver", is not allowed).

    Raises:
        ArtifactError: the index or classifier is missing or corrupt.
        ProvenanceMismatch: the classifier was trained on different features than the index.
        ConfigError: an allowed host that is not a host name pattern.

    Example:
        >>> app = create_app("out/index")  # doctest: +SKIP
        >>> client = TestClient(app, base_url="http://127.0.0.1")  # doctest: +SKIP
        >>> client.get("/info").json()["size"]  # doctest: +SKIP
        8677
    """
    allowed_hosts = list(LOOPBACK_HOSTS if allowed_hosts is None else allowed_hosts)
    try:
        check_host_patterns(allowed_hosts)
    except ValueError as err:
        raise ConfigError(f"allowed hosts: {err}") from None
    index = SimilarityIndex.open(index_dir, device=device)
    classifier = None
    if classifier_dir is not None:
        classifier = Classifier.load(classifier_dir)
        index.provenance.require_compatible(
            classifier.provenance, mine=f"index {index_dir}", theirs=f"classifier {classifier_dir}"
        )
    service = _Service(index, classifier, max_upload, max_pixels, thumbnail_size, decode_memory)
    app = FastAPI(
        title="fc7 similar images",
        version=__version__,
        description="Find the indexed images most similar to an uploaded image or an indexed id.",
    )
    app.state.service = service
    app.state.request_timeout = request_timeout
    # The last added runs first: headers on every answer, then the host, the origin and the
    # body checks, each before any work is done for a refused request.
    app.add_middleware(_UploadLimit, limit=max_upload + MULTIPART_SLACK, timeout=request_timeout)
    app.add_middleware(_SameOrigin)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts, www_redirect=False)
    unpoliced = [app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url]
    app.add_middleware(_SecurityHeaders, unpoliced=[path for path in unpoliced if path])

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
            "limits": {
                "max_upload": max_upload,
                "max_pixels": max_pixels,
                "decode_memory": decode_memory,
                "max_k": MAX_K,
            },
        }

    @app.get("/items/{item_id:fc7_id}", summary="An indexed item's id, path and label")
    def item(item_id: str) -> dict[str, Any]:
        found = lookup(index, item_id)
        return {"id": found.id, "path": found.path, "label": found.label}

    @app.get(
        "/thumbnails/{item_id:fc7_id}",
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


def uvicorn_config(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "warning",
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> Any:
    """uvicorn's settings for `app`: HTTP/1.1 by h11 with a deadline on each request's head.

    A request's head (line and headers) must arrive within the app's `request_timeout`, like its
    body; idle keep-alive connections close after 5 seconds; a head still incomplete after 16 KiB
    is refused (400, h11's limit); above `max_connections` open connections, new requests get
    503, which also bounds the memory held by bodies being received (each at most `max_upload`).

    Args:
        app: from `create_app`.
        host: address to bind.
        port: TCP port; 0 picks a free one.
        log_level: uvicorn's log level.
        max_connections: concurrent connections and requests before 503.

    Returns:
        A `uvicorn.Config`.

    Example:
        >>> config = uvicorn_config(create_app("out/index"), port=8000)  # doctest: +SKIP
        >>> uvicorn.Server(config).run()  # doctest: +SKIP
    """
    import uvicorn

    timeout = getattr(app.state, "request_timeout", DEFAULT_REQUEST_TIMEOUT)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="off",
        http=_head_deadline_protocol(timeout),
        ws="none",
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=16 * 1024,
        limit_concurrency=max_connections,
        server_header=False,
    )


def _head_deadline_protocol(timeout: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request head has not arrived within
    `timeout` seconds of the connection or of the previous response. uvicorn has no such
    deadline: a client trickling its headers (slowloris) would hold a connection forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_request():
                self._disarm()  # the head is complete: the body has the app's deadline

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            if not self._in_request() and not self.transport.is_closing():
                self._head_deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _expire(self) -> None:
            self._head_deadline = None
            if not self._in_request() and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline


@contextlib.contextmanager
def background_server(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 0,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread (tests, benchmarks, notebooks).

    Args:
        app: from `create_app`.
        host: address to bind.
        port: TCP port; 0 picks a free one.
        max_connections: concurrent connections and requests before 503 (`uvicorn_config`).

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

    config = uvicorn_config(app, host, port, max_connections=max_connections)
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
        "--allowed-hosts",
        ServeConfig,
        "comma-separated host names that requests may name in their Host header, e.g. "
        "search.example.org,*.example.org, or * for any (DNS-rebinding guard); none: the "
        "--host address and loopback names, any host for 0.0.0.0 and ::",
        metavar="HOSTS",
    )
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
        "--decode-memory",
        ServeConfig,
        "memory that concurrent image decodes (uploads, thumbnails) may hold at once, e.g. 2GiB; "
        "an image needing more on its own is refused",
        metavar="SIZE",
    )
    add_option(
        parser,
        "--request-timeout",
        ServeConfig,
        "seconds a client may take to send a request's headers, then its body (408)",
        type=float,
        metavar="S",
    )
    add_option(
        parser,
        "--max-connections",
        ServeConfig,
        "open connections before new requests get 503 (bounds memory held by uploads)",
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
    allowed_hosts = config.allowed_hosts or default_allowed_hosts(config.host)
    app = create_app(
        config.index_dir,
        config.classifier,
        config.max_upload,
        config.max_pixels,
        config.thumbnail_size,
        config.device,
        allowed_hosts=allowed_hosts,
        decode_memory=config.decode_memory,
        request_timeout=config.request_timeout,
    )
    size = len(app.state.service.index)
    print(
        f"fc7 serve: {size:,} items from {config.index_dir}; open "
        f"http://{config.host}:{config.port}/ (API docs at /docs)",
        file=sys.stderr,
    )
    if allowed_hosts == ["*"] and config.allowed_hosts is None:
        print(
            f"fc7 serve: --host {config.host} answers requests naming any host; pass "
            "--allowed-hosts with this server's names so that other sites cannot reach it "
            "through DNS rebinding",
            file=sys.stderr,
        )
    settings = uvicorn_config(
        app, config.host, config.port, config.log_level, config.max_connections
    )
    uvicorn.Server(settings).run()
    return 0
