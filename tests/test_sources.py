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


def test_an_object_store_folder_is_walked_in_the_order_of_a_local_folder(tmp_path):
    # Names whose order by name ("cat" < "cat-1.jpg") differs from an object store's key order
    # ("cat-1.jpg" < "cat/"): the plan's order must not depend on the walker, nor change if
    # listings are ever streamed page by page. A SubTreeFileSystem is not a LocalFileSystem, so
    # it is walked as an object store is.
    import pyarrow.fs as pafs

    from pipeline.sources import _walk_folder

    names = ["cat/a.jpg", "cat-1/b.png", "cat-1.jpg", "cat.jpg", "cat0.jpg", "B.JPG", "a b.jpg",
             "ünï 名.jpg", "notes.txt", "cat/deeper/c.webp"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    store = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    walked = list(_walk_folder(store, "", lambda path: f"s3://bucket/{path}"))
    local = list(iter_inputs(str(tmp_path)))
    assert [item.id for item in walked] == [item.id for item in local] == sorted(
        (name for name in names if name != "notes.txt"), key=lambda i: i.split("/"))
    assert [item.label for item in walked] == [item.label for item in local]
    assert walked[0].path == "s3://bucket/B.JPG"
