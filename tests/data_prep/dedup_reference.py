"""The single-pass deduplication the distributed stages replaced, kept as the reference they must agree with.

It ran on the driver, in one Python loop over every candidate of every source: cost per sample grows with the
corpus (each query scans whole ~13-bit chunk buckets) and so does the driver's memory. Its results define the
semantics: the representative is the first sample in job order, only *kept* images count as representatives
(a sample near a dropped one only is kept), exact before near, the earliest kept image wins.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.curation import WORK_DIR, CurateConfig
from data_prep.dedup import DedupConfig
from data_prep.imaging import hamming
from data_prep.process import staging_path
from data_prep.sources import list_units


class MultiIndexHash:
    """Radius search over 64-bit hashes by exact lookups on ``radius + 1`` disjoint bit chunks."""

    def __init__(self, radius: int) -> None:
        self.radius = radius
        bounds = np.linspace(0, 64, radius + 2).astype(int)
        self.chunks = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in itertools.pairwise(bounds)]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.chunks]
        self.values: dict[int, int] = {}

    def add(self, value: int, ident: int) -> None:
        self.values[ident] = value
        for table, (shift, mask) in zip(self.tables, self.chunks, strict=True):
            table.setdefault((value >> shift) & mask, []).append(ident)

    def query(self, value: int) -> int | None:
        """The smallest ident whose hash is within the radius, or None."""
        best: int | None = None
        for table, (shift, mask) in zip(self.tables, self.chunks, strict=True):
            for ident in table.get((value >> shift) & mask, ()):
                if (best is None or ident < best) and hamming(self.values[ident], value) <= self.radius:
                    best = ident
        return best


def find_duplicates(
    keys: Sequence[str],
    content_hashes: Sequence[str | None],
    phashes: Sequence[int | None],
    cfg: DedupConfig,
    participates: Sequence[bool] | None = None,
) -> list[tuple[str, str] | None]:
    """Candidates in job order -> per candidate None (kept) or (reason, key of the kept copy)."""
    out: list[tuple[str, str] | None] = [None] * len(keys)
    seen_key: set[str] = set()
    seen_image: dict[str | None, int] = {}
    seen_text: dict[str, int] = {}
    index = MultiIndexHash(cfg.max_hamming)
    for i, (key, chash, ph) in enumerate(zip(keys, content_hashes, phashes, strict=True)):
        if key in seen_key:
            out[i] = ("duplicate_key", key)
            continue
        seen_key.add(key)
        if participates is not None and not participates[i]:
            continue
        if ph is None:
            if cfg.text and chash is not None and chash in seen_text:
                out[i] = ("duplicate_text", keys[seen_text[chash]])
            elif chash is not None:
                seen_text.setdefault(chash, i)
            continue
        if cfg.exact and chash in seen_image:
            out[i] = ("duplicate_exact", keys[seen_image[chash]])
            continue
        match = index.query(ph) if cfg.near else None
        if match is not None:
            out[i] = ("duplicate_near", keys[match])
            continue
        seen_image.setdefault(chash, i)
        index.add(ph, i)
    return out


DEDUP_REASONS = ("duplicate_key", "duplicate_exact", "duplicate_near", "duplicate_text")


def staged_candidates(work: Path, units: Sequence[tuple[str, int]], dedup: dict[str, bool]) -> pa.Table:
    """The job's candidates from its staging folder as the old job handed them to the reference: units in job
    order, rows in input order, rows rejected before dedup left out."""
    tables = []
    for source, index in units:
        t = pq.read_table(staging_path(str(work), source, index), columns=["key", "reason", "content_hash", "phash"])
        t = t.filter(pc.is_null(t["reason"]))
        n = len(t)
        t = t.append_column("participates", pa.array([dedup[source]] * n, pa.bool_()))
        tables.append(t.append_column("source", pa.array([source] * n, pa.string())))
    return pa.concat_tables(tables)


def assert_job_agrees_with_reference(cfg: CurateConfig, out: Path) -> int:
    """A finished job (run with exec.keep_work) dropped as duplicates exactly what the reference drops, for
    the same reasons, pointing at the same kept keys, in the same order; returns how many."""
    units = [(u.source, u.index) for src in cfg.sources for u in list_units(src)]
    cands = staged_candidates(out / WORK_DIR, units, {s.name: s.dedup for s in cfg.sources})
    ref = find_duplicates(
        cands["key"].to_pylist(),
        cands["content_hash"].to_pylist(),
        cands["phash"].to_pylist(),
        cfg.dedup,
        cands["participates"].to_pylist(),
    )
    dropped = 0
    for src in cfg.sources:
        expect = [
            (key, *dup)
            for key, source, dup in zip(cands["key"].to_pylist(), cands["source"].to_pylist(), ref, strict=True)
            if source == src.name and dup is not None
        ]
        ledger = pq.read_table(out / src.name / "rejects" / "rejects.parquet").to_pylist()
        got = [(r["key"], r["reason"], r["duplicate_of"]) for r in ledger if r["reason"] in DEDUP_REASONS]
        assert got == expect, src.name
        dropped += len(got)
    return dropped
