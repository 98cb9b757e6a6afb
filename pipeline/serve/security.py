"""What a request must pass before any work is done for it, and headers on every answer.

Middlewares, outermost first: security headers on every response; a Host header naming an
allowed host (DNS rebinding, 400); no unsafe request a browser sent from another origin (403);
a request body within the upload limit (413) that arrives within the deadline (408).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.trustedhost import TrustedHostMiddleware

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
# Room for the multipart envelope (boundaries, part headers, a `k` field) around the image.
MULTIPART_SLACK = 64 * 1024


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


def add_request_guards(
    app: FastAPI, allowed_hosts: Sequence[str], max_upload: int, request_timeout: float
) -> None:
    """Install the middlewares of this module on `app`.

    Args:
        app: the application.
        allowed_hosts: patterns checked by `check_host_patterns`.
        max_upload: largest accepted image, in bytes; a body may exceed it by the multipart
            envelope (`MULTIPART_SLACK`).
        request_timeout: seconds a request body may take to arrive.

    Example:
        >>> add_request_guards(FastAPI(), ["127.0.0.1"], 20_000_000, 30.0)
    """
    # The last added runs first: headers on every answer, then the host, the origin and the
    # body checks, each before any work is done for a refused request.
    app.add_middleware(_UploadLimit, limit=max_upload + MULTIPART_SLACK, timeout=request_timeout)
    app.add_middleware(_SameOrigin)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts, www_redirect=False)
    unpoliced = [app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url]
    app.add_middleware(_SecurityHeaders, unpoliced=[path for path in unpoliced if path])


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
