"""`FC7Embedder` in Ray Data pipelines against `fc7 extract` on the same files, and Ray Data
reading an `fc7 extract` output."""

import inspect
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import REPO, hostile_corpus, save_image
from ray.data.expressions import col

from jobs.extract import main as extract
from pipeline.errors import ConfigError, OutputError, SourceError
from pipeline.extract import ExtractConfig
from pipeline.provenance import PARQUET_METADATA_KEY, Provenance
from pipeline.raydata import OUTPUT_COLUMNS, FC7Embedder
from pipeline.sources import IMAGE_EXTENSIONS
from pipeline.store import EmbeddingDataset, embedding_schema

# One local Ray for the module; the example script joins it too.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]
EXTENSIONS = sorted(IMAGE_EXTENSIONS)
# Decoded by Ray (Pillow, mode RGB) as fc7 decodes them: no EXIF orientation, no 16-bit gray.
PLAIN_IMAGES = ["top-level.JPEG", "odd/ünïcødé 名前.jpg", "odd/photo.webp", "odd/photo.tiff",
                "odd/photo.BMP", "odd/palette.png", "odd/rgba.png", "odd/animated.gif"]


def _by_path(table: pa.Table) -> dict[str, dict]:
    return {row["path"]: row for row in table.to_pylist()}


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _provenance(schema: pa.Schema) -> Provenance:
    return Provenance.from_json(schema.metadata[PARQUET_METADATA_KEY], "test")


def _map(ds: ray.data.Dataset, **batch_options) -> ray.data.Dataset:
    return ds.map_batches(
        FC7Embedder, fn_constructor_kwargs={"weights": "random:0", "batch_size": 3},
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=5, **batch_options,
    )


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """The hostile corpus and `fc7 extract`'s output on it: (folder, {id: error}, out)."""
    root = tmp_path_factory.mktemp("raydata")
    expected = hostile_corpus(root / "src")
    out = root / "out"
    assert extract([str(root / "src"), "--out", str(out), "--weights", "random:0",
                    "--shard-size", "8", "--batch-size", "3", "--runner", "local"]) == 0
    return root / "src", expected, out


@pytest.fixture(scope="module")
def by_ray(extracted):
    """The same folder through read_binary_files and FC7Embedder, written by Ray Data."""
    src, _, _ = extracted
    written = src.parent / "ray"
    ds = ray.data.read_binary_files(str(src), include_paths=True, file_extensions=EXTENSIONS)
    _map(ds, batch_format="pyarrow").write_parquet(str(written))
    return written


@pytest.fixture(scope="module")
def here():
    """An FC7Embedder in this process, as an actor holds it."""
    embedder = FC7Embedder(weights="random:0", batch_size=3)
    yield embedder
    embedder.close()


def test_vectors_and_types_equal_fc7_extracts(extracted, by_ray):
    _, expected, out = extracted
    fc7, ours = _by_path(pq.read_table(out)), _by_path(pq.read_table(by_ray))
    embedded = [path for path, row in fc7.items() if row["error"] is None]
    assert len(embedded) == sum(error is None for error in expected.values())
    for path in embedded:
        assert _cosine(ours[path]["embedding"], fc7[path]["embedding"]) >= 0.99999, path
        for column in ("sha256", "width", "height"):
            assert ours[path][column] == fc7[path][column], (path, column)
    fc7_schema = pq.read_schema(out / "part-00000.parquet")
    for file in by_ray.glob("*.parquet"):  # every file Ray wrote, whatever batch it came from
        schema = pq.read_schema(file)
        for name in OUTPUT_COLUMNS:
            assert schema.field(name).equals(fc7_schema.field(name)), name
        assert schema.names == ["path", *OUTPUT_COLUMNS]


def test_error_rows_equal_fc7_extracts(extracted, by_ray, here):
    src, expected, out = extracted
    fc7, ours = _by_path(pq.read_table(out)), _by_path(pq.read_table(by_ray))
    # read_binary_files lists regular files only: the dangling link is not there at all.
    dangling = str(src / "broken/dangling.jpg")
    assert set(ours) == set(fc7) - {dangling}
    failed = {path for path, row in fc7.items() if row["error"] is not None}
    assert len(failed) == sum(error is not None for error in expected.values())
    for path in ours:
        assert ours[path]["error"] == fc7[path]["error"], path
        assert (ours[path]["embedding"] is None) == (path in failed), path
    # A dataset of paths: the embedder reads each file itself, so every path is a row.
    table = here(pa.table({"path": sorted(fc7)}))
    assert _by_path(table)[dangling]["error"] == fc7[dangling]["error"] == (
        "cannot read file: No such file or directory")
    assert {p: r["error"] for p, r in _by_path(table).items()} == {
        p: r["error"] for p, r in fc7.items()}


def test_decoded_arrays_from_read_images(extracted, here):
    src, _, out = extracted
    fc7 = _by_path(pq.read_table(out))
    paths = [str(src / name) for name in PLAIN_IMAGES]
    ds = ray.data.read_images(paths, mode="RGB", include_paths=True, file_extensions=EXTENSIONS)
    # What map_batches hands a stage in numpy format (the default); an actor would embed the
    # same, as the test above shows for bytes.
    batch = ds.take_batch(len(paths), batch_format="numpy")
    ours = _by_path(here(batch))
    assert set(ours) == set(paths)
    for path in paths:
        assert ours[path]["error"] is None and ours[path]["sha256"] is None, path
        assert _cosine(ours[path]["embedding"], fc7[path]["embedding"]) >= 0.99999, path
        assert (ours[path]["width"], ours[path]["height"]) == (
            fc7[path]["width"], fc7[path]["height"])


def test_ray_data_reads_an_fc7_output_without_its_plan(extracted):
    _, expected, out = extracted
    assert (out / "_plan" / "inputs.parquet").is_file()
    ds = ray.data.read_parquet(str(out))
    schema = ds.schema().base_schema  # from the files' footers, before anything runs
    embedding = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(embedding) and embedding.list_size == 4096
    assert embedding.value_type == pa.float32()
    stamped = _provenance(pq.read_schema(out / "part-00000.parquet"))
    assert _provenance(schema) == stamped == EmbeddingDataset.open(str(out)).provenance
    ds = ds.materialize()
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    # Ray skips paths starting with "_" or ".": the plan's inputs are not read as rows.
    assert sorted(table["id"].to_pylist()) == sorted(expected)
    assert table.schema.field("embedding").type == embedding
    fine = ds.filter(expr=col("error").is_null())
    vectors = fine.take_batch(len(expected), batch_format="numpy")["embedding"]
    assert vectors.dtype == object  # numpy batches: one (4096,) array per row
    assert np.stack(vectors).shape == (sum(e is None for e in expected.values()), 4096)


def test_provenance_is_fc7_extracts(extracted, by_ray, here):
    _, _, out = extracted
    stamped = _provenance(pq.read_schema(out / "part-00000.parquet"))
    assert here.provenance.created_at and stamped.created_at
    assert here.provenance.model_copy(update={"created_at": ""}) == stamped.model_copy(
        update={"created_at": ""})
    for file in by_ray.glob("*.parquet"):
        found = _provenance(pq.read_schema(file))
        found.require_compatible(stamped, "fc7 extract", str(file), same_dtype=True)


def test_options_mirror_fc7_extracts(here):
    signature = inspect.signature(FC7Embedder)
    defaults = {name: p.default for name, p in signature.parameters.items()
                if name != "keep_images"}
    checked = FC7Embedder.validate_options(**defaults)
    fc7 = ExtractConfig.model_validate({"source": "s", "out": "o"})
    assert checked == {name: getattr(fc7, name) for name in checked}
    with pytest.raises(ConfigError, match="max_bytes=0"):
        FC7Embedder.validate_options(max_bytes=0)
    with pytest.raises(ConfigError, match="layer='fc8'"):
        FC7Embedder(layer="fc8")
    with pytest.raises(ConfigError, match="int8"):
        FC7Embedder(precision="int8")
    with pytest.raises(SourceError, match="no bytes, image or path column"):
        here({"pixels": np.zeros(2)})
    with pytest.raises(OutputError, match="error"):
        here({"path": np.array(["a.jpg"]), "error": np.array([None])})


def test_batch_formats_and_bad_values_give_rows(extracted, here):
    src, _, out = extracted
    fc7 = _by_path(pq.read_table(out))
    path = str(src / "top-level.JPEG")
    data = (src / "top-level.JPEG").read_bytes()
    arrow = here(pa.table({"bytes": [data, None, b"x" * 10], "n": [1, 2, 3]}))
    numpy = here({"bytes": np.array([data], dtype=object), "n": np.array([1])})
    pandas = here(pd.DataFrame({"path": [path]}))
    assert arrow.column_names == ["n", *OUTPUT_COLUMNS] == numpy.column_names
    assert pandas.column_names == ["path", *OUTPUT_COLUMNS]
    assert arrow["embedding"][0] == numpy["embedding"][0] == pandas["embedding"][0]
    assert arrow["embedding"][0].as_py() == pytest.approx(fc7[path]["embedding"], abs=1e-5)
    assert arrow["error"][1].as_py() == "empty file (the bytes are null)"
    assert arrow["error"][2].as_py().startswith("not an image: unknown or unsupported format")
    assert arrow["embedding"].null_count == 2
    thin = np.zeros((2, 300, 3), np.uint8)
    arrays = here({"image": np.array([thin, np.zeros((4, 4), np.float32)], dtype=object)})
    assert arrays["error"][0].as_py().startswith("extreme aspect ratio: 300x2")
    assert arrays["error"][1].as_py().startswith("not an image: an array of shape (4, 4)")
    assert here(pa.table({"bytes": pa.array([], pa.binary())})).num_rows == 0


def test_other_options_give_fc7s_types_and_rows(extracted):
    src, _, _ = extracted
    embedder = FC7Embedder(weights="random:0", layer="pool5", dtype="float16", max_bytes=1000,
                           keep_images=True)
    small = save_image(np.full((8, 8, 3), 90, np.uint8), format="PNG")
    large = (src / "top-level.JPEG").read_bytes()
    table = embedder(pa.table({"bytes": [small, large]}))
    embedder.close()
    assert table.column_names == ["bytes", *OUTPUT_COLUMNS]
    expected = embedding_schema(embedder.provenance).field("embedding")
    assert table.schema.field("embedding").equals(expected)
    assert expected.type.list_size == 9216 and expected.type.value_type == pa.float16()
    assert table["error"].to_pylist() == [
        None, f"file too large: {len(large):,} bytes exceeds max_bytes 1,000 (--max-bytes)"]


def test_the_example_runs(tmp_path):
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    done = subprocess.run(
        [sys.executable, str(REPO / "examples/raydata_example.py"), "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "12 images, 0 failed; fc7 of AlexNet, weights random:0" in done.stdout
    table = pq.read_table(tmp_path)
    assert table.num_rows == 12 and table["error"].null_count == 12
    assert table.schema.field("embedding").type.list_size == 4096
