"""Running the app with uvicorn: its settings, a deadline on request heads, a background server.

uvicorn bounds a request's head size, idle keep-alive time and concurrent connections, but not
how long a head may take to arrive; `_head_deadline_protocol` adds that deadline (slowloris).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.serve.config import DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_TIMEOUT, ServeConfig


def uvicorn_config(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "warning",
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> uvicorn.Config:
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


def run_server(app: FastAPI, config: ServeConfig) -> None:
    """Serve `app` on `config`'s address in this thread until interrupted (Ctrl-C, SIGTERM).

    Args:
        app: from `create_app`.
        config: the options of `fc7 serve`: host, port, log level and connection limit.

    Example:
        >>> config = ServeConfig(index_dir="out/index")
        >>> run_server(create_app(config.index_dir), config)  # doctest: +SKIP
    """
    settings = uvicorn_config(
        app, config.host, config.port, config.log_level, config.max_connections
    )
    uvicorn.Server(settings).run()


def _head_deadline_protocol(timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head has not arrived within
    `timeout` seconds of the connection or of the previous response. uvicorn has no such
    deadline: a client trickling its headers (slowloris) would hold a connection forever."""

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
