"""The blending index: exact ratios at every prefix and in every shard, phases, sources, windows, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.ratio_schedule import (
    BlendError,
    BlendIndex,
    build_schedule,
    build_source_pattern,
    integer_weights,
    max_prefix_deviation,
    prefix_counts,
    window_permute,
)

PAPER_RATIOS = {
    "janus_pro_1": [1, 0, 3],
    "janus_pro_2": [2, 3, 5],
    "janus_pro_3": [5, 1, 4],
    "janus_3": [7, 3, 10],
    "janusflow_1": [50, 50, 0],
    "janusflow_2a": [30, 50, 20],
    "janusflow_2b": [14, 80, 6],
    "janusflow_3": [21, 70, 9],
    "janusflow_pre": [2, 8],
}


def assert_exact(index: BlendIndex) -> np.ndarray:
    """Every prefix and every shard: each group's count is floor or ceil of its target."""
    seq = index.all_groups()
    sched = index.sched
    assert len(seq) == sched.total
    counts = prefix_counts(seq, sched.num_groups)
    target = sched.scaled_targets(np.arange(sched.total + 1))
    assert (np.abs(counts * sched.denom - target) < sched.denom).all()
    assert (max_prefix_deviation(seq, sched) < 1).all()
    b = index.bounds
    shard_counts = counts[b[1:]] - counts[b[:-1]]
    shard_target = target[b[1:]] - target[b[:-1]]
    assert (np.abs(shard_counts * sched.denom - shard_target) < sched.denom).all()
    assert (counts[b] == index.counts).all()
    return seq


def test_integer_weights() -> None:
    assert integer_weights([5, 1, 4]).tolist() == [5, 1, 4]
    assert integer_weights([50, 50, 0]).tolist() == [1, 1, 0]
    assert integer_weights([0.5, 0.25]).tolist() == [2, 1]
    assert integer_weights([0.1, 0.2]).tolist() == [1, 2]  # decimal, not binary, fractions
    for bad in ([], [0, 0], [1, -1]):
        with pytest.raises(BlendError):
            integer_weights(bad)


@pytest.mark.parametrize("name", sorted(PAPER_RATIOS))
@pytest.mark.parametrize("shard", [1, 7, 64, 1000])
def test_paper_ratios_exact_at_every_prefix_and_shard(name: str, shard: int) -> None:
    ratios = PAPER_RATIOS[name]
    total = 2345
    seq = assert_exact(BlendIndex(build_schedule([ratios], [total], total), shard))
    ints = integer_weights(ratios)
    period = int(ints.sum())
    # Each period of the stream holds exactly the reduced ratio.
    for start in range(0, total - period + 1, period):
        assert np.bincount(seq[start : start + period], minlength=len(ratios)).tolist() == ints.tolist()
    assert np.bincount(seq, minlength=len(ratios))[ints == 0].sum() == 0  # ratio 0: absent


def test_random_ratios_phases_and_shard_sizes() -> None:
    rng = np.random.default_rng(1234)
    for _ in range(150):
        groups = int(rng.integers(1, 6))
        phases = int(rng.integers(1, 4))
        total = int(rng.integers(phases, 1500))
        cuts = np.sort(rng.choice(np.arange(1, total), phases - 1, replace=False)) if phases > 1 else []
        lengths = np.diff(np.concatenate([[0], cuts, [total]])).astype(int).tolist()
        ratios = [rng.integers(0, 30, groups).tolist() for _ in range(phases)]
        for r in ratios:
            r[0] += sum(r) == 0
        shard = int(rng.choice([1, 2, 3, 7, 50, 128, 399]))
        assert_exact(BlendIndex(build_schedule(ratios, lengths, total), shard))


def test_phases_switch_exactly() -> None:
    # JanusFlow stage II, toy size: 30:50:20 for 320 samples, then 14:80:6.
    sched = build_schedule([[30, 50, 20], [14, 80, 6]], [320, 1600], 1920)
    index = BlendIndex(sched, 200)
    seq = assert_exact(index)
    assert np.bincount(seq[:320], minlength=3).tolist() == [96, 160, 64]
    assert np.bincount(seq[320:], minlength=3).tolist() == [224, 1280, 96]
    assert index.counts_at(320).tolist() == [96, 160, 64]


def test_paper_scale_plan_is_cheap_and_exact_at_the_phase_switch() -> None:
    # JanusFlow stage II at its real size: 390K steps x 512, first 10K steps at 30:50:20; 10K-sample shards.
    total, first = 390_000 * 512, 10_000 * 512
    index = BlendIndex(build_schedule([[30, 50, 20], [14, 80, 6]], [first, total - first], total), 10_000)
    assert index.num_shards == total // 10_000
    assert index.counts_at(first).tolist() == [first * 30 // 100, first * 50 // 100, first * 20 // 100]
    rest = total - first
    assert index.counts[-1].tolist() == [
        first * 30 // 100 + rest * 14 // 100,
        first * 50 // 100 + rest * 80 // 100,
        first * 20 // 100 + rest * 6 // 100,
    ]
    shard = index.shard_groups(index.num_shards // 2)
    assert np.bincount(shard, minlength=3).tolist() == [1400, 8000, 600]


def test_deterministic() -> None:
    sched = build_schedule([[3, 5, 2], [7, 40, 3]], [500, 1500], 2000)
    a, b = BlendIndex(sched, 128).all_groups(), BlendIndex(sched, 128).all_groups()
    assert np.array_equal(a, b)


def test_schedule_errors() -> None:
    with pytest.raises(BlendError, match="sum to"):
        build_schedule([[1, 1]], [5], 6)
    with pytest.raises(BlendError, match="same groups"):
        build_schedule([[1, 1], [1, 1, 1]], [3, 3], 6)
    with pytest.raises(BlendError, match="positive"):
        BlendIndex(build_schedule([[1]], [3], 3), 0)


def test_source_pattern_quotas_and_draws() -> None:
    pattern = build_source_pattern([1, 1])
    assert pattern.period == 2 and sorted(pattern.pattern.tolist()) == [0, 1]
    pattern = build_source_pattern([2, 1, 0.5])  # -> 4:2:1
    j = np.arange(100)
    src, ordinal = pattern.draws(j)
    for s in range(3):
        # ordinals of a source are 0, 1, 2, ... in draw order: each draw is a new pass position.
        assert ordinal[src == s].tolist() == list(range(int((src == s).sum())))
    for n in (0, 1, 6, 7, 50, 99):
        assert pattern.quotas(n).tolist() == np.bincount(src[:n], minlength=3).tolist()
    assert (np.abs(prefix_counts(src, 3) - np.outer(np.arange(101), [4 / 7, 2 / 7, 1 / 7])) < 1).all()


def test_window_permute() -> None:
    n, window = 1000, 64
    out = window_permute(np.arange(n), n, window, [7])
    assert sorted(out.tolist()) == list(range(n))
    for start in range(0, n, window):  # stays inside its window, so counts at window boundaries are kept
        block = out[start : start + window]
        assert block.min() == start and block.max() == min(start + window, n) - 1
    assert not np.array_equal(out, np.arange(n))
    assert np.array_equal(out, window_permute(np.arange(n), n, window, [7]))
    assert not np.array_equal(out, window_permute(np.arange(n), n, window, [8]))
    assert np.array_equal(window_permute(np.arange(10), 10, 1, [7]), np.arange(10))
    # A slice computes the same mapping as the whole (shards are computed independently).
    assert np.array_equal(window_permute(np.arange(100, 300), n, window, [7]), out[100:300])
