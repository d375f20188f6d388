"""Source specs and work units: what a curation job reads, cut into pieces a Ray task processes whole.

A unit is the grain of parallelism and of resume: a range of jsonl lines, a parquet row group, a chunk of
an image folder, one webdataset shard, one arrow file of an HF dataset. Units are listed on the driver in
a sorted, deterministic order; their index fixes the order of samples in the curated shards.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath

import fsspec
import pyarrow.parquet as pq

from data_prep.filters import FilterConfig
from data_prep.schema import SOURCE_KINDS

FORMATS = ("jsonl", "parquet", "image_folder", "webdataset", "hf_disk")
IMAGE_FILE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
LAION_SCORE_COLUMNS = {"clip": "similarity", "watermark": "pwatermark", "nsfw": "punsafe", "aesthetic": "aesthetic"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(kw_only=True)
class SourceConfig:
    name: str
    """Source name: output folder, shard prefix and key prefix ([A-Za-z0-9_-], no dots)."""
    kind: str
    """One of schema.SOURCE_KINDS (caption, chart_doc, synthetic_aesthetic, text, class_label, sft_multimodal)."""
    format: str
    """One of jsonl, parquet, image_folder, webdataset, hf_disk."""
    path: str
    """File, directory or glob; local or any fsspec/pyarrow URI (s3://, gs://, file://...)."""
    split: str = "train"
    """Split to read when an hf_disk path is a DatasetDict (has dataset_dict.json)."""
    key_field: str = ""
    """Column / JSON field with the sample's key in its source; '' tries key, id, __key__, else the location."""
    image_field: str = ""
    """Column with a path (relative to the manifest, absolute or URI), inline bytes or {bytes, path};
    '' tries image, img, image_path, jpg, png. Folders and webdataset use the image file / member."""
    text_field: str = ""
    """Caption / prompt / document text; '' tries caption, text, txt, prompt."""
    label_field: str = ""
    """Integer class label; '' tries label, cls."""
    class_name_field: str = ""
    """Class name; '' tries class_name, or the HF ClassLabel name of the label."""
    conversation_field: str = ""
    """List of {role, content} (or ShareGPT {from, value}) turns; '' tries conversation, conversations."""
    score_fields: dict[str, str] = field(default_factory=lambda: dict(LAION_SCORE_COLUMNS))
    """Score name -> column, used when the column is present (LAION metadata names by default)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Filters for this source (DataComp/LAION-style defaults)."""
    dedup: bool = True
    """Take part in global dedup; off for synthetic sources whose distinct samples legitimately look alike."""
    unit_size: int = 256
    """Samples per work unit for jsonl lines and image-folder files (a unit is one Ray task)."""

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"sources.name {self.name!r} must be 1-64 characters of [A-Za-z0-9_-]")
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"sources[{self.name}].kind {self.kind!r} is not one of {sorted(SOURCE_KINDS)}")
        if self.format not in FORMATS:
            raise ValueError(f"sources[{self.name}].format {self.format!r} is not one of {FORMATS}")
        if not self.path:
            raise ValueError(f"sources[{self.name}].path is empty")
        if self.unit_size < 1:
            raise ValueError(f"sources[{self.name}].unit_size must be >= 1, got {self.unit_size}")

    @property
    def task(self) -> str:
        return SOURCE_KINDS[self.kind]

    @property
    def has_images(self) -> bool:
        return self.kind != "text"


@dataclass
class Unit:
    """One piece of work: enough to read its samples on any node."""

    source: str
    index: int
    path: str
    start: int = 0
    stop: int = 0
    row_group: int = -1
    items: list[list] = field(default_factory=list)
    """image_folder: [stem, [member extensions]] pairs."""
    base: str = ""
    """Directory relative image paths resolve against; for folders, the folder."""
    error: str = ""
    """Why the file could not even be listed (damaged footer, not the format): the unit is one rejected input."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Unit:
        return cls(**json.loads(text))


def url_to_fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(path)


def full_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path that fsspec opens again on any node (protocol kept for remote filesystems)."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")


def list_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files under a file, directory or glob whose names end with one of ``suffixes``; sorted."""
    fs, root = url_to_fs(path)
    if fs.isfile(root):
        found = [root]
    elif fs.isdir(root):
        found = fs.find(root)
    else:
        found = fs.glob(root)
    out = [p for p in found if p.lower().endswith(suffixes) and fs.isfile(p)]
    if not out:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files at {path}")
    return sorted(full_path(fs, p) for p in out)


def parent_dir(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."


def _jsonl_units(src: SourceConfig) -> list[Unit]:
    units: list[Unit] = []
    for path in list_files(src.path, (".jsonl", ".json")):
        with fsspec.open(path, "rb") as f:
            n_lines = sum(1 for _ in f)
        for start in range(0, n_lines, src.unit_size):
            stop = min(n_lines, start + src.unit_size)
            units.append(Unit(src.name, len(units), path, start=start, stop=stop, base=parent_dir(path)))
    return units


def _parquet_units(src: SourceConfig) -> list[Unit]:
    units: list[Unit] = []
    for path in list_files(src.path, (".parquet",)):
        try:
            with fsspec.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
        except Exception as exc:  # zero bytes, no footer, not parquet: one rejected input, not a failed job
            units.append(Unit(src.name, len(units), path, base=parent_dir(path), error=f"{type(exc).__name__}: {exc}"))
            continue
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            units.append(Unit(src.name, len(units), path, stop=rows, row_group=rg, base=parent_dir(path)))
    return units


def _folder_units(src: SourceConfig) -> list[Unit]:
    fs, root = url_to_fs(src.path)
    if not fs.isdir(root):
        raise FileNotFoundError(f"image folder {src.path} is not a directory")
    members: dict[str, list[str]] = {}
    for p in sorted(fs.find(root)):
        rel = str(PurePosixPath(p).relative_to(PurePosixPath(root)))
        stem, dot, ext = rel.rpartition(".")
        if not dot or "/" in ext:
            stem, ext = rel, ""
        if ext.lower() in (*IMAGE_FILE_EXTS, "txt", "json"):
            members.setdefault(stem, []).append(ext)
    stems = sorted(members)
    base = full_path(fs, root)
    return [
        Unit(src.name, i, base, items=[[s, members[s]] for s in stems[start : start + src.unit_size]], base=base)
        for i, start in enumerate(range(0, len(stems), src.unit_size))
    ]


def _hf_units(src: SourceConfig) -> list[Unit]:
    fs, root = url_to_fs(src.path)
    if fs.exists(f"{root}/dataset_dict.json"):
        root = f"{root}/{src.split}"
    state_path = f"{root}/state.json"
    if not fs.exists(state_path):
        raise FileNotFoundError(f"{src.path}: no state.json (not a datasets save_to_disk directory)")
    with fs.open(state_path, "r") as f:
        files = [d["filename"] for d in json.load(f)["_data_files"]]
    base = full_path(fs, root)
    return [Unit(src.name, i, f"{base}/{name}", base=base) for i, name in enumerate(files)]


def list_units(src: SourceConfig) -> list[Unit]:
    """The source's work units in their fixed order."""
    if src.format == "jsonl":
        return _jsonl_units(src)
    if src.format == "parquet":
        return _parquet_units(src)
    if src.format == "image_folder":
        return _folder_units(src)
    if src.format == "webdataset":
        files = list_files(src.path, TAR_SUFFIXES)
        return [Unit(src.name, i, p, base=parent_dir(p)) for i, p in enumerate(files)]
    return _hf_units(src)
