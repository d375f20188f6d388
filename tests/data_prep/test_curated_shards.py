from data_prep.curated_shards import ShardConfig, plan_shards, remove_stale, tar_file_size
from data_prep.process import tar_size
from data_prep.shards import write_tar


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
