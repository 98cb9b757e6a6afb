"""Where images come from: a folder (recursive), a manifest (.txt, .csv, .parquet), local or in
an object store (s3://, gs://, anything pyarrow's file systems open).

Inputs are streamed in a deterministic order (folders walked in sorted order, manifests in file
order), so a million files never become a million-item list, and a resumed run sees the same
inputs in the same shards.
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import SourceError
from pipeline.fs import normalize_source, resolve, uri_builder

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")
# Larger than any image under the default max_pixels (a 100-megapixel uncompressed RGB TIFF is
# 300 MB), small enough that a few decode threads reading at once cannot exhaust memory.
DEFAULT_MAX_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class InputImage:
    """One image to embed: a stable id, where to read it, and its label if known."""

    id: str
    path: str  # absolute local path or full URI
    label: str | None


def iter_inputs(source: str) -> Iterator[InputImage]:
    """Stream the images named by `source`: a folder, or a .txt/.csv/.parquet manifest.

    A folder yields files with image extensions (case-insensitive), recursively; the label is
    the top-level subfolder's name (None for files directly in the folder); the id is the path
    relative to the folder. A manifest yields its rows (`path`, optional `label` and `id`);
    relative paths are relative to the manifest's folder.

    Raises:
        SourceError: the source does not exist, cannot be listed, or is a manifest without a
            `path` column.

    Example:
        >>> next(iter_inputs("examples/images"))  # doctest: +SKIP
        InputImage(id='cats/cat1.jpg', path='/repo/examples/images/cats/cat1.jpg', label='cats')
    """
    source = normalize_source(source)
    fs, path = resolve(source)
    try:
        info = fs.get_file_info(path)
    except OSError as err:
        raise SourceError(f"{source}: cannot read: {err}") from err
    if info.type == pafs.FileType.Directory and isinstance(fs, pafs.LocalFileSystem):
        yield from _walk_local_folder(path)
    elif info.type == pafs.FileType.Directory:
        yield from _walk_folder(fs, path, uri_builder(source))
    elif info.type == pafs.FileType.File and path.lower().endswith(MANIFEST_EXTENSIONS):
        yield from _read_manifest(fs, path, uri_builder(source))
    elif info.type == pafs.FileType.NotFound:
        raise SourceError(f"{source}: no such folder or manifest file")
    else:
        raise SourceError(
            f"{source}: not a folder or a manifest ({', '.join(MANIFEST_EXTENSIONS)} file)"
        )


class InputReadError(OSError):
    """An input cannot be read as a file; `str(err)` is the reason for the `error` column.

    An OSError, so that callers which catch read errors catch these as well.
    """


def read_image_bytes(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of one input, which must be a regular file of at most `max_bytes`.

    Devices (`/dev/zero`), FIFOs and sockets are refused from their metadata, before they are
    opened: reading them would never end, or block the worker for good.

    Raises:
        InputReadError: missing, unreadable, not a regular file, or larger than `max_bytes`;
            the message is the reason recorded in the row.

    Example:
        >>> len(read_image_bytes("examples/images/dalmatian/image_0001.jpg")) > 0  # doctest: +SKIP
        True
    """
    try:
        if "://" not in path:
            return _read_local(path, max_bytes)
        fs, fs_path = resolve(path)
        info = fs.get_file_info(fs_path)
        if info.type == pafs.FileType.NotFound:
            raise InputReadError("cannot read file: No such file or directory")
        if info.type != pafs.FileType.File:
            raise InputReadError(f"not a regular file: {info.type.name.lower()}")
        check_file_size(info.size, max_bytes)
        with fs.open_input_stream(fs_path) as stream:
            return _read_at_most(stream, max_bytes)
    except InputReadError:
        raise
    except OSError as err:
        raise InputReadError(f"cannot read file: {err.strerror or err}") from None
    except ValueError as err:  # a URI scheme pyarrow does not know
        raise InputReadError(f"cannot read file: {err}") from None


def _read_local(path: str, max_bytes: int) -> bytes:
    _require_regular(os.stat(path).st_mode)
    # O_NONBLOCK: should the file have become a FIFO since the stat, opening it does not wait
    # for a writer; fstat then refuses it.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as file:
        status = os.fstat(file.fileno())
        _require_regular(status.st_mode)
        check_file_size(status.st_size, max_bytes)
        return _read_at_most(file, max_bytes)


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = (
            "a directory" if stat.S_ISDIR(mode)
            else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise InputReadError(f"not a regular file: {kind}; only plain files are read")


def check_file_size(size: int | None, max_bytes: int) -> None:
    """Refuse a file of more than `max_bytes` (None: size unknown, accepted).

    Raises:
        InputReadError: the reason recorded in the row.
    """
    if size is not None and size > max_bytes:
        raise InputReadError(
            f"file too large: {size:,} bytes exceeds max_bytes {max_bytes:,} (--max-bytes)"
        )


def _read_at_most(stream, max_bytes: int) -> bytes:
    # One byte more than allowed tells a file that grew after its size was read.
    data = stream.read(max_bytes + 1)
    check_file_size(len(data), max_bytes)
    return data


def _image_entry(relative: str, path: str) -> InputImage | None:
    if posixpath.splitext(relative)[1].lower() not in IMAGE_EXTENSIONS:
        return None
    label = relative.split("/", 1)[0] if "/" in relative else None
    return InputImage(id=relative, path=path, label=label)


def _walk_local_folder(root: str) -> Iterator[InputImage]:
    # os.scandir rather than pyarrow here: pyarrow's listing drops dangling links, and every
    # file that looks like an image must become a row (with an error if unreadable).
    seen_folders = set()

    def visit(folder: str, relative: str) -> Iterator[InputImage]:
        real = os.path.realpath(folder)
        if real in seen_folders:  # a symlink loop
            return
        seen_folders.add(real)
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as err:
            raise SourceError(f"{folder}: cannot list folder: {err.strerror}") from err
        for entry in entries:
            rel = relative + entry.name
            if entry.is_dir():
                yield from visit(entry.path, rel + "/")
            elif (image := _image_entry(rel, entry.path)) is not None:
                yield image

    yield from visit(root, "")


def _walk_folder(
    fs: pafs.FileSystem, root: str, uri: Callable[[str], str]
) -> Iterator[InputImage]:
    def visit(folder: str, relative: str) -> Iterator[InputImage]:
        try:
            entries = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
        except OSError as err:
            raise SourceError(f"{uri(folder)}: cannot list folder: {err}") from err
        for entry in sorted(entries, key=lambda e: e.base_name):
            rel = f"{relative}{entry.base_name}"
            if entry.type == pafs.FileType.Directory:
                yield from visit(entry.path, rel + "/")
            elif (image := _image_entry(rel, uri(entry.path))) is not None:
                yield image

    yield from visit(root, "")


def _read_manifest(
    fs: pafs.FileSystem, path: str, uri: Callable[[str], str]
) -> Iterator[InputImage]:
    folder = posixpath.dirname(path)

    def located(item: str) -> str:
        if "://" in item or posixpath.isabs(item):
            return item
        return uri(posixpath.normpath(posixpath.join(folder, item)))

    where = uri(path)
    if path.lower().endswith(".txt"):
        try:
            with fs.open_input_stream(path) as stream:
                # Line by line: a million-line manifest read whole would be held whole.
                for line in io.TextIOWrapper(io.BufferedReader(stream), encoding="utf-8"):
                    item = line.strip()
                    if item and not item.startswith("#"):
                        yield InputImage(id=item, path=located(item), label=None)
        except (OSError, UnicodeDecodeError) as err:
            raise SourceError(f"{where}: cannot read manifest: {err}") from err
        return
    for batch in _manifest_batches(fs, path, where):
        rows = batch.to_pydict()
        ids = rows.get("id") or rows["path"]
        labels = rows.get("label") or [None] * batch.num_rows
        for item, row_id, label in zip(rows["path"], ids, labels, strict=True):
            item = item or ""
            yield InputImage(id=row_id or item, path=located(item), label=label or None)


def _manifest_batches(fs: pafs.FileSystem, path: str, where: str) -> Iterator[pa.RecordBatch]:
    try:
        if path.lower().endswith(".csv"):
            columns = _csv_columns(fs, path)
            wanted = [c for c in ("path", "label", "id") if c in columns]
            _require_path_column(columns, where)
            options = pacsv.ConvertOptions(
                column_types={c: pa.string() for c in wanted}, include_columns=wanted
            )
            reader = pacsv.open_csv(fs.open_input_stream(path), convert_options=options)
        else:
            parquet = pq.ParquetFile(fs.open_input_file(path))
            columns = parquet.schema_arrow.names
            _require_path_column(columns, where)
            wanted = [c for c in ("path", "label", "id") if c in columns]
            reader = parquet.iter_batches(columns=wanted)
        for batch in reader:
            yield batch.cast(pa.schema([(c, pa.string()) for c in batch.schema.names]))
    except (OSError, pa.ArrowInvalid) as err:
        raise SourceError(f"{where}: cannot read manifest: {err}") from err


def _csv_columns(fs: pafs.FileSystem, path: str) -> list[str]:
    with fs.open_input_stream(path) as stream:
        header = stream.read(1 << 16).decode("utf-8", errors="replace").splitlines()
    return [name.strip().strip('"') for name in header[0].split(",")] if header else []


def _require_path_column(columns: list[str], where: str) -> None:
    if "path" not in columns:
        raise SourceError(
            f"{where}: manifest has no 'path' column (columns: {', '.join(columns) or 'none'})"
        )
