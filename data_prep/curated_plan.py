"""From dedup decisions to what the shard writers need, one unit or one source at a time (never the corpus).

Files, beside the staging files of data_prep.process::

    {work}/_decided/{source}/kept-{unit:06d}.parquet     the unit's kept samples in input order: pos, key, tar_bytes
    {work}/_decided/{source}/rejects-{unit:06d}.parquet  the unit's rejected inputs (curated_shards.REJECT_SCHEMA rows)

``apply_decisions`` writes both for a unit from its staging file and the decisions that name it;
``plan_cuts`` streams a source's kept files in unit order through curated_shards.plan_shards' rule and returns where
each shard starts; ``write_source_ledger`` streams its rejects files into ``rejects/rejects.parquet``;
``shard_members`` turns a shard's kept-sample ranges back into the (unit, positions) the writer reads.
A job-wide order of candidates is ``unit number << 32 | input position``: sorting by it is job order.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.io import atomic_path, atomic_write_json, lines_sha256
from data_prep.curated_shards import REJECT_SCHEMA, TAR_END, TAR_RECORD, ShardConfig, atomic_write_parquet
from data_prep.dedup import CANDIDATE_SCHEMA, DECISION_SCHEMA, DedupConfig
from data_prep.dedup_stages import dedup_decisions, grouped
from data_prep.process import staging_path
from data_prep.semdedup import SEMANTIC_SCHEMA, semantic_decisions, unit_semantic_candidates

DECIDED_DIR = "_decided"
ORDER_SHIFT = 32
POS_MASK = (1 << ORDER_SHIFT) - 1
KEPT_SCHEMA = pa.schema([("pos", pa.int32()), ("key", pa.string()), ("tar_bytes", pa.int64())])
LEDGER_ROWS_PER_GROUP = 256 * 1024
"""Rows of a rejects ledger held before they are written as one row group (bounds the ledger task's memory)."""


def _write_parquet(path: Path, table: pa.Table) -> None:
    """A work file, whole or absent; uncompressed (read back once, soon)."""
    atomic_write_parquet(path, table, compression="none")


def kept_path(work: str, source: str, unit: int) -> Path:
    return Path(work) / DECIDED_DIR / source / f"kept-{unit:06d}.parquet"


def rejects_path(work: str, source: str, unit: int) -> Path:
    return Path(work) / DECIDED_DIR / source / f"rejects-{unit:06d}.parquet"


def unit_candidates(work: str, source: str, unit: int, gid: int, participates: bool) -> pa.Table:
    """The unit's candidates (rows no validation or filter rejected) as dedup rows."""
    t = pq.read_table(staging_path(work, source, unit), columns=["pos", "key", "reason", "content_hash", "phash"])
    t = t.filter(pc.is_null(t["reason"]))
    order = (np.int64(gid) << np.int64(ORDER_SHIFT)) | t["pos"].to_numpy().astype(np.int64)
    return pa.table(
        {
            "order": order,
            "key": t["key"],
            "content_hash": t["content_hash"],
            "phash": t["phash"],
            "participates": pa.array(np.full(len(order), participates)),
        },
        schema=CANDIDATE_SCHEMA,
    )


def apply_decisions(work: str, source: str, unit: int, decisions: pa.Table) -> dict[str, Any]:
    """Write the unit's kept and rejects files from its staging rows and the decisions (order, reason,
    dup_of) that drop some of its candidates. Returns the unit's counts."""
    cols = ["pos", "key", "source_key", "location", "reason", "detail", "tar_bytes"]
    t = pq.read_table(staging_path(work, source, unit), columns=cols)
    pos = t["pos"].to_numpy()
    reason = np.asarray(t["reason"].to_pylist(), dtype=object)
    detail = np.array([d or "" for d in t["detail"].to_pylist()], dtype=object)
    dup_of = np.full(len(pos), None, dtype=object)
    if decisions.num_rows:
        where = np.searchsorted(pos, decisions["order"].to_numpy() & POS_MASK)  # staging rows are in pos order
        if not np.array_equal(pos[np.minimum(where, len(pos) - 1)], decisions["order"].to_numpy() & POS_MASK):
            raise RuntimeError(f"{source} unit {unit}: a dedup decision names a row its staging file lacks")
        reason[where] = decisions["reason"].to_numpy(zero_copy_only=False)
        dup_of[where] = decisions["dup_of"].to_numpy(zero_copy_only=False)
        detail[where] = ""
    kept = np.array([r is None for r in reason], dtype=bool)
    _write_parquet(kept_path(work, source, unit), t.select(["pos", "key", "tar_bytes"]).filter(kept).cast(KEPT_SCHEMA))
    dropped = np.flatnonzero(~kept)
    ledger = pa.table(
        {
            "location": t["location"].take(dropped),
            "key": t["key"].take(dropped),
            "source_key": t["source_key"].take(dropped),
            "reason": pa.array(reason[dropped].tolist(), pa.string()),
            "detail": pa.array(detail[dropped].tolist(), pa.string()),
            "duplicate_of": pa.array(dup_of[dropped].tolist(), pa.string()),
        },
        schema=REJECT_SCHEMA,
    )
    _write_parquet(rejects_path(work, source, unit), ledger)
    return {"source": source, "unit": unit, "kept": int(kept.sum()), "rejected": len(dropped)}


def _cut_points(sizes: np.ndarray, cfg: ShardConfig) -> list[int]:
    """Where curated_shards.plan_shards would close shards in ``sizes`` (which start a shard), excluding the last
    shard's end and any cut not yet decided by the samples given (the rule looks one sample ahead)."""
    budget = TAR_RECORD * (cfg.max_shard_bytes // TAR_RECORD) - TAR_END  # tar_file_size(b) > cap <=> b > budget
    cum = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    cuts, start = [], 0
    while True:
        over = int(np.searchsorted(cum, cum[start] + budget, side="right"))  # first j: bytes [start, j) > budget
        end = min(start + cfg.samples_per_shard, max(over - 1, start + 1))
        if end >= len(sizes):
            return cuts
        cuts.append(end)
        start = end


def plan_path(work: str, source: str) -> Path:
    return Path(work) / DECIDED_DIR / source / "shards.parquet"


def plan_cuts(work: str, source: str, units: Sequence[int], cfg: ShardConfig) -> tuple[list[int], list[tuple]]:
    """curated_shards.plan_shards over the source's kept samples, streamed unit by unit: the kept-sample ordinal at
    which each shard starts, and (unit, kept count) per unit."""
    starts, base = [0], 0
    carry = np.empty(0, np.int64)  # sizes of the shard still open, from ordinal ``base``
    kept: list[tuple[int, int]] = []
    for unit in units:
        sizes = pq.read_table(kept_path(work, source, unit), columns=["tar_bytes"])["tar_bytes"].to_numpy()
        kept.append((unit, len(sizes)))
        carry = np.concatenate([carry, sizes.astype(np.int64)])
        cuts = _cut_points(carry, cfg)
        starts.extend(base + c for c in cuts)
        if cuts:
            base += cuts[-1]
            carry = carry[cuts[-1] :]
    return (starts if sum(n for _, n in kept) else []), kept


def write_shard_plan(work: str, source: str, units: Sequence[int], cfg: ShardConfig) -> dict[str, int]:
    """The source's shard plan as parquet (``plan_path``): per shard its index and the kept rows of the
    units it holds, as JSON [[unit, first, stop], ...]. Returns the numbers of shards and kept samples."""
    starts, kept = plan_cuts(work, source, units, cfg)
    ranges = shard_ranges(kept, starts)
    plan = pa.table(
        {
            "source": pa.array([source] * len(ranges), pa.string()),
            "index": pa.array(range(len(ranges)), pa.int32()),
            "ranges": pa.array([json.dumps(r) for r in ranges], pa.string()),
        }
    )
    _write_parquet(plan_path(work, source), plan)
    return {"shards": len(ranges), "kept": sum(n for _, n in kept)}


def write_source_ledger(work: str, source: str, units: Sequence[int], folder: Path) -> dict[str, int]:
    """Concatenate the units' rejects files, in unit order, into ``{folder}/rejects/rejects.parquet`` (and
    its summary.json); returns the rejected inputs per reason."""
    path = folder / "rejects" / "rejects.parquet"
    counts: Counter[str] = Counter()
    pending: list[pa.Table] = []
    written = False
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, REJECT_SCHEMA) as writer:
        for unit in units:
            t = pq.read_table(rejects_path(work, source, unit)).cast(REJECT_SCHEMA)
            counts.update(t["reason"].to_pylist())
            pending.append(t)
            if sum(p.num_rows for p in pending) >= LEDGER_ROWS_PER_GROUP:
                writer.write_table(pa.concat_tables(pending))
                pending, written = [], True
        if pending or not written:  # an empty ledger is still a file with the schema
            writer.write_table(pa.concat_tables(pending) if pending else REJECT_SCHEMA.empty_table())
    by_reason = dict(sorted(counts.items()))
    atomic_write_json(folder / "rejects" / "summary.json", by_reason)
    return by_reason


def shard_ranges(kept_per_unit: Sequence[tuple[int, int]], starts: Sequence[int]) -> list[list[tuple[int, int, int]]]:
    """(unit, kept count) in unit order and shard starts -> per shard its (unit, first, stop) kept rows."""
    total = sum(n for _, n in kept_per_unit)
    bounds = [*starts, total]
    out: list[list[tuple[int, int, int]]] = []
    k, unit_start = 0, 0
    for a, b in itertools.pairwise(bounds):
        ranges = []
        while k < len(kept_per_unit) and unit_start < b:
            unit, n = kept_per_unit[k]
            lo, hi = max(a, unit_start) - unit_start, min(b, unit_start + n) - unit_start
            if hi > lo:
                ranges.append((unit, lo, hi))
            if unit_start + n <= b:
                unit_start += n
                k += 1
            else:
                break
        out.append(ranges)
    return out


def shard_members(work: str, source: str, ranges: Sequence[Sequence[int]]) -> tuple[list, str]:
    """A shard's kept-row ranges -> writer.write_shard members [[unit, positions]] and its keys digest."""
    members, keys = [], []
    for unit, lo, hi in ranges:
        t = pq.read_table(kept_path(work, source, unit), columns=["pos", "key"]).slice(lo, hi - lo)
        members.append([int(unit), t["pos"].to_pylist()])
        keys.extend(t["key"].to_pylist())
    return members, lines_sha256(keys)


MAX_BLOCKS = 1024
"""Blocks of the per-unit datasets (reading candidates, applying decisions): parallel enough for a cluster,
few enough that a sort shuffle's blocks x blocks intermediates stay small."""


def _with_gid(t: pa.Table) -> pa.Table:
    return t.append_column("gid", pa.array(t["order"].to_numpy() >> ORDER_SHIFT, pa.int64()))


def _read_candidates(batch: dict[str, np.ndarray], work: str) -> pa.Table:
    """Ray Data task: the candidates of a batch of units."""
    tables = [
        unit_candidates(work, str(s), int(u), int(g), bool(p))
        for s, u, g, p in zip(batch["source"], batch["unit"], batch["gid"], batch["participates"], strict=True)
    ]
    return pa.concat_tables(tables) if tables else CANDIDATE_SCHEMA.empty_table()


DECISION_KINDS = ("decisions", "semantic")
"""Per unit, the drops of exact/near/key/text dedup and those of semantic dedup (which runs after them)."""


def decisions_path(work: str, source: str, unit: int, kind: str = "decisions") -> Path:
    return Path(work) / DECIDED_DIR / source / f"{kind}-{unit:06d}.parquet"


def _write_unit_decisions(part: pa.Table, work: str, units: list[list], kind: str = "decisions") -> pa.Table:
    """Ray Data task: the decisions of a hash partition by unit number, one decisions file per unit."""
    part = part.sort_by([("gid", "ascending"), ("order", "ascending")])
    gid = part["gid"].to_numpy()
    cuts = [0, *(np.flatnonzero(np.diff(gid)) + 1).tolist(), len(gid)]
    for lo, hi in itertools.pairwise(cuts):
        source, unit = units[int(gid[lo])]
        _write_parquet(decisions_path(work, source, unit, kind), part.slice(lo, hi - lo).drop_columns(["gid"]))
    return pa.table({"units": [len(cuts) - 1]})


def _apply_units(batch: dict[str, np.ndarray], work: str) -> dict[str, list]:
    """Ray Data task: the kept and rejects files of a batch of units."""
    out = []
    for source, unit, gid in zip(batch["source"], batch["unit"], batch["gid"], strict=True):
        paths = [decisions_path(work, str(source), int(unit), kind) for kind in DECISION_KINDS]
        found = [pq.read_table(p).cast(DECISION_SCHEMA) for p in paths if p.exists()]
        decisions = pa.concat_tables(found).sort_by("order") if found else DECISION_SCHEMA.empty_table()
        out.append(json.dumps({**apply_decisions(work, str(source), int(unit), decisions), "gid": int(gid)}))
    return {"summary": out}


def decide_units(
    units: Sequence[tuple[str, int]], joins: dict[str, bool], work: str, cfg: DedupConfig, rows_per_task: int
) -> list[dict[str, Any]]:
    """Global dedup over the staged units (job order), then each unit's kept and rejects files, all as Ray
    Data stages; returns the per-unit counts in job order (the driver holds nothing per sample).
    ``joins``: per source, whether it takes part in dedup."""
    import ray

    for source in {s for s, _ in units}:  # decisions of an earlier run must not leak into this one
        for kind in DECISION_KINDS:
            for old in (Path(work) / DECIDED_DIR / source).glob(f"{kind}-*.parquet"):
                old.unlink()
    items = [{"source": s, "unit": u, "gid": g, "participates": joins[s]} for g, (s, u) in enumerate(units)]
    blocks = max(1, min(len(items), MAX_BLOCKS))
    cands = ray.data.from_items(items, override_num_blocks=blocks)
    cands = cands.map_batches(_read_candidates, batch_format="numpy", fn_kwargs={"work": work}).materialize()
    decisions = dedup_decisions(cands, cfg, rows_per_task)
    if decisions.count():
        tagged = decisions.map_batches(_with_gid, batch_format="pyarrow").materialize()
        kwargs = {"work": work, "units": [list(u) for u in units]}
        grouped(tagged, "gid", _write_unit_decisions, rows_per_task, **kwargs).materialize()
    if cfg.semantic.enabled:
        _semantic_step(items, units, work, cfg, rows_per_task)
    applied = ray.data.from_items(items, override_num_blocks=blocks)
    rows = applied.map_batches(_apply_units, batch_format="numpy", fn_kwargs={"work": work}).take_all()
    return sorted((json.loads(r["summary"]) for r in rows), key=lambda d: d["gid"])


def _read_semantic(batch: dict[str, np.ndarray], work: str) -> pa.Table:
    """Ray Data task: the images of a batch of units that semantic dedup compares."""
    tables = []
    for source, unit, gid in zip(batch["source"], batch["unit"], batch["gid"], strict=True):
        earlier = decisions_path(work, str(source), int(unit))
        staged = str(staging_path(work, str(source), int(unit)))
        tables.append(
            unit_semantic_candidates(staged, str(earlier) if earlier.exists() else None, int(gid), ORDER_SHIFT)
        )
    return pa.concat_tables(tables) if tables else SEMANTIC_SCHEMA.empty_table()


def _semantic_step(items: list[dict], units: Sequence[tuple[str, int]], work: str, cfg: DedupConfig, rows: int) -> None:
    """Semantic dedup over the images the earlier steps kept, its drops written per unit ("semantic-")."""
    import ray

    joining = [i for i in items if i["participates"]]
    if not joining:
        return
    ds = ray.data.from_items(joining, override_num_blocks=max(1, min(len(joining), MAX_BLOCKS)))
    cands = ds.map_batches(_read_semantic, batch_format="numpy", fn_kwargs={"work": work}).materialize()
    decisions = semantic_decisions(cands, cfg.semantic, rows).materialize()
    if decisions.count():
        tagged = decisions.map_batches(_with_gid, batch_format="pyarrow").materialize()
        kwargs = {"work": work, "units": [list(u) for u in units], "kind": "semantic"}
        grouped(tagged, "gid", _write_unit_decisions, rows, **kwargs).materialize()


def _finish_source_files(batch: dict[str, np.ndarray], work: str, out: str, shards: ShardConfig) -> dict[str, list]:
    """Ray Data task: a source's shard plan and its rejects ledger."""
    results = []
    for source, units_json in zip(batch["source"], batch["units"], strict=True):
        source, units = str(source), json.loads(str(units_json))
        plan = write_shard_plan(work, source, units, shards)
        by_reason = write_source_ledger(work, source, units, Path(out) / source)
        results.append(json.dumps({"source": source, **plan, "rejects_by_reason": by_reason}))
    return {"result": results}


def plan_sources(
    units: Sequence[tuple[str, int]], sources: Sequence[str], work: str, out: str, shards: ShardConfig
) -> dict[str, dict[str, Any]]:
    """Per source, in parallel Ray tasks: its shard plan file and rejects ledger; returns per source the
    numbers of shards and kept samples and the rejected inputs per reason."""
    import ray

    items = [{"source": name, "units": json.dumps([u for s, u in units if s == name])} for name in sources]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    kwargs = {"work": work, "out": out, "shards": shards}
    rows = ds.map_batches(_finish_source_files, batch_size=1, num_cpus=1, fn_kwargs=kwargs).take_all()
    return {r["source"]: r for r in (json.loads(x["result"]) for x in rows)}
