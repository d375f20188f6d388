"""Atomic files: a failed write leaves the old file (or nothing) and no temporary beside it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from common.io import atomic_path, atomic_write_json, file_sha256, folder_sha256, json_sha256


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError, match="disk"), atomic_path(target) as tmp:
        tmp.write_text('{"v": 2, "trunc')
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_folder_is_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "final"
    for files in ({"a": "1", "b": "2"}, {"c": "3"}):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            for name, text in files.items():
                (tmp / name).write_text(text)
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_hashes_follow_content_not_formatting(tmp_path: Path) -> None:
    assert json_sha256({"a": 1, "b": [1, 2]}) == json_sha256({"b": [1, 2], "a": 1})
    assert json_sha256({"a": 1}) != json_sha256({"a": 2})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"x" * 3_000_000)
    before = folder_sha256(tmp_path / "d")
    assert file_sha256(tmp_path / "d" / "x") == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    (tmp_path / "d" / "x").write_bytes(b"y" * 3_000_000)
    assert folder_sha256(tmp_path / "d") != before
    assert folder_sha256(tmp_path / "missing") is None
