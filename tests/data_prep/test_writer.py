import random

import pytest

from data_prep.dedup import DedupConfig, MultiIndexHash, find_duplicates
from data_prep.imaging import hamming
from data_prep.process import tar_size
from data_prep.shards import write_tar
from data_prep.writer import ShardConfig, plan_shards, remove_stale, tar_file_size


def test_multi_index_matches_brute_force():
    rng = random.Random(0)
    base = [rng.getrandbits(64) for _ in range(300)]
    # plus close variants: flip up to 6 bits of some bases
    values = base + [b ^ sum(1 << rng.randrange(64) for _ in range(rng.randrange(7))) for b in base[:100]]
    for radius in (0, 3, 6):
        index = MultiIndexHash(radius)
        for i, v in enumerate(values[:300]):
            index.add(v, i)
        for v in values[300:]:
            expect = min((i for i in range(300) if hamming(values[i], v) <= radius), default=None)
            assert index.query(v) == expect


def test_find_duplicates_first_in_job_order_wins():
    keys = ["a-1", "b-1", "b-2", "b-3", "a-1", "t-1", "t-2"]
    chash = ["h1", "h1", "h2", "h3", "h9", "x", "x"]
    phash = [0b1111, 0b1111, 0b1111 ^ (1 << 40), 1 << 63, 5, None, None]
    out = find_duplicates(keys, chash, phash, DedupConfig(max_hamming=4))
    assert out == [
        None,
        ("duplicate_exact", "a-1"),
        ("duplicate_near", "a-1"),
        None,
        ("duplicate_key", "a-1"),
        None,
        ("duplicate_text", "t-1"),
    ]
    off = find_duplicates(keys, chash, phash, DedupConfig(exact=False, near=False, text=False))
    assert off == [None, None, None, None, ("duplicate_key", "a-1"), None, None]
    opted_out = find_duplicates(keys, chash, phash, DedupConfig(), [True, False, False, True, True, True, False])
    assert opted_out == [None, None, None, None, ("duplicate_key", "a-1"), None, None]


def test_dedup_config_validation():
    with pytest.raises(ValueError, match="dedup.max_hamming"):
        DedupConfig(max_hamming=40)


def test_plan_shards_count_and_byte_cap():
    assert plan_shards([1000] * 10, ShardConfig(samples_per_shard=4)) == [(0, 4), (4, 8), (8, 10)]
    cap = ShardConfig(samples_per_shard=100, max_shard_bytes=3 * 10240)
    ranges = plan_shards([9000] * 7, cap)
    assert all(tar_file_size(9000 * (b - a)) <= cap.max_shard_bytes for a, b in ranges)
    assert ranges[0] == (0, 3) and sum(b - a for a, b in ranges) == 7
    assert plan_shards([10**6, 10], cap) == [(0, 1), (1, 2)]  # an oversized sample gets its own shard
    assert plan_shards([], cap) == []


def test_tar_size_predicts_file_size(tmp_path):
    records = [{"__key__": f"k{i}", "txt": b"x" * (100 * i + 1), "json": b"{}"} for i in range(30)]
    write_tar(tmp_path / "a.tar", records)
    assert (tmp_path / "a.tar").stat().st_size == tar_file_size(sum(tar_size(r) for r in records))


def test_remove_stale(tmp_path):
    for name in ("s-000000.tar", "s-000001.tar", "s-000001.parquet", "s-000001_stats.json", "x.tar.tmp", "other"):
        (tmp_path / name).write_text("x")
    remove_stale(tmp_path, "s", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "s-000000.tar"]
