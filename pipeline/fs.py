"""Local paths and URIs (s3://, gs://, file://, hdfs://): the one place that turns them into a
pyarrow file system and a path.

File systems are cached per process, keyed by scheme, host and options, so a worker that reads a
million images from one bucket makes one S3 client, not a million.
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Callable
from urllib.parse import urlsplit

import pyarrow.fs as pafs

_LOCAL = pafs.LocalFileSystem()


def is_uri(location: str) -> bool:
    """Whether `location` is a URI (`scheme://...`) rather than a local path."""
    return "://" in str(location)


def normalize_source(source: str) -> str:
    """An absolute local path or a URI without a trailing slash, as recorded in outputs."""
    if is_uri(source):
        return source.rstrip("/")
    return posixpath.abspath(str(source))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow file system and path for a local path or a URI (s3://, gs://, file://).

    Raises:
        ValueError: a URI scheme that pyarrow does not know.
        OSError: the file system cannot be set up (for example bad S3 options).

    Example:
        >>> fs, path = resolve("s3://bucket/photos?region=us-east-1")  # doctest: +SKIP
        >>> path
        'bucket/photos'
    """
    uri = str(uri)
    if not is_uri(uri) or uri.startswith("file://"):
        return _LOCAL, uri.removeprefix("file://")
    parts = urlsplit(uri)
    fs, root_path = _filesystem(f"{parts.scheme}://{parts.netloc}", parts.query)
    return fs, (root_path.rstrip("/") + parts.path) if root_path else parts.path


@functools.lru_cache(maxsize=32)
def _filesystem(root: str, query: str) -> tuple[pafs.FileSystem, str]:
    """The file system of a bucket or host, made once per process; and the path of its root
    (`bucket` on S3 and GCS, empty where the host is part of the file system)."""
    return pafs.FileSystem.from_uri(root + (f"?{query}" if query else ""))


def uri_builder(source: str) -> Callable[[str], str]:
    """Turns a path on `resolve(source)`'s file system back into a URI like `source`: the
    scheme and query (`?endpoint_override=...&region=...`) around it. Local paths stay as they
    are."""
    if not is_uri(source):
        return lambda path: path
    parts = urlsplit(source)
    query = f"?{parts.query}" if parts.query else ""
    root = f"{parts.scheme}://{parts.netloc}"
    if parts.scheme != "file" and parts.netloc and not _filesystem(root, parts.query)[1]:
        # hdfs://host:port/path: the host is not part of the path
        return lambda path: f"{parts.scheme}://{parts.netloc}{path}{query}"
    return lambda path: f"{parts.scheme}://{path}{query}"
