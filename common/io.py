"""Files that are either whole or absent, and the content hashes the stages compare.

Every file one step hands to the next (manifests, records, stage weights) is written to a temporary name beside
its target and renamed over it: a reader (or a rerun after a crash) sees the old file or the new one, never half
of one. The temporary name carries the writer's PID, so two processes writing the same target do not share a
temporary file. No fsync: a power cut may lose the newest file, but never leaves a torn one in its place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def temporary_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write (a file or a folder); it replaces ``path`` when the block succeeds and is
    removed when the block fails. A folder target that exists is replaced whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():  # os.replace cannot rename a folder over a non-empty one
            old = path.with_name(f"{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def canonical_json(obj: Any, *, indent: int | None = 2) -> str:
    """Sorted keys; values JSON cannot hold (paths, dates) as their ``str``."""
    return json.dumps(obj, indent=indent, sort_keys=True, default=str)


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    atomic_write_text(path, canonical_json(obj, indent=indent) + "\n")


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_sha256(obj: Any) -> str:
    """The hash of a JSON-able value, independent of key order and formatting."""
    return bytes_sha256(canonical_json(obj, indent=None).encode())


def file_sha256(path: Path) -> str:
    """Hash of one file, read in 1 MiB chunks (shards can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_sha256(path: Path) -> str | None:
    """Hash of a small folder's files (names and contents) or of one file; None when it is not there."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not all(f.is_file() for f in files):
        return None
    digest = hashlib.sha256()
    for f in files:
        name = str(f.relative_to(path)) if path.is_dir() else f.name
        digest.update(name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def lines_sha256(lines: Iterable[str]) -> str:
    """Hash of a sequence of strings (e.g. sample keys), one per line."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()
