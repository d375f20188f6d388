"""Shard planning streamed unit by unit gives curated_shards.plan_shards' shards exactly; shard ranges map back
to units."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq

from common.io import lines_sha256
from data_prep.curated_plan import (
    KEPT_SCHEMA,
    kept_path,
    plan_cuts,
    plan_path,
    shard_members,
    shard_ranges,
    write_shard_plan,
)
from data_prep.curated_shards import ShardConfig, plan_shards


def write_kept(work, source: str, units: list[list[int]]) -> None:
    n = 0
    for unit, sizes in enumerate(units):
        path = kept_path(str(work), source, unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = [f"k{n + i}" for i in range(len(sizes))]
        pq.write_table(
            pa.table({"pos": range(0, 2 * len(sizes), 2), "key": keys, "tar_bytes": sizes}, schema=KEPT_SCHEMA), path
        )
        n += len(sizes)


def test_streamed_plan_equals_plan_shards(tmp_path):
    rng = random.Random(0)
    for case in range(60):
        cfg = ShardConfig(
            samples_per_shard=rng.choice([1, 2, 3, 7, 50]),
            max_shard_bytes=rng.choice([10240, 3 * 10240, 100_000, 512 * 2**20]),
        )
        units = [
            [rng.choice([512, 1536, 9000, 30_000, 200_000]) for _ in range(rng.choice([0, 0, 1, 4, 17]))]
            for _ in range(rng.randint(0, 9))
        ]
        write_kept(tmp_path / str(case), "s", units)
        sizes = [s for u in units for s in u]
        starts, kept = plan_cuts(str(tmp_path / str(case)), "s", range(len(units)), cfg)
        assert kept == [(u, len(s)) for u, s in enumerate(units)]
        assert starts == [a for a, _ in plan_shards(sizes, cfg)], case


def test_shard_ranges_and_members_follow_the_kept_files(tmp_path):
    units = [[10] * 3, [], [10] * 5, [10] * 1]
    write_kept(tmp_path, "s", units)
    kept = [(u, len(s)) for u, s in enumerate(units)]
    ranges = shard_ranges(kept, [0, 4, 8])
    assert ranges == [[(0, 0, 3), (2, 0, 1)], [(2, 1, 5)], [(3, 0, 1)]]
    members, digest = shard_members(str(tmp_path), "s", ranges[0])
    assert members == [[0, [0, 2, 4]], [2, [0]]] and digest == lines_sha256(["k0", "k1", "k2", "k3"])
    assert shard_ranges([], []) == []
    plan = write_shard_plan(str(tmp_path), "s", range(len(units)), ShardConfig(samples_per_shard=4))
    assert plan == {"shards": 3, "kept": 9}
    rows = pq.read_table(plan_path(str(tmp_path), "s")).to_pylist()
    assert [json.loads(r["ranges"]) for r in rows] == [[list(r) for r in rs] for rs in ranges]
