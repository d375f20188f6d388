"""The manifests one stage hands to the next, each a versioned dataclass that its writer and its readers share.

- :class:`CuratedManifest`: ``{curated}/{source}/manifest.json``, written by curation when a source's folder is
  complete (data_prep.curation), read by the mix (data_prep.stage_plan.load_source).
- :class:`StageManifest`: ``{stages}/{recipe}/{stage}/manifest.json``, written by the mix when a stage's shards
  are complete (data_prep.stage_shards), read by training (training.stages).

On disk each is one JSON object with sorted keys, written atomically (common.io), and carries
``manifest_version``. A reader refuses a file of another version, or one without a field this version needs,
with a :class:`ManifestError` that names the file and the field: a stage never guesses at what an older or
newer writer meant. Keys a reader does not know are ignored. Bump the version when a field changes meaning or
goes away; a new field with a default does not need one.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from common.io import atomic_write_json

MANIFEST_NAME = "manifest.json"
"""The manifest's file name in a curated source's folder and in a stage's folder."""
VERSION_KEY = "manifest_version"
CURATED_MANIFEST_VERSION = 1
STAGE_MANIFEST_VERSION = 1

T = TypeVar("T")
M = TypeVar("M", bound="Manifest")


class ManifestError(ValueError):
    """A manifest file this code cannot read: not JSON, another version, a missing or mistyped field."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


_SIMPLE = {int: (int,), float: (int, float), str: (str,), bool: (bool,), dict: (dict,), list: (list,)}


def _check_type(path: Path, name: str, value: Any, hint: Any) -> None:
    """A shallow check of one field's JSON type (the container, not its items), so a wrong file fails here."""
    allowed: tuple[type, ...] = ()
    for option in typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,):
        if option is type(None):
            allowed += (type(None),)
        else:
            allowed += _SIMPLE.get(typing.get_origin(option) or option, (object,))
    if isinstance(value, bool) and bool not in allowed:  # JSON true is not a count
        allowed = ()
    if not isinstance(value, allowed):
        raise ManifestError(path, f"field {name!r} is {type(value).__name__}, expected {hint}")


def _from_dict(cls: type[T], data: Any, path: Path, where: str = "") -> T:
    """``cls`` from its JSON object; every field without a default must be there."""
    if not isinstance(data, dict):
        raise ManifestError(path, f"{where or 'the file'} is not a JSON object")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f"{where}{f.name}"
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestError(path, f"missing field {name!r}")
            continue
        value = data[f.name]
        _check_type(path, name, value, hints[f.name])
        if f.name == "shards":
            item = typing.get_args(hints[f.name])[0]
            value = [_from_dict(item, s, path, f"{name}[{i}].") for i, s in enumerate(value)]
        kwargs[f.name] = value
    return cls(**kwargs)


def _read(cls: type[T], path: str | Path, version: int, writer: str) -> T:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(path, f"not a readable JSON manifest ({exc})") from exc
    if not isinstance(data, dict):
        raise ManifestError(path, "the file is not a JSON object")
    if VERSION_KEY not in data:
        raise ManifestError(
            path, f"missing field {VERSION_KEY!r}: written before manifests were versioned; rerun {writer}"
        )
    if data[VERSION_KEY] != version:
        raise ManifestError(
            path, f"{VERSION_KEY} {data[VERSION_KEY]!r} is not {version}, the version this code reads; rerun {writer}"
        )
    return _from_dict(cls, data, path)


class Manifest:
    """What the versioned manifests share: ``write`` (atomic JSON) and ``read`` (checked against ``VERSION``;
    the error names ``WRITER``, the job to rerun)."""

    VERSION: ClassVar[int]
    WRITER: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def write(self, path: str | Path) -> Path:
        atomic_write_json(Path(path), self.to_dict())
        return Path(path)

    @classmethod
    def read(cls: type[M], path: str | Path) -> M:
        return _read(cls, path, cls.VERSION, cls.WRITER)


@dataclass(kw_only=True)
class CuratedShard:
    name: str
    """The tar's file name in the source's folder."""
    samples: int
    bytes: int
    sha256: str


@dataclass(kw_only=True)
class CuratedManifest(Manifest):
    """A curated source's folder is complete: what it read, kept and rejected, and its shards."""

    source: str
    kind: str
    task: str
    """The task of its samples (data_prep.schema.TASKS)."""
    format: str
    path: str
    """Where the source was read from."""
    schema_version: int
    """Version of the sample schema of its shards (data_prep.schema.SCHEMA_VERSION)."""
    inputs: int
    kept: int
    rejected: int
    """inputs == kept + rejected, always."""
    rejects_by_reason: dict[str, int]
    bytes: int
    """Bytes of all its tars."""
    shards: list[CuratedShard]
    config_hash: str
    """data_prep.curation.content_config_hash of the curation that wrote it."""
    ignored_members: dict[str, int] = field(default_factory=dict)
    """Webdataset members of extensions no sample field takes, by extension."""
    rejects: str = "rejects/rejects.parquet"
    """The rejects ledger, relative to the folder."""
    manifest_version: int = CURATED_MANIFEST_VERSION

    VERSION: ClassVar[int] = CURATED_MANIFEST_VERSION
    WRITER: ClassVar[str] = "pipelines.curate"


@dataclass(kw_only=True)
class StageShard:
    name: str
    samples: int
    counts: dict[str, int]
    """Samples per group in this shard."""
    bytes: int = 0
    """Filled in by data_prep.stage_shards.finalize_manifest, after any precompute rewrote the shard."""
    sha256: str = ""


@dataclass(kw_only=True)
class StageManifest(Manifest):
    """A stage's shards are complete: target and realised ratios (whole set, phases, worst shard), the
    sources' manifests it drew from, its shards."""

    recipe: str
    stage: str
    config_hash: str
    """data_prep.mixing.content_hash of the mix recipe that wrote it."""
    seed: int
    samples: int
    """Samples over all its shards."""
    samples_per_shard: int
    shuffle_window: int
    groups: dict[str, dict[str, Any]]
    """Per group: target/realised ratio and count, worst shard deviation, and per source its weight, use_as,
    available, count, distinct_used, repeat_factor, manifest_sha256."""
    phases: list[dict[str, Any]]
    """Per ratio phase: start, end, target_ratios, realised_ratios."""
    target_ratios: dict[str, float]
    realised_ratios: dict[str, float]
    worst_shard: dict[str, Any]
    """name, max_deviation, target_counts, counts, realised_ratios of the shard furthest from its targets."""
    caption_first_sentence: dict[str, Any]
    """chosen, truncated and the configured fraction of generation prompts cut to their first sentence."""
    source_manifests: dict[str, str]
    """Source name -> SHA-256 of the curated manifest it was read through."""
    shards: list[StageShard]
    precompute: dict[str, Any] | None = None
    """The VQ-id / VAE-latent precompute of its generation samples (kind, field, encoder_path, ...), or None."""
    manifest_version: int = STAGE_MANIFEST_VERSION

    VERSION: ClassVar[int] = STAGE_MANIFEST_VERSION
    WRITER: ClassVar[str] = "pipelines.mix"
