"""Paths and URIs: one file system per bucket and process, paths as pyarrow wants them."""

from __future__ import annotations

import pyarrow.fs as pafs

from pipeline.fs import normalize_source, resolve, uri_builder


def test_one_file_system_per_bucket_and_options_per_process():
    first, path = resolve("s3://bucket/photos/a.jpg?region=us-east-1")
    again, other = resolve("s3://bucket/photos/b.jpg?region=us-east-1")
    assert isinstance(first, pafs.S3FileSystem) and first is again
    assert (path, other) == ("bucket/photos/a.jpg", "bucket/photos/b.jpg")
    elsewhere, _ = resolve("s3://bucket/photos/a.jpg?region=eu-west-1")
    assert elsewhere is not first
    assert resolve("s3://bucket?region=us-east-1")[1] == "bucket"


def test_local_paths_and_file_uris_use_the_local_file_system(tmp_path):
    fs, path = resolve(str(tmp_path / "a.jpg"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a.jpg")
    fs, path = resolve(f"file://{tmp_path}/b.jpg")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/b.jpg"


def test_paths_listed_on_a_file_system_become_uris_like_the_source(tmp_path):
    source = "s3://bucket/photos?region=us-east-1"
    fs, root = resolve(source)
    assert uri_builder(source)(f"{root}/cats/1.jpg") == (
        "s3://bucket/photos/cats/1.jpg?region=us-east-1"
    )
    assert resolve(uri_builder(source)(f"{root}/cats/1.jpg"))[1] == f"{root}/cats/1.jpg"
    assert uri_builder(str(tmp_path))(f"{tmp_path}/x.jpg") == f"{tmp_path}/x.jpg"
    assert normalize_source("s3://bucket/photos/") == "s3://bucket/photos"
    assert normalize_source("photos").startswith("/")
