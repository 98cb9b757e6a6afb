"""Hostile artifacts across jobs: damaged and corrupt part files, and output folders holding the
user's own files. Every command is run through `fc7` (jobs.cli.main) as a user runs it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import clustered_vectors, test_provenance, write_embeddings

from jobs.cli import main as fc7_main
from pipeline import index as fx
from pipeline.errors import ArtifactError
from pipeline.fs import resolve
from pipeline.store import (
    MAX_VALUE,
    EmbeddingDataset,
    build_table,
    describe_entries,
    foreign_entries,
)

DIM = 32
USER_FILES = ["notes.md", "part-time.xlsx", "part-x/"]


def labelled(folder: Path, rows: int = 240, shards: int = 3, seed: int = 1) -> Path:
    x, y = clustered_vectors(rows, DIM, clusters=4, spread=0.2, seed=seed)
    return write_embeddings(folder, x, [f"class {c}" for c in y], shards=shards)


def flip_middle(path: Path, count: int = 20, seed: int = 0) -> None:
    """Flip `count` bytes around the middle of a file (inside its largest column's pages)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for position in np.random.default_rng(seed).choice(range(middle - 64, middle + 64), count):
        data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def write_unchecked(folder: Path, vectors: np.ndarray, labels: list[str]) -> Path:
    """One part file as fc7 wrote them before page checksums: plain `pq.write_table`."""
    ids = [f"img_{i:06d}.jpg" for i in range(len(vectors))]
    table = build_table(
        test_provenance(DIM), ids, [f"/images/{i}" for i in ids], labels, vectors,
        [None] * len(ids),
    )
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000.parquet", compression="zstd")
    return folder


def plant_user_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.md").write_text("my notes")
    (folder / "part-time.xlsx").write_bytes(b"spreadsheet")
    (folder / "part-x").mkdir()
    (folder / "part-x" / "inside.txt").write_text("keep me")


def assert_user_files_survive(folder: Path) -> None:
    assert (folder / "notes.md").read_text() == "my notes"
    assert (folder / "part-time.xlsx").read_bytes() == b"spreadsheet"
    assert (folder / "part-x" / "inside.txt").read_text() == "keep me"


def fc7(argv: list[str], capsys) -> tuple[int, str]:
    """Run `fc7 ARGV`; returns the exit status and what it printed to stderr."""
    capsys.readouterr()
    status = fc7_main(argv)
    return status, capsys.readouterr().err


def one_line_error(err: str, command: str) -> str:
    """The error line, checked to be the only one and the last (after progress lines)."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith(f"fc7 {command}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


# ---------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize(
    "command",
    [
        ["index", "{emb}", "--out", "{tmp}/index"],
        ["train", "{emb}", "--out", "{tmp}/clf"],
        ["train", "{emb}", "--out", "{tmp}/clf", "--classifier", "sgd", "--epochs", "1"],
        ["predict", "{tmp}/model", "{emb}", "--out", "{tmp}/pred"],
    ],
    ids=["index", "train", "train-sgd", "predict"],
)
def test_a_damaged_part_file_is_named_by_every_command(tmp_path: Path, capsys, command) -> None:
    emb = labelled(tmp_path / "emb")
    assert fc7(["train", str(emb), "--out", str(tmp_path / "model")], capsys)[0] == 0
    flip_middle(emb / "part-00001.parquet")
    argv = [arg.format(emb=emb, tmp=tmp_path) for arg in command]
    status, err = fc7(argv, capsys)
    assert status == 1
    line = one_line_error(err, argv[0])
    assert f"{emb / 'part-00001.parquet'}: damaged" in line
    assert "checksum" in line  # caught by the page CRC, not by luck in the decoder
    assert "delete part-00001.parquet and run the same fc7 extract command again" in line
    out = Path(argv[argv.index("--out") + 1])
    assert not out.exists() or not any(out.glob("*.faiss"))


@pytest.mark.parametrize(
    "value, shown",
    [(np.nan, "holds nan"), (np.inf, "holds inf"), (-np.inf, "holds -inf"),
     (1e38, "holds 1e+38"), (-2.5, "holds -2.5 in its embedding, impossible for fc7")],
)
def test_impossible_values_in_an_unchecked_file_are_refused_naming_the_row(
    tmp_path: Path, value: float, shown: str
) -> None:
    x, _ = clustered_vectors(50, DIM, seed=2)
    x[37, 5] = value
    folder = write_unchecked(tmp_path / "old", x, ["a"] * 50)
    data = EmbeddingDataset.open(str(folder))
    with pytest.raises(ArtifactError) as caught:
        for _ in data.batches(["embedding"], batch_size=16):  # the id is not even asked for
            pass
    message = str(caught.value)
    assert message.startswith(f"{folder / 'part-00000.parquet'}: row 37 (id 'img_000037.jpg'")
    assert shown in message


def test_the_largest_accepted_value_and_files_without_checksums_still_read(tmp_path) -> None:
    x, _ = clustered_vectors(50, DIM, seed=2)
    x[3, 3], x[4, 4] = MAX_VALUE, 0.0
    folder = write_unchecked(tmp_path / "old", x, ["a"] * 50)
    batches = list(EmbeddingDataset.open(str(folder)).batches(["embedding"], batch_size=16))
    assert [b.column_names for b in batches] == [["embedding"]] * 4  # the id is not added
    assert sum(b.num_rows for b in batches) == 50


@pytest.mark.parametrize(
    "command",
    [
        ["index", "{bad}", "--out", "{tmp}/index"],
        ["index", "{bad}", "--out", "{tmp}/built", "--add"],
        ["train", "{bad}", "--out", "{tmp}/clf"],
        ["train", "{bad}", "--out", "{tmp}/clf", "--classifier", "sgd", "--epochs", "1"],
        ["predict", "{tmp}/model", "{bad}", "--out", "{tmp}/pred"],
    ],
    ids=["index", "index-add", "train", "train-sgd", "predict"],
)
def test_non_finite_vectors_are_refused_by_every_command(tmp_path: Path, capsys, command) -> None:
    x, y = clustered_vectors(120, DIM, clusters=4, spread=0.2, seed=3)
    labels = [f"class {c}" for c in y]
    good = write_unchecked(tmp_path / "good", x, labels)  # old files without checksums work
    assert fc7(["train", str(good), "--out", str(tmp_path / "model")], capsys)[0] == 0
    assert fc7(["index", str(good), "--out", str(tmp_path / "built")], capsys)[0] == 0
    x = np.concatenate([x, x[:10] + 0.5])  # 10 new ids for --add
    x[111, 3], x[117, 9] = np.nan, np.inf
    bad = write_unchecked(tmp_path / "bad", x, labels + labels[:10])
    before = (tmp_path / "built" / fx.INDEX_FILE).read_bytes()
    argv = [arg.format(bad=bad, tmp=tmp_path) for arg in command]
    status, err = fc7(argv, capsys)
    assert status == 1
    line = one_line_error(err, argv[0])
    assert "part-00000.parquet: row 111 (id 'img_000111.jpg', counting rows from 0) " in line
    assert "holds nan in its embedding" in line
    assert (tmp_path / "built" / fx.INDEX_FILE).read_bytes() == before


# ---------------------------------------------------------------------------- output folders


def test_foreign_entries_lists_what_a_predicate_does_not_claim(tmp_path: Path) -> None:
    plant_user_files(tmp_path / "out")
    (tmp_path / "out" / "manifest.json").write_text("{}")
    fs, base = resolve(str(tmp_path / "out"))
    assert foreign_entries(fs, base, lambda info: info.base_name == "manifest.json") == USER_FILES
    assert foreign_entries(fs, f"{base}/nowhere", lambda info: False) == []
    assert describe_entries(["a", "b", "c"], limit=2) == "a, b and 1 more"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize(
    "command",
    [
        ["index", "{emb}", "--out", "{out}"],
        ["train", "{emb}", "--out", "{out}"],
        ["predict", "{tmp}/model", "{emb}", "--out", "{out}"],
    ],
    ids=["index", "train", "predict"],
)
def test_a_folder_of_user_files_is_refused_and_left_alone(
    tmp_path: Path, capsys, command, overwrite
) -> None:
    emb = labelled(tmp_path / "emb", shards=1)
    assert fc7(["train", str(emb), "--out", str(tmp_path / "model")], capsys)[0] == 0
    out = tmp_path / "mine"
    plant_user_files(out)
    argv = [arg.format(emb=emb, tmp=tmp_path, out=out) for arg in command] + overwrite
    status, err = fc7(argv, capsys)
    assert status == 1
    line = one_line_error(err, argv[0])
    assert "notes.md, part-time.xlsx, part-x/" in line
    assert_user_files_survive(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", "part-time.xlsx", "part-x"]


def test_index_overwrite_and_add_refuse_an_index_folder_holding_user_files(
    tmp_path: Path, capsys
) -> None:
    emb = labelled(tmp_path / "emb")
    out = tmp_path / "index"
    assert fc7(["index", str(emb), "--out", str(out)], capsys)[0] == 0
    plant_user_files(out)
    for extra in (["--overwrite"], ["--add"]):
        status, err = fc7(["index", str(emb), "--out", str(out), *extra], capsys)
        assert status == 1
        assert "holds files fc7 did not write (notes.md, part-time.xlsx, part-x/)" in (
            one_line_error(err, "index")
        )
    assert_user_files_survive(out)
    assert fx.load_index(out).manifest["count"] == 240
    # Without them, --overwrite replaces the index and leaves nothing behind beside it.
    for name in ("notes.md", "part-time.xlsx"):
        (out / name).unlink()
    shutil.rmtree(out / "part-x")
    assert fc7(["index", str(emb), "--out", str(out), "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "index"]


def test_index_writes_into_an_empty_folder(tmp_path: Path, capsys) -> None:
    emb = labelled(tmp_path / "emb")
    (tmp_path / "index").mkdir()
    assert fc7(["index", str(emb), "--out", str(tmp_path / "index")], capsys)[0] == 0
    assert fx.load_index(tmp_path / "index").manifest["count"] == 240


def test_train_overwrite_replaces_only_its_own_files(tmp_path: Path, capsys) -> None:
    emb = labelled(tmp_path / "emb")
    out = tmp_path / "clf"
    assert fc7(["train", str(emb), "--out", str(out)], capsys)[0] == 0
    ours = sorted(p.name for p in out.iterdir())
    assert ours == sorted(
        ["model.skops", "manifest.json", "metrics.json", "report.md", "confusion_matrix.png"]
    )
    plant_user_files(out)
    outside = tmp_path / "elsewhere.md"
    outside.write_text("not fc7's")
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(outside)  # replaced, never written through
    first = json.loads((out / "manifest.json").read_text())["model_sha256"]
    status, err = fc7(["train", str(emb), "--out", str(out)], capsys)
    assert status == 1 and "--overwrite" in one_line_error(err, "train")
    argv = ["train", str(emb), "--out", str(out), "--overwrite", "--classifier", "knn"]
    assert fc7(argv, capsys)[0] == 0
    assert json.loads((out / "manifest.json").read_text())["model_sha256"] != first
    assert_user_files_survive(out)
    assert outside.read_text() == "not fc7's"
    assert "# Classifier report" in (out / "report.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(ours + ["notes.md", "part-time.xlsx",
                                                                   "part-x"])


def test_train_refuses_a_folder_named_like_its_files(tmp_path: Path, capsys) -> None:
    emb = labelled(tmp_path / "emb")
    out = tmp_path / "clf"
    assert fc7(["train", str(emb), "--out", str(out)], capsys)[0] == 0
    (out / "metrics.json").unlink()
    (out / "metrics.json").mkdir()
    (out / "metrics.json" / "mine.txt").write_text("keep me")
    status, err = fc7(["train", str(emb), "--out", str(out), "--overwrite"], capsys)
    assert status == 1 and "metrics.json is a folder" in one_line_error(err, "train")
    assert (out / "metrics.json" / "mine.txt").read_text() == "keep me"


def test_predict_overwrite_deletes_only_its_own_parts(tmp_path: Path, capsys) -> None:
    emb = labelled(tmp_path / "emb", shards=3)
    one = labelled(tmp_path / "one", shards=1, seed=2)
    model, out = tmp_path / "model", tmp_path / "pred"
    assert fc7(["train", str(emb), "--out", str(model)], capsys)[0] == 0
    argv = ["predict", str(model), str(emb), "--out", str(out), "--batch-size", "50"]
    assert fc7(argv, capsys)[0] == 0
    assert len(list(out.glob("part-*.parquet"))) == 6
    status, err = fc7(argv, capsys)
    assert status == 1 and "pass --overwrite" in one_line_error(err, "predict")

    plant_user_files(out)
    (out / "part-00099.parquet").mkdir()  # a folder under a part name is not a part
    status, err = fc7([*argv, "--overwrite"], capsys)
    assert status == 1
    line = one_line_error(err, "predict")
    assert "(notes.md, part-00099.parquet/, part-time.xlsx, part-x/)" in line
    assert len(list(out.glob("part-0000*.parquet"))) == 6
    assert_user_files_survive(out)

    (out / "part-00099.parquet").rmdir()
    shutil.copy(emb / "part-00000.parquet", out / "part-00007.parquet")  # embeddings, not ours
    status, err = fc7([*argv, "--overwrite"], capsys)
    assert status == 1 and "part-00007.parquet" in one_line_error(err, "predict")
    assert (out / "part-00007.parquet").read_bytes() == (emb / "part-00000.parquet").read_bytes()

    (out / "part-00007.parquet").unlink()
    for name in ("notes.md", "part-time.xlsx"):
        (out / name).unlink()
    shutil.rmtree(out / "part-x")
    (out / f".part-00003.parquet.{'a' * 32}.tmp").write_bytes(b"left by a killed run")
    smaller = ["predict", str(model), str(one), "--out", str(out), "--overwrite"]
    assert fc7(smaller, capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet"]  # no stale parts
    assert pq.read_table(out).num_rows == 240
