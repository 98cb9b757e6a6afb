"""The options of `fc7 serve`: one validated model, also the command line."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import PositiveInt, field_validator

from pipeline.config import Device, JobConfig, Size, option
from pipeline.decode import DEFAULT_DECODE_MEMORY, DEFAULT_MAX_PIXELS
from pipeline.search import MMAP_HELP
from pipeline.serve.security import check_host_patterns

DEFAULT_MAX_UPLOAD = 20_000_000
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_THUMBNAIL_SIZE = 192


class ServeConfig(JobConfig):
    """Options of `fc7 serve` (and `jobs/serve.py`)."""

    index_dir: str = option(help="an index built by `fc7 index`", positional=True)
    host: str = option("127.0.0.1", "address to bind; 0.0.0.0 exposes the service to the network")
    port: int = option(8000, "TCP port (0 picks a free one)", ge=0, le=65535)
    # One comma-separated argument (so that INDEX_DIR may follow it), or a list in YAML.
    allowed_hosts: str | None = option(
        None,
        "comma-separated host names that requests may name in their Host header, e.g. "
        "search.example.org,*.example.org, or * for any (DNS-rebinding guard); none: the "
        "--host address and loopback names, any host for 0.0.0.0 and ::",
        metavar="HOSTS",
    )
    classifier: str | None = option(
        None,
        "a model folder from `fc7 train`: image searches also return its predicted label",
        metavar="MODEL_DIR",
    )
    map: str | None = option(
        None,
        "a folder made by `fc7 map` from the index's embeddings: the page's Map view",
        metavar="MAP_DIR",
    )
    duplicates: str | None = option(
        None,
        "a folder made by `fc7 duplicates`: the page's Duplicates view",
        metavar="DUP_DIR",
    )
    audit: str | None = option(
        None,
        "a folder made by `fc7 audit`: the page's Issues view (label issues, outliers, leaks)",
        metavar="AUDIT_DIR",
    )
    # Sizes as a user writes them, so that --help shows "20MB"; validated into bytes.
    max_upload: Size = option(
        f"{DEFAULT_MAX_UPLOAD // 10**6}MB",
        "largest accepted upload, e.g. 20MB, 512KiB",
        metavar="SIZE",
        validate_default=True,
    )
    max_pixels: PositiveInt = option(
        DEFAULT_MAX_PIXELS,
        "largest accepted width*height of an uploaded image (decompression-bomb guard)",
        metavar="N",
    )
    decode_memory: Size = option(
        f"{DEFAULT_DECODE_MEMORY / 1024**3:g}GiB",
        "memory that concurrent image decodes (uploads, thumbnails) may hold at once, e.g. 2GiB; "
        "an image needing more on its own is refused",
        metavar="SIZE",
        validate_default=True,
    )
    request_timeout: float = option(
        DEFAULT_REQUEST_TIMEOUT,
        "seconds a client may take to send a request's headers, then its body (408)",
        metavar="S",
        gt=0,
        le=3600,
    )
    max_connections: PositiveInt = option(
        DEFAULT_MAX_CONNECTIONS,
        "open connections before new requests get 503 (bounds memory held by uploads)",
        metavar="N",
    )
    thumbnail_size: int = option(
        DEFAULT_THUMBNAIL_SIZE, "longer side of thumbnails in pixels", metavar="PX", ge=16, le=1024
    )
    device: Device = option(
        "auto",
        "auto (a GPU for FAISS and the model when there is one), cpu or cuda (gpu is an alias)",
    )
    mmap: bool | None = option(None, MMAP_HELP)
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = option(
        "info", "uvicorn log level"
    )

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _host_patterns(cls, value: Any) -> Any:
        if isinstance(value, list):  # YAML's `allowed_hosts: [a.example, b.example]`
            value = ",".join(str(host) for host in value)
        if isinstance(value, str):
            value = ",".join(_split_hosts(value))
            check_host_patterns(_split_hosts(value))
        return value

    @property
    def host_patterns(self) -> list[str] | None:
        """`allowed_hosts` as a list of patterns; None when none were given."""
        return None if self.allowed_hosts is None else _split_hosts(self.allowed_hosts)


def _split_hosts(hosts: str) -> list[str]:
    return [host.strip() for host in hosts.split(",") if host.strip()]
