"""Deterministic, atomic webdataset tar writing and the reading helpers every stage shares.

Byte-reproducible: member order is the sample order, then MEMBER_ORDER inside a sample; mtime, uid, gid,
owner names and modes are fixed. Atomic: a shard is written to ``NAME.tmp`` and renamed into place only once
complete, so a crash never leaves a half shard under its final name; a write error (a full disk) removes the
temporary file and raises an OSError that names the shard.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from data_prep.schema import KEY_FIELD, MEMBER_ORDER, Sample, SchemaError, decode_sample, validate_key

FIXED_MTIME = 0
TMP_SUFFIX = ".tmp"


def shard_name(prefix: str, index: int, ext: str = "tar") -> str:
    """``{prefix}-{index:06d}.tar``: contiguous, sortable shard names."""
    return f"{prefix}-{index:06d}.{ext}"


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _ordered_fields(record: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    key = record[KEY_FIELD]
    fields = {k: v for k, v in record.items() if not k.startswith("__")}
    unknown = sorted(set(fields) - set(MEMBER_ORDER))
    if unknown:
        raise SchemaError(f"sample {key}: unknown fields {unknown}")
    return [(ext, fields[ext]) for ext in MEMBER_ORDER if ext in fields]


class TarShardWriter:
    """Write encoded samples (``{"__key__": ..., ext: bytes}``) into one tar, atomically.

    Use as a context manager; the tar appears under its final name only when the block exits cleanly.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + TMP_SUFFIX)
        self.count = 0
        self.keys: set[str] = set()
        self._buf: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> TarShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._buf = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.USTAR_FORMAT)
        return self

    @property
    def bytes_written(self) -> int:
        assert self._buf is not None
        return self._buf.tell()

    def write(self, record: Mapping[str, Any]) -> None:
        assert self._tar is not None, "use TarShardWriter as a context manager"
        key = validate_key(str(record[KEY_FIELD]))
        if key in self.keys:
            raise SchemaError(f"duplicate key {key!r} in shard {self.path.name}")
        self.keys.add(key)
        fields = _ordered_fields(record)
        for ext, data in fields:
            if not isinstance(data, bytes | bytearray):
                raise SchemaError(f"sample {key}: field {ext!r} must be bytes, got {type(data).__name__}")
        try:
            for ext, data in fields:
                self._tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
        except OSError as err:  # a full disk (ENOSPC), a lost mount: say which shard
            raise OSError(err.errno, err.strerror or str(err), str(self.path)) from err
        self.count += 1

    def _discard(self) -> None:
        assert self._buf is not None
        with contextlib.suppress(OSError):  # closing flushes the buffer, which fails again on a full disk
            self._buf.close()
        self.tmp_path.unlink(missing_ok=True)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._tar is not None and self._buf is not None
        if exc_type is not None:
            self._discard()
            return
        try:
            self._tar.close()
            self._buf.flush()
            os.fsync(self._buf.fileno())
            self._buf.close()
        except OSError as err:
            self._discard()
            raise OSError(err.errno, err.strerror or str(err), str(self.path)) from err
        os.replace(self.tmp_path, self.path)


def write_tar(path: str | Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Write all records into one shard; returns the number of samples."""
    with TarShardWriter(path) as writer:
        for record in records:
            writer.write(record)
    return writer.count


def iter_tar_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Group a shard's members by key, in file order (for tests and tools; training reads via Ray Data)."""
    current: dict[str, Any] | None = None
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            f = tar.extractfile(info)
            data = f.read() if f is not None else b""
            if current is None or current[KEY_FIELD] != key:
                if current is not None:
                    yield current
                current = {KEY_FIELD: key}
            current[ext] = data
    if current is not None:
        yield current


def read_samples(path: str | Path) -> Iterator[Sample]:
    for record in iter_tar_records(path):
        yield decode_sample(record)
