"""Readers: one work unit -> its raw records, one per input sample, never raising for a bad sample.

A raw record holds the sample's raw fields (mapped and type-checked later, in validate.py), its image
bytes when it has one, and the first error met while reading (missing file, unreadable JSON...). Every
input yields exactly one record, so counting records counts inputs.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.sources import IMAGE_FILE_EXTS, SourceConfig, Unit

IMAGE_CANDIDATES = ("image", "img", "image_path", "jpg", "png")
WDS_KNOWN = (*IMAGE_FILE_EXTS, "txt", "text", "caption", "json", "cls")
"""Webdataset member types read; any other member is counted as ignored and never decoded (no pickles)."""
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)
"""What a damaged tar / gzip stream raises while it is read."""
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


@dataclass
class RawRecord:
    source_key: str
    """The sample's key in its source (before make_key)."""
    location: str
    """Where the input lives: file path, path:line, path#row, shard:key."""
    row: dict[str, Any] = field(default_factory=dict)
    """Raw fields by name, not yet type-checked."""
    image: bytes | None = None
    error: tuple[str, str] | None = None
    """(reason, detail) of the first read error; the sample is rejected with it."""
    ignored: list[str] = field(default_factory=list)
    """Member types skipped (webdataset members of unknown types)."""
    class_names: list[str] | None = None
    """Names of the label classes when the source declares them (HF ClassLabel)."""


def pick_field(row: dict[str, Any], configured: str, candidates: tuple[str, ...]) -> str | None:
    """The configured column, or the first candidate present in the row."""
    if configured:
        return configured if configured in row else None
    return next((c for c in candidates if c in row), None)


def resolve_path(value: str, base: str) -> str:
    if "://" in value or value.startswith("/"):
        return value
    return f"{base.rstrip('/')}/{value}"


def read_bytes(path: str) -> tuple[bytes | None, tuple[str, str] | None]:
    try:
        if "://" not in path and "::" not in path:  # a local file: fsspec's per-call set-up costs more than the read
            with open(path, "rb") as f:
                return f.read(), None
        with fsspec.open(path, "rb") as f:
            return f.read(), None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None, ("missing_file", path)
    except Exception as exc:  # permissions, network, filesystem errors of any fsspec backend
        return None, ("read_error", f"{path}: {type(exc).__name__}: {exc}")


def load_image_value(value: Any, base: str) -> tuple[bytes | None, tuple[str, str] | None]:
    """An image column's value (path, bytes, {bytes, path} or None) -> image bytes or an error."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None:
        return None, ("missing_image", "no image in the record")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), None
    if isinstance(value, str):
        if not value:
            return None, ("missing_image", "empty image path")
        return read_bytes(resolve_path(value, base))
    return None, ("bad_column_type", f"image field has type {type(value).__name__}")


def table_record(row: dict[str, Any], location: str, default_key: str, base: str, src: SourceConfig) -> RawRecord:
    """A manifest row (jsonl, parquet, HF) -> raw record with its image loaded."""
    key_col = pick_field(row, src.key_field, ("key", "id", "__key__"))
    key_value = row.get(key_col) if key_col else None
    rec = RawRecord(source_key=default_key, location=location, row=row)
    if (isinstance(key_value, str) and key_value) or (isinstance(key_value, int) and not isinstance(key_value, bool)):
        rec.source_key = str(key_value)
    elif key_col is not None:
        rec.error = ("bad_column_type", f"key field {key_col!r} has type {type(key_value).__name__}")
    img_col = pick_field(row, src.image_field, IMAGE_CANDIDATES)
    value = row.pop(img_col) if img_col else None
    if src.has_images and rec.error is None:
        rec.image, rec.error = load_image_value(value, base)
    return rec


def _read_jsonl(unit: Unit, src: SourceConfig) -> Iterator[RawRecord]:
    name = unit.path.rsplit("/", 1)[-1]
    with fsspec.open(unit.path, "rb") as f:
        for lineno, line in enumerate(f):
            if lineno >= unit.stop:
                break
            if lineno < unit.start or not line.strip():
                continue  # blank lines are not inputs
            location, default_key = f"{unit.path}:{lineno + 1}", f"{name}:{lineno + 1}"
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield RawRecord(default_key, location, error=("non_utf8_text", str(exc)))
                continue
            except (ValueError, RecursionError) as exc:  # bad JSON, too deep, an integer past Python's digit cap
                yield RawRecord(default_key, location, error=("bad_json", f"{type(exc).__name__}: {exc}"))
                continue
            if not isinstance(row, dict):
                yield RawRecord(default_key, location, error=("bad_json", f"line is a {type(row).__name__}"))
                continue
            yield table_record(row, location, default_key, unit.base, src)


def _unreadable(unit: Unit, detail: str, reason: str = "corrupt_file") -> RawRecord:
    """The one input standing for a file that cannot be read at all (named in the ledger)."""
    tail = unit.path.rsplit("/", 1)[-1]
    return RawRecord(f"{tail}#unreadable", unit.path, error=(reason, f"{unit.path}: {detail}"))


def _read_parquet(unit: Unit, src: SourceConfig) -> Iterator[RawRecord]:
    name = unit.path.rsplit("/", 1)[-1]
    if unit.error:
        yield _unreadable(unit, unit.error)
        return
    try:
        with fsspec.open(unit.path, "rb") as f:
            rows = pq.ParquetFile(f).read_row_group(unit.row_group).to_pylist()
    except Exception as exc:  # a damaged page or footer: every row of the group is rejected, by location
        detail = f"row group {unit.row_group}: {type(exc).__name__}: {exc}"
        for i in range(unit.stop):
            yield RawRecord(
                f"{name}:{unit.row_group}:{i}",
                f"{unit.path}#rg{unit.row_group}:{i}",
                error=("corrupt_file", f"{unit.path}: {detail}"),
            )
        return
    for i, row in enumerate(rows):
        location = f"{unit.path}#rg{unit.row_group}:{i}"
        yield table_record(row, location, f"{name}:{unit.row_group}:{i}", unit.base, src)


def _read_folder(unit: Unit, src: SourceConfig) -> Iterator[RawRecord]:
    for stem, exts in unit.items:
        images = [e for e in exts if e.lower() in IMAGE_FILE_EXTS]
        location = f"{unit.base}/{stem}.{images[0]}" if images else f"{unit.base}/{stem}"
        rec = RawRecord(source_key=stem, location=location, row={"__key__": stem}, ignored=images[1:])
        if "txt" in exts:
            rec.row["txt"], rec.error = read_bytes(f"{unit.base}/{stem}.txt")
        if "json" in exts and rec.error is None:
            data, rec.error = read_bytes(f"{unit.base}/{stem}.json")
            rec.error = rec.error or _merge_json(rec.row, data or b"")
        if src.has_images and rec.error is None:
            if images:
                rec.image, rec.error = read_bytes(location)
            else:
                rec.error = ("missing_image", f"no image file beside {stem}.{'/'.join(exts)}")
        yield rec


def _merge_json(row: dict[str, Any], data: bytes) -> tuple[str, str] | None:
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return ("non_utf8_text", f"json: {exc}")
    except json.JSONDecodeError as exc:
        return ("bad_json", str(exc))
    if not isinstance(obj, dict):
        return ("bad_json", f"json member is a {type(obj).__name__}")
    for k, v in obj.items():
        row.setdefault(k, v)
    return None


def unsafe_member_name(name: str) -> bool:
    """An absolute name, a parent-directory step or a Windows path: never part of a sample we accept."""
    return name.startswith(("/", "\\")) or "\\" in name or bool(_DRIVE_RE.match(name)) or ".." in name.split("/")


def _wds_record(key: str, members: dict[str, bytes], unit: Unit, src: SourceConfig) -> RawRecord:
    rec = RawRecord(source_key=key.rsplit("/", 1)[-1], location=f"{unit.path}:{key}", row={"__key__": key})
    images = [e for e in members if e in IMAGE_FILE_EXTS]
    rec.ignored = [e for e in members if e not in WDS_KNOWN] + images[1:]
    for ext in ("txt", "text", "caption", "cls"):
        if ext in members:
            rec.row[ext] = members[ext]
    if "json" in members:
        rec.error = _merge_json(rec.row, members["json"])
    if src.has_images and rec.error is None:
        if images:
            rec.image = members[images[0]]
        else:
            rec.error = ("missing_image", f"no image member, members {sorted(members)}")
    return rec


def _tar_groups(unit: Unit) -> tuple[dict[str, dict[str, bytes]], dict[str, tuple[str, str]], str | None]:
    """Members grouped by key in order of first appearance, the problem of each bad group, and the error
    that ended reading early (None when the archive read to its end)."""
    tail = unit.path.rsplit("/", 1)[-1]
    groups: dict[str, dict[str, bytes]] = {}
    problems: dict[str, tuple[str, str]] = {}
    current: str | None = None
    try:
        with fsspec.open(unit.path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                head, _, base = info.name.rpartition("/")
                stem, _, ext = base.partition(".")
                key, ext = (f"{head}/{stem}" if head else stem), ext.lower()
                members = groups.setdefault(key, {})
                if key != current and members:
                    problems.setdefault(key, ("ungrouped_members", f"{tail}: members of {key!r} are not contiguous"))
                elif ext in members:
                    problems.setdefault(key, ("duplicate_member", f"{tail}: member {info.name!r} appears twice"))
                if unsafe_member_name(info.name):
                    problems.setdefault(key, ("unsafe_member_name", f"{tail}: member name {info.name!r}"))
                current = key
                # unknown member types and members of rejected groups are never read, let alone unpickled
                wanted = ext in WDS_KNOWN and key not in problems
                members[ext] = tar.extractfile(info).read() if wanted else b""
    except ARCHIVE_ERRORS as exc:
        error = f"{type(exc).__name__}: {exc}"
        if current is None:
            return groups, problems, error
        # the group being read when the archive broke off may be incomplete: never keep it
        problems.setdefault(current, ("truncated_archive", f"{tail}: archive ends inside {current!r}: {error}"))
    return groups, problems, None


def _read_webdataset(unit: Unit, src: SourceConfig) -> Iterator[RawRecord]:
    """Every key of the tar is one input. Groups are held until the archive ends (a unit is materialised by
    its task anyway), so a key whose members are scattered is found and rejected whole."""
    groups, problems, error = _tar_groups(unit)
    if error is not None:
        yield _unreadable(unit, error, "corrupt_archive")
        return
    for key, members in groups.items():
        if key in problems:
            rec = RawRecord(source_key=key.rsplit("/", 1)[-1], location=f"{unit.path}:{key}", error=problems[key])
            rec.ignored = [e for e in members if e not in WDS_KNOWN]
            yield rec
        else:
            yield _wds_record(key, members, unit, src)


def _hf_class_names(base: str) -> dict[str, list[str]]:
    info, err = read_bytes(f"{base}/dataset_info.json")
    if err is not None or info is None:
        return {}
    features = json.loads(info).get("features", {}) or {}
    return {
        col: spec["names"]
        for col, spec in features.items()
        if isinstance(spec, dict) and spec.get("_type") == "ClassLabel" and "names" in spec
    }


def _read_hf(unit: Unit, src: SourceConfig) -> Iterator[RawRecord]:
    names = _hf_class_names(unit.base)
    file_name = unit.path.rsplit("/", 1)[-1]
    try:
        with fsspec.open(unit.path, "rb") as f:
            table = pa.ipc.open_stream(f).read_all()
    except Exception as exc:  # not an arrow stream, or a damaged one
        yield _unreadable(unit, f"{type(exc).__name__}: {exc}")
        return
    label_col = src.label_field or next((c for c in ("label", "cls") if c in table.column_names), None)
    for i, row in enumerate(table.to_pylist()):
        rec = table_record(row, f"{unit.path}#{i}", f"{file_name}:{i}", unit.base, src)
        rec.class_names = names.get(label_col or "")
        yield rec


READERS = {
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "image_folder": _read_folder,
    "webdataset": _read_webdataset,
    "hf_disk": _read_hf,
}


def read_unit(unit: Unit, src: SourceConfig) -> Iterator[RawRecord]:
    """The unit's raw records in their fixed order."""
    return READERS[src.format](unit, src)
