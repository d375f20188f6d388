import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.readers import read_unit
from data_prep.sources import SourceConfig, list_units
from tests.data_prep.curate_fixtures import build_world, encode, pattern, write_jsonl, write_webdataset


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, dict]:
    return build_world(tmp_path_factory.mktemp("world"))


def _records(spec: dict) -> list:
    src = SourceConfig(**spec)
    return [r for u in list_units(src) for r in read_unit(u, src)]


def test_jsonl_relative_absolute_missing_and_bad_lines(world):
    listed = _records(world["captions"])
    assert len(listed) == 25  # every non-blank line is one input
    assert [r.source_key for r in listed].count("c0") == 2  # a repeated key is still an input
    recs = {r.source_key: r for r in reversed(listed)}
    assert recs["c0"].image[:8] == b"\x89PNG\r\n\x1a\n" and recs["c0"].error is None
    assert recs["abs"].image is not None  # absolute path
    assert recs["missing"].error[0] == "missing_file"
    assert recs["noimage"].error[0] == "missing_image"
    assert recs["manifest.jsonl:23"].error[0] == "bad_json"
    assert recs["manifest.jsonl:24"].error[0] == "non_utf8_text"
    assert recs["c0"].location.endswith("manifest.jsonl:1")


def test_jsonl_units_split_lines(world):
    units = list_units(SourceConfig(**world["captions"]))
    assert [(u.start, u.stop) for u in units] == [(0, 8), (8, 16), (16, 24), (24, 25)]


def test_parquet_inline_bytes(world):
    recs = _records(world["photos"])
    assert [r.source_key for r in recs][:2] == ["astro", "coffee"]
    assert all(r.image and r.error is None for r in recs)
    assert recs[0].row["caption"] == "an astronaut in a space suit"


def test_parquet_paths_and_uri(tmp_path):
    pattern(1).save(tmp_path / "a.png")
    pq.write_table(
        pa.table({"id": ["a", "b"], "image": ["a.png", "zz.png"], "caption": ["x y", "x y"]}), tmp_path / "m.parquet"
    )
    recs = _records({"name": "p", "kind": "caption", "format": "parquet", "path": f"file://{tmp_path}"})
    assert recs[0].image is not None and recs[1].error[0] == "missing_file"


def test_image_folder_sidecars(world):
    recs = {r.source_key: r for r in _records(world["folder"])}
    assert set(recs) == {"000000", "000001", "000002", "astro", "badjson", "badtext", "orphan"}
    assert recs["000001"].row["txt"] == b"a drawn shape number 1"
    assert recs["000001"].row["shape"] == "circle"
    assert recs["orphan"].error[0] == "missing_image"
    assert recs["badjson"].error[0] == "bad_json"


def test_webdataset_tgz_groups_members_and_never_unpickles(world):
    recs = {r.source_key: r for r in _records(world["charts"])}
    assert set(recs) == {"chart0", "chart1", "chart2", "noconv", "onlyjson"}
    assert recs["chart0"].ignored == ["pyd"]
    assert "pyd" not in recs["chart0"].row
    assert recs["chart0"].row["conversation"][1]["content"] == "B"
    assert recs["onlyjson"].error[0] == "missing_image"


def test_webdataset_plain_tar_and_truncated_tar(tmp_path):
    samples = [{"__key__": f"k{i}", "jpg": encode(pattern(i), "JPEG"), "txt": b"two words"} for i in range(3)]
    good = write_webdataset(tmp_path / "a" / "s-000000.tar", samples)
    spec = {"name": "w", "kind": "caption", "format": "webdataset", "path": str(tmp_path / "a")}
    assert [r.source_key for r in _records(spec)] == ["k0", "k1", "k2"]
    data = good.read_bytes()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "s-000000.tar").write_bytes(data[: len(data) // 2])
    recs = _records({**spec, "path": str(tmp_path / "b")})
    assert [r.error for r in recs[:-1]] == [None] * (len(recs) - 1)  # whole groups before the cut are kept
    assert recs[-1].error[0] == "truncated_archive"  # the group cut off is one counted, rejected input


def test_hf_disk_class_names(world):
    recs = _records(world["hf"])
    assert len(recs) == 4
    assert recs[0].class_names == ["cat", "dog"] and recs[0].image is not None
    assert recs[1].row["label"] == 1


def test_hf_dataset_dict_split(tmp_path, world):
    root = Path(world["hf"]["path"])
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    (tmp_path / "dd" / "train").symlink_to(root)
    recs = _records({**world["hf"], "path": str(tmp_path / "dd"), "split": "train"})
    assert len(recs) == 4


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_units(SourceConfig(name="x", kind="caption", format="jsonl", path=str(tmp_path / "none")))
    write_jsonl(tmp_path / "m.jsonl", [])
    assert list_units(SourceConfig(name="x", kind="caption", format="jsonl", path=str(tmp_path))) == []


def test_source_config_validation_names_field():
    with pytest.raises(ValueError, match="kind"):
        SourceConfig(name="x", kind="nope", format="jsonl", path="p")
    with pytest.raises(ValueError, match="format"):
        SourceConfig(name="x", kind="text", format="csv", path="p")
    with pytest.raises(ValueError, match="name"):
        SourceConfig(name="a.b", kind="text", format="jsonl", path="p")


def test_remote_fsspec_uri_jsonl_and_folder():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/remote/j/images/a.png", encode(pattern(1)))
    fs.pipe("/remote/j/m.jsonl", b'{"id": "a", "image": "images/a.png", "caption": "two words"}\n')
    fs.pipe("/remote/f/x.png", encode(pattern(2)))
    fs.pipe("/remote/f/x.txt", b"a caption")
    (rec,) = _records({"name": "j", "kind": "caption", "format": "jsonl", "path": "memory://remote/j/m.jsonl"})
    assert rec.error is None and rec.image == encode(pattern(1))
    assert rec.location.startswith("memory://")
    (rec,) = _records({"name": "f", "kind": "caption", "format": "image_folder", "path": "memory://remote/f"})
    assert rec.error is None and rec.row["txt"] == b"a caption"
