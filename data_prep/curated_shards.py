"""Curated output of one source: shards (+ .parquet and _stats.json each), rejects ledger, manifest.json.

Layout (DESIGN.md)::

    {out}/{source}/{source}-000000.tar        samples in job order (schema.encode_sample)
    {out}/{source}/{source}-000000.parquet    one row of metadata per sample of the shard
    {out}/{source}/{source}-000000.embeddings.parquet  optional (embeddings.write): key, embedding per sample
    {out}/{source}/{source}-000000_stats.json written last: its presence marks the shard complete
    {out}/{source}/rejects/rejects.parquet    location, key, source_key, reason, detail, duplicate_of
    {out}/{source}/rejects/summary.json       rejected inputs per reason
    {out}/{source}/manifest.json              counts, bytes, shards with SHA-256, config hash

Every file is written to a temporary name and renamed, so a crash leaves complete files or none.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from common import faults
from common.io import atomic_path, atomic_write_json, file_sha256
from data_prep.process import staging_path
from data_prep.schema import KEY_FIELD, META_EXT, SCHEMA_VERSION, TEXT_EXT
from data_prep.shards import TarShardWriter, shard_name

DRILL_SHARD = "curate.shard"
"""Fault-drill point (common.faults) after a shard's tar and parquet, before its stats; context ``shard`` (the
job-wide shard number: shards of all sources in config order), ``source`` and ``index``."""
TAR_RECORD = 10240  # tarfile pads archives to 20 blocks of 512 bytes
TAR_END = 1024  # two zero blocks close a tar
REJECT_SCHEMA = pa.schema(
    [
        ("location", pa.string()),
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("duplicate_of", pa.string()),
    ]
)


EMBEDDINGS_SUFFIX = "embeddings.parquet"
EMBEDDINGS_SCHEMA = pa.schema([("key", pa.string()), ("embedding", pa.list_(pa.float32()))])


@dataclass(kw_only=True)
class ShardConfig:
    samples_per_shard: int = 1000
    """Target samples per shard (the last shard may be short)."""
    max_shard_bytes: int = 512 * 1024 * 1024
    """Byte cap per tar; a shard closes early rather than exceed it (one oversized sample gets its own)."""

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"shards.samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.max_shard_bytes < TAR_RECORD:
            raise ValueError(f"shards.max_shard_bytes must be >= {TAR_RECORD}, got {self.max_shard_bytes}")


def tar_file_size(member_bytes: int) -> int:
    return -(-(member_bytes + TAR_END) // TAR_RECORD) * TAR_RECORD


def plan_shards(tar_bytes: Sequence[int], cfg: ShardConfig) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges over kept samples honouring the count target and the byte cap."""
    ranges: list[tuple[int, int]] = []
    start, used = 0, 0
    for i, size in enumerate(tar_bytes):
        full = i - start >= cfg.samples_per_shard or tar_file_size(used + size) > cfg.max_shard_bytes
        if i > start and full:
            ranges.append((start, i))
            start, used = i, 0
        used += size
    if start < len(tar_bytes):
        ranges.append((start, len(tar_bytes)))
    return ranges


def embeddings_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Key -> image embedding of a shard's samples in tar order (null for a sample without one: a text-only
    sample, or one whose image the clip scorer did not see)."""
    return pa.table(
        {"key": [r["key"] for r in rows], "embedding": [r["embedding"] for r in rows]}, schema=EMBEDDINGS_SCHEMA
    )


def atomic_write_parquet(path: Path, table: pa.Table, **write_options: Any) -> None:
    """``table`` as a parquet file that is whole or absent (common.io.atomic_path)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **write_options)


def _load_rows(
    work_dir: str, source: str, members: Sequence[tuple[int, Sequence[int]]], embeddings: bool = False
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    columns = ["pos", "key", "image", "image_ext", "text", "meta", *(["embedding"] if embeddings else [])]
    for unit, positions in members:
        path = staging_path(work_dir, source, unit)
        table = pq.read_table(path, columns=columns)
        by_pos = {p: i for i, p in enumerate(table.column("pos").to_pylist())}
        picked = table.take([by_pos[p] for p in positions])
        rows.extend(picked.to_pylist())
    return rows


def _meta_row(row: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": row["key"],
        "source": meta["source"],
        "source_key": meta["source_key"],
        "task": meta["task"],
        "width": meta["width"],
        "height": meta["height"],
        "sha256": meta["sha256"],
        "phash": meta["phash"],
        "label": meta["label"],
        "class_name": meta["class_name"],
        "image_ext": row["image_ext"],
        "image_bytes": len(row["image"]) if row["image"] is not None else 0,
        "text": row["text"],
        "scores": json.dumps(meta["scores"], sort_keys=True),
        "meta": row["meta"].decode(),
    }


def _record(row: dict[str, Any]) -> dict[str, Any]:
    """A staging row -> the tar record (what schema.encode_sample gives for it; the meta bytes as staged)."""
    record: dict[str, Any] = {KEY_FIELD: row["key"]}
    if row["image"] is not None:
        record[row["image_ext"]] = row["image"]
    if row["text"] is not None:
        record[TEXT_EXT] = row["text"].encode("utf-8")
    record[META_EXT] = row["meta"]
    return record


def write_shard(spec: dict[str, Any], work_dir: str, out_dir: str) -> dict[str, Any]:
    """Write one shard (tar, parquet, then stats) from staging; reuse it when its stats match the spec."""
    source, index = spec["source"], spec["index"]
    folder = Path(out_dir) / source
    tar_path = folder / shard_name(source, index)
    stats_path = folder / f"{source}-{index:06d}_stats.json"
    if stats_path.exists() and tar_path.exists():
        stats = json.loads(stats_path.read_text())
        if stats.get("keys_digest") == spec["keys_digest"] and stats.get("config_hash") == spec["config_hash"]:
            return {**stats, "reused": True}
    # an earlier run's stats must not vouch for the tar about to be replaced: until this run's stats land, the
    # shard reads as unfinished (a job that dies after the tar's rename left them describing other bytes)
    stats_path.unlink(missing_ok=True)
    embeddings = bool(spec.get("embeddings"))
    rows = _load_rows(work_dir, source, spec["members"], embeddings)
    meta_rows = []
    with TarShardWriter(tar_path) as writer:
        for row in rows:
            writer.write(_record(row))
            meta_rows.append(_meta_row(row, json.loads(row["meta"])))
    atomic_write_parquet(folder / shard_name(source, index, "parquet"), pa.Table.from_pylist(meta_rows))
    emb_path = folder / shard_name(source, index, EMBEDDINGS_SUFFIX)
    if embeddings:
        atomic_write_parquet(emb_path, embeddings_table(rows))
    else:  # a run that writes none leaves none of an earlier run's beside its shards
        emb_path.unlink(missing_ok=True)
    stats = {
        "shard": tar_path.name,
        "source": source,
        "samples": len(rows),
        "bytes": tar_path.stat().st_size,
        "sha256": file_sha256(tar_path),
        "image_bytes": sum(r["image_bytes"] for r in meta_rows),
        "keys_digest": spec["keys_digest"],
        "config_hash": spec["config_hash"],
        "schema_version": SCHEMA_VERSION,
    }
    # a drill here leaves a complete tar without its stats: the shard is not done, a rerun rewrites it
    faults.point(DRILL_SHARD, shard=spec.get("job_shard", -1), source=source, index=index)
    atomic_write_json(stats_path, stats)
    return {**stats, "reused": False}


def write_rejects(folder: Path, rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    atomic_write_parquet(folder / "rejects" / "rejects.parquet", pa.Table.from_pylist(rows, schema=REJECT_SCHEMA))
    atomic_write_json(folder / "rejects" / "summary.json", dict(sorted(counts.items())))
    return dict(sorted(counts.items()))


def remove_stale(folder: Path, source: str, n_shards: int) -> None:
    """Delete shards past the last one of this run and temporary files left by a killed run."""
    if not folder.exists():
        return
    for path in folder.iterdir():
        name = path.name
        if ".tmp" in name:
            path.unlink()
            continue
        stem = name.split(".", 1)[0].removesuffix("_stats")
        prefix, _, num = stem.rpartition("-")
        if prefix == source and num.isdigit() and int(num) >= n_shards:
            path.unlink()
