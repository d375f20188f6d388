"""The shard sample schema: keys, metadata, encode/decode, and a round trip through webdataset."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.schema import (
    MEMBER_ORDER,
    Sample,
    SampleMeta,
    SchemaError,
    decode_sample,
    encode_sample,
    make_key,
    validate_key,
)
from data_prep.shards import read_samples, shard_name, write_tar


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _samples() -> list[Sample]:
    conv = [{"role": "user", "content": "<image>\nWhich bar is highest?"}, {"role": "assistant", "content": "B"}]
    return [
        Sample(
            key=make_key("charts", "a/b.c.png"),
            meta=SampleMeta(
                source="charts",
                source_key="a/b.c.png",
                task="chart_doc",
                width=8,
                height=8,
                conversation=conv,
                scores={"clip": 0.3},
            ),
            image=_png((255, 0, 0)),
            image_ext="png",
        ),
        Sample(
            key=make_key("digits", "7"),
            meta=SampleMeta(source="digits", source_key="7", task="class_label", label=7, class_name="7"),
            image=_png((0, 0, 0)),
            image_ext="png",
            text="a handwritten digit 7",
            vq=np.arange(16, dtype=np.int16),
        ),
        Sample(
            key=make_key("text", "0"),
            meta=SampleMeta(source="text", source_key="0", task="text"),
            text="Héllo, ünïcode ✓",
        ),
        Sample(
            key=make_key("shapes", "1"),
            meta=SampleMeta(source="shapes", source_key="1", task="t2i"),
            image=_png((0, 0, 255)),
            image_ext="png",
            text="a blue square",
            latent=np.ones((4, 8, 8), dtype=np.float16),
        ),
    ]


def test_keys_are_stable_dotless_and_distinct() -> None:
    key = make_key("my.source", "dir/file.name.jpg")
    assert key == make_key("my.source", "dir/file.name.jpg")
    assert "." not in key and "/" not in key
    assert make_key("s", "a.b") != make_key("s", "a_b")  # same slug, different source keys
    for bad in ["a.b", "a/b", "", "x" * 201]:
        with pytest.raises(SchemaError):
            validate_key(bad)


def test_meta_validation() -> None:
    with pytest.raises(SchemaError, match="task"):
        SampleMeta(source="s", source_key="k", task="nope")
    with pytest.raises(SchemaError, match="role"):
        SampleMeta(source="s", source_key="k", task="sft", conversation=[{"role": "bot", "content": "x"}])
    with pytest.raises(SchemaError, match="unknown metadata"):
        SampleMeta.from_json(b'{"source": "s", "source_key": "k", "task": "text", "surprise": 1}')


def test_sample_validation() -> None:
    meta = SampleMeta(source="s", source_key="k", task="t2i")
    with pytest.raises(SchemaError, match="together"):
        Sample(key="k", meta=meta, image=b"x")
    with pytest.raises(SchemaError, match="extension"):
        Sample(key="k", meta=meta, image=b"x", image_ext="gif")
    with pytest.raises(SchemaError, match="int16 or int32"):
        Sample(key="k", meta=meta, vq=np.zeros(3, dtype=np.float32))
    with pytest.raises(SchemaError, match="unknown fields"):
        decode_sample({"__key__": "k", "json": meta.to_json(), "pth": b"\x80"})


def test_round_trip_through_webdataset(tmp_path: Path) -> None:
    samples = _samples()
    path = tmp_path / shard_name("mixed", 0)
    assert write_tar(path, (encode_sample(s) for s in samples)) == len(samples)
    # Stock webdataset reads it, with our decoder on its raw records.
    back = [decode_sample(r) for r in wds.WebDataset(str(path), shardshuffle=False)]
    assert [b.key for b in back] == [s.key for s in samples]
    for a, b in zip(samples, back, strict=True):
        assert (a.meta, a.image, a.image_ext, a.text) == (b.meta, b.image, b.image_ext, b.text)
        for field_a, field_b in ((a.vq, b.vq), (a.latent, b.latent)):
            assert (field_a is None and field_b is None) or (
                field_a.dtype == field_b.dtype and np.array_equal(field_a, field_b)
            )
    assert [s.key for s in read_samples(path)] == [s.key for s in samples]


def test_tar_is_byte_reproducible_with_fixed_headers(tmp_path: Path) -> None:
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write_tar(a, (encode_sample(s) for s in _samples()))
    write_tar(b, (encode_sample(s) for s in _samples()))
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
    exts = [m.name.split(".", 1)[1] for m in members[:2]]
    assert exts == sorted(exts, key=MEMBER_ORDER.index)


def test_failed_write_leaves_no_shard(tmp_path: Path) -> None:
    path = tmp_path / "x.tar"
    good = encode_sample(_samples()[0])
    with pytest.raises(SchemaError, match="duplicate key"):
        write_tar(path, [good, good])
    assert not path.exists() and not list(tmp_path.iterdir())
