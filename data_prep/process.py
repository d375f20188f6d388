"""Per-sample work of curation and the per-unit staging file that makes it resumable.

``prepare_record``: raw record -> validate, filter, decode, hash, normalise (one sample, no Ray).
``process_unit``: a whole unit -> staging parquet ``{work}/{source}/unit-{index:06d}.parquet`` written
atomically, so a rerun skips units already done. Staging rows carry the encoded sample for every candidate
and the reason for every rejected input; global dedup and shard writing read them back.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from common.io import atomic_path
from data_prep.captions import repair_text
from data_prep.filters import filter_scores, filter_size, filter_text
from data_prep.imaging import (
    ImageConfig,
    Rejected,
    content_hash,
    decode_image,
    normalise_image,
    phash64,
    phash_hex,
    text_hash,
)
from data_prep.readers import RawRecord, read_unit
from data_prep.schema import META_EXT, TEXT_EXT, SampleMeta, image_sha256, make_key
from data_prep.sources import SourceConfig, Unit
from data_prep.validate import Fields, map_fields

STAGING_SCHEMA = pa.schema(
    [
        ("unit", pa.int32()),
        ("pos", pa.int32()),
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("location", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("content_hash", pa.string()),
        ("phash", pa.uint64()),
        ("tar_bytes", pa.int64()),
        ("image", pa.binary()),
        ("image_ext", pa.string()),
        ("text", pa.string()),
        ("meta", pa.binary()),
        ("embedding", pa.list_(pa.float32())),
    ]
)
"""A unit's staging rows; ``embedding``: the sample's L2-normalised image embedding when a clip scorer keeps
them (semantic dedup, the embeddings written beside the shards), else null."""
SMALL_COLUMNS = [f.name for f in STAGING_SCHEMA if f.name not in ("image", "text", "meta", "embedding")]
"""What global dedup and shard planning read back (no payload)."""
_DETAIL_MAX = 300
_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass
class Candidate:
    """A sample that passed validation and the pre-scoring filters."""

    row: dict[str, Any]
    fields: Fields
    image: Image.Image | None = None
    stored: bytes | None = None
    size: tuple[int, int] | None = None
    """Width and height of the stored image."""


def staging_path(work_dir: str, source: str, index: int) -> Path:
    return Path(work_dir) / source / f"unit-{index:06d}.parquet"


def tar_size(record: dict[str, Any]) -> int:
    """Bytes the sample adds to a USTAR tar: a 512-byte header plus padded data per member."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in record.items() if not k.startswith("__"))


def _base_row(rec: RawRecord, src: SourceConfig, unit: int, pos: int) -> dict[str, Any]:
    row = {name: None for name in STAGING_SCHEMA.names}
    row.update(unit=unit, pos=pos, key=make_key(src.name, rec.source_key), source_key=rec.source_key)
    row["location"] = rec.location
    return row


def prepare_record(rec: RawRecord, src: SourceConfig, image_cfg: ImageConfig, unit: int, pos: int) -> Any:
    """One raw record -> a rejected staging row (dict) or a :class:`Candidate`."""
    row = _base_row(rec, src, unit, pos)
    try:
        if rec.error is not None:
            raise Rejected(*rec.error)
        fields = map_fields(rec, src)
        if src.filters.fix_text and fields.text is not None:
            fields.text = repair_text(fields.text)  # before hashing and checks: the repaired text is kept
        for keep, reason in (filter_text(fields.text, src.filters), filter_scores(fields.scores, src.filters)):
            if not keep:
                raise Rejected(reason)
        if not src.has_images:
            row["content_hash"] = text_hash(fields.text or "")
            return Candidate(row, fields)
        decoded = decode_image(rec.image or b"", image_cfg.max_pixels)
        keep, reason = filter_size(decoded.rgb.width, decoded.rgb.height, src.filters)
        if not keep:
            raise Rejected(reason, f"{decoded.rgb.width}x{decoded.rgb.height}")
        row["content_hash"] = content_hash(decoded.rgb)
        rgb, stored, ext = normalise_image(decoded, rec.image or b"", image_cfg)
        row["phash"] = phash64(rgb)
        row["image_ext"] = ext
        return Candidate(row, fields, rgb, stored, rgb.size)
    except Exception as exc:  # one bad sample never fails the job: anything unforeseen is a named reject
        rej = exc if isinstance(exc, Rejected) else Rejected("processing_error", f"{type(exc).__name__}: {exc}")
        # object addresses in exception texts would make the ledger differ between identical runs
        row.update(reason=rej.reason, detail=_ADDRESS_RE.sub("", rej.detail)[:_DETAIL_MAX])
        return row


def finish_candidate(cand: Candidate, src: SourceConfig) -> dict[str, Any]:
    """Apply score thresholds (scorer scores included), then encode the sample into its staging row."""
    row, f = cand.row, cand.fields
    keep, reason = filter_scores(f.scores, src.filters)
    if not keep:
        row.update(reason=reason, content_hash=None, phash=None, image_ext=None)
        return row
    meta = SampleMeta(
        source=src.name,
        source_key=row["source_key"],
        task=src.task,
        width=cand.size[0] if cand.size is not None else None,
        height=cand.size[1] if cand.size is not None else None,
        sha256=image_sha256(cand.stored) if cand.stored is not None else None,
        phash=phash_hex(row["phash"]) if row["phash"] is not None else None,
        label=f.label,
        class_name=f.class_name,
        conversation=f.conversation,
        scores=dict(sorted(f.scores.items())),
        extra=f.extra,
    )
    # the staged meta bytes are the tar's json member as is: the writer never re-encodes them
    meta_json = meta.to_json()
    members = {META_EXT: meta_json}
    if cand.stored is not None:
        members[row["image_ext"]] = cand.stored
    if f.text is not None:
        members[TEXT_EXT] = f.text.encode("utf-8")
    row.update(image=cand.stored, text=f.text, meta=meta_json, tar_bytes=tar_size(members))
    return row


def process_records(
    records: list[RawRecord], src: SourceConfig, image_cfg: ImageConfig, unit: int
) -> list[dict[str, Any]]:
    """All of a unit's records -> staging rows in input order (no model scorers: data_prep.score_stages
    runs those as stages between preparing and finishing)."""
    # finish each sample at once: its decoded pixels are freed while hot instead of a unit's worth
    # (tens of MB) being held
    rows = []
    for pos, r in enumerate(records):
        p = prepare_record(r, src, image_cfg, unit, pos)
        rows.append(finish_candidate(p, src) if isinstance(p, Candidate) else p)
    return rows


def staged_summary(path: Path) -> dict[str, Any] | None:
    """The summary of a unit already staged (None when it is not)."""
    if not path.exists():
        return None
    meta = pq.read_metadata(path).metadata or {}
    return {**json.loads(meta[b"janus.unit"]), "skipped": True}


def unit_summary(unit: Unit, src: SourceConfig, records: list[RawRecord], start: float, cpu: float) -> dict:
    ignored = Counter(ext for r in records for ext in r.ignored)
    return {
        "source": src.name,
        "unit": unit.index,
        "inputs": len(records),
        "ignored_members": dict(sorted(ignored.items())),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
    }


def write_staging(path: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """A unit's staging file, atomically; its summary rides in the parquet metadata."""
    table = pa.Table.from_pylist(rows, schema=STAGING_SCHEMA)
    table = table.replace_schema_metadata({"janus.unit": json.dumps(summary, sort_keys=True)})
    # staging is temporary and its payload is already-compressed image bytes: skip parquet compression
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="none")


def process_unit(unit: Unit, src: SourceConfig, image_cfg: ImageConfig, work_dir: str) -> dict[str, Any]:
    """Read, process and stage one unit (skipped when its staging file exists). Returns its summary."""
    path = staging_path(work_dir, src.name, unit.index)
    done = staged_summary(path)
    if done is not None:
        return done
    start, cpu_start = time.perf_counter(), time.process_time()
    records = list(read_unit(unit, src))
    rows = process_records(records, src, image_cfg, unit.index)
    summary = unit_summary(unit, src, records, start, cpu_start)
    write_staging(path, rows, summary)
    return {**summary, "skipped": False}
