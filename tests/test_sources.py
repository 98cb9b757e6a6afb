import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import hostile_corpus

from pipeline.errors import SourceError
from pipeline.sources import InputImage, iter_inputs


def test_folder_walk_is_sorted_recursive_and_keeps_every_image_name(tmp_path):
    expected = hostile_corpus(tmp_path)
    found = list(iter_inputs(str(tmp_path)))
    assert [item.id for item in found] == sorted(expected, key=lambda i: i.split("/"))
    by_id = {item.id: item for item in found}
    assert by_id["odd/folder.jpg/inside.png"].label == "odd"
    assert by_id["top-level.JPEG"].label is None
    assert by_id["broken/dangling.jpg"].path == str(tmp_path / "broken/dangling.jpg")
    assert "odd/notes.txt" not in by_id


def test_manifests_resolve_relative_paths_and_read_labels_and_ids(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists/a.txt").write_text("# comment\n../img/x.jpg\n\n/abs/y.png\n")
    assert list(iter_inputs(str(tmp_path / "lists/a.txt"))) == [
        InputImage("../img/x.jpg", str(tmp_path / "img/x.jpg"), None),
        InputImage("/abs/y.png", "/abs/y.png", None),
    ]
    (tmp_path / "b.csv").write_text("id,path,label,extra\nfirst,img/x.jpg,cat,1\n,y.jpg,,2\n")
    assert list(iter_inputs(str(tmp_path / "b.csv"))) == [
        InputImage("first", str(tmp_path / "img/x.jpg"), "cat"),
        InputImage("y.jpg", str(tmp_path / "y.jpg"), None),
    ]
    pq.write_table(pa.table({"path": ["z.jpg"], "label": [7]}), tmp_path / "c.parquet")
    assert list(iter_inputs(str(tmp_path / "c.parquet"))) == [
        InputImage("z.jpg", str(tmp_path / "z.jpg"), "7")
    ]


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(SourceError, match="no such folder"):
        list(iter_inputs(str(tmp_path / "missing")))
    (tmp_path / "m.csv").write_text("file,label\na.jpg,x\n")
    with pytest.raises(SourceError, match="no 'path' column \\(columns: file, label\\)"):
        list(iter_inputs(str(tmp_path / "m.csv")))
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(SourceError, match="not a folder or a manifest"):
        list(iter_inputs(str(tmp_path / "photo.jpg")))
