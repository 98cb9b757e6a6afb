"""The FastAPI application: routes, the shape of their answers, and what they are built from.

Endpoints are plain `def` functions, which FastAPI runs in its thread pool: the event loop keeps
accepting requests while a query embeds an image or searches the index. An id from a request is
only ever a key into the index's id map, never part of a file path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.convertors import Convertor, register_url_convertor

from pipeline import __version__
from pipeline.classify import Classifier
from pipeline.decode import DEFAULT_DECODE_MEMORY, DEFAULT_MAX_PIXELS
from pipeline.errors import ConfigError, PipelineError
from pipeline.search import Match, SimilarityIndex
from pipeline.serve.config import (
    DEFAULT_MAX_UPLOAD,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_THUMBNAIL_SIZE,
)
from pipeline.serve.curation import Curation
from pipeline.serve.security import LOOPBACK_HOSTS, add_request_guards, check_host_patterns
from pipeline.serve.service import Service

# The page, its script and styles (package data of `pipeline`, see pyproject.toml).
STATIC = Path(__file__).resolve().parents[1] / "static"
MAX_K = 1000
# Query parameters shared by the endpoints (module level: annotations are resolved by name).
K = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
OFFSET = Annotated[int, Query(ge=0, le=MAX_K, description="results to skip (paging)")]
TOP = Annotated[int, Query(ge=1, le=100, description="classes in a prediction")]
IMAGE = Annotated[UploadFile, File(description="an image file")]
PAGE_OFFSET = Annotated[int, Query(ge=0, le=2**40, description="entries to skip (paging)")]
GROUPS = Annotated[int, Query(ge=1, le=200, description="groups in the answer")]
MEMBERS = Annotated[int, Query(ge=1, le=1000, description="members shown of each group")]
ROWS = Annotated[int, Query(ge=1, le=500, description="rows in the answer")]
ISSUE_KIND = Annotated[
    Literal["label", "outlier", "leak"],
    Query(
        description="label: label issues; outlier: outliers; leak: test images that repeat "
        "a training image"
    ),
]


class _AnyId(Convertor[str]):
    """Starlette's `path` convertor matches `.*`, which stops at a newline: an id may hold any
    character, so `/items/{item_id:fc7_id}` matches everything after the prefix."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("fc7_id", _AnyId())


def create_app(
    index_dir: str,
    classifier_dir: str | None = None,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE,
    device: str = "auto",
    allowed_hosts: Sequence[str] | None = None,
    decode_memory: int = DEFAULT_DECODE_MEMORY,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    mmap: bool | None = None,
    map_dir: str | None = None,
    duplicates_dir: str | None = None,
    audit_dir: str | None = None,
) -> FastAPI:
    """The FastAPI application serving the index in `index_dir`.

    Args:
        index_dir: an index built by `fc7 index`.
        classifier_dir: a classifier trained by `fc7 train` on the same features, or None.
        max_upload: largest accepted upload, in bytes (413 above it).
        max_pixels: largest accepted width*height of an uploaded image (413 above it).
        thumbnail_size: longer side of thumbnails, in pixels.
        device: "auto" (a GPU for the index and the model when there is one), "cpu" or "cuda"
            ("gpu" is an alias).
        allowed_hosts: host names (patterns like `*.example.org`, or `*`) requests may name in
            their Host header, others get 400; None allows the loopback names only (see
            `default_allowed_hosts`).
        decode_memory: bytes that concurrent decodes (uploads, thumbnails) may hold at once;
            an image needing more on its own is refused (413 upload, 404 thumbnail).
        request_timeout: seconds a request body may take to arrive (408 after it);
            `uvicorn_config` also gives a request's head this long.
        mmap: memory-map the index's inverted lists and search on the CPU (True), read them
            (False), or map only an index larger than a quarter of the available memory (None);
            see `SimilarityIndex.open`.
        map_dir: a folder made by `fc7 map` over the index's collection: the Map view (`/map`).
        duplicates_dir: a folder made by `fc7 duplicates`: the Duplicates view (`/duplicates`).
        audit_dir: a folder made by `fc7 audit`: the Issues view (`/issues`).

    Returns:
        The app; run it with uvicorn (`run_server`, `background_server`), or test it with
        `fastapi.testclient.TestClient` (with a loopback base URL: its default host,
        "testserver", is not allowed).

    Raises:
        ArtifactError: the index or classifier is missing or corrupt, or a curation folder is
            missing, of another kind, or breaks its contract.
        ProvenanceMismatch: the classifier or a curation folder was made from different features
            than the index.
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
    index = SimilarityIndex.open(index_dir, device=device, decode_memory=decode_memory, mmap=mmap)
    classifier = None
    if classifier_dir is not None:
        classifier = Classifier.load(classifier_dir)
        index.provenance.require_compatible(
            classifier.provenance, mine=f"index {index_dir}", theirs=f"classifier {classifier_dir}"
        )
    curation = Curation.load(index, index_dir, map_dir, duplicates_dir, audit_dir)
    service = Service(index, classifier, max_upload, max_pixels, thumbnail_size, decode_memory)
    app = FastAPI(
        title="fc7 similar images",
        version=__version__,
        description="Find the indexed images most similar to an uploaded image or an indexed id.",
    )
    app.state.service = service
    app.state.curation = curation
    app.state.request_timeout = request_timeout
    add_request_guards(app, allowed_hosts, max_upload, request_timeout)
    limits = {
        "max_upload": max_upload,
        "max_pixels": max_pixels,
        "decode_memory": decode_memory,
        "max_k": MAX_K,
    }

    @app.exception_handler(PipelineError)
    def _pipeline_error(request: Any, err: PipelineError) -> JSONResponse:
        # E.g. the recorded weights cannot be loaded here: the service is up, image queries not.
        return JSONResponse({"detail": str(err)}, status_code=503)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", summary="Liveness; whether the model is loaded, the index memory-mapped")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "items": len(index),
            "model_loaded": service.model_loaded,
            "mmap": index.mmap,
            "views": curation.views(),
        }

    @app.get("/info", summary="The index: kind, size, dimension, recall, provenance; the views")
    def info() -> dict[str, Any]:
        return _describe(index, classifier, limits) | {
            "views": curation.views(),
            "curation": curation.describe(),
        }

    @app.get("/items/{item_id:fc7_id}", summary="An indexed item's id, path and label")
    def item(item_id: str) -> dict[str, Any]:
        found = service.item(item_id)
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
        query = service.item(id)
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

    @app.get(
        "/map",
        summary="Every point of the map: ids, x, y, label and issue codes (columnar)",
        response_class=Response,
        responses={200: {"content": {"application/json": {}}}},
    )
    def point_map(request: Request) -> Response:
        if curation.map is None:
            raise _not_loaded("map", "--map MAP_DIR (made by fc7 map)")
        found = curation.map
        headers = {"ETag": found.etag, "Cache-Control": "no-cache", "Vary": "Accept-Encoding"}
        if request.headers.get("if-none-match") == found.etag:
            return Response(status_code=304, headers=headers)
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["Content-Encoding"] = "gzip"
            return Response(found.gzipped, media_type="application/json", headers=headers)
        return Response(found.body, media_type="application/json", headers=headers)

    @app.get("/duplicates", summary="Groups of duplicate images, largest first")
    def duplicate_groups(
        offset: PAGE_OFFSET = 0, limit: GROUPS = 20, members: MEMBERS = 24
    ) -> dict[str, Any]:
        if curation.duplicates is None:
            raise _not_loaded("duplicates", "--duplicates DUP_DIR (made by fc7 duplicates)")
        return curation.duplicates.page(offset, limit, members)

    @app.get("/issues", summary="An audit's findings of one kind, most suspicious first")
    def issues(
        kind: ISSUE_KIND = "label", offset: PAGE_OFFSET = 0, limit: ROWS = 50
    ) -> dict[str, Any]:
        if curation.audit is None:
            raise _not_loaded("issues", "--audit AUDIT_DIR (made by fc7 audit)")
        return curation.audit.page(kind, offset, limit)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _describe(
    index: SimilarityIndex, classifier: Classifier | None, limits: dict[str, int]
) -> dict[str, Any]:
    """The answer of /info."""
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
        "limits": limits,
    }


def _not_loaded(view: str, option: str) -> HTTPException:
    return HTTPException(404, f"no {view} loaded: start the server with {option}")


def _match(match: Match) -> dict[str, Any]:
    return {"id": match.id, "path": match.path, "label": match.label, "score": match.score}


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
