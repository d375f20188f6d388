"""Exact-ratio blending index: which group fills each slot of a stage's sample stream (cheap numpy, no Ray).

Targets. A stage of ``total`` samples has piecewise-constant group ratios (one per phase). The target count of
group g at prefix k (the first k samples) is ``T_g(k)``, piecewise linear in k; all arithmetic is exact integers
(targets are kept multiplied by a common denominator ``D``).

Guarantees (checked while building; a violation raises :class:`BlendError`):
- prefix: for every k and g, ``floor(T_g(k)) <= count_g(k) <= ceil(T_g(k))``, so every group is strictly within one
  sample of its target at every prefix of the stream;
- shard: the stream is cut into shards of ``shard_size`` slots (the last may be short); in every shard each
  group's count is ``floor`` or ``ceil`` of its target for that shard (strictly within one sample).

Construction (both levels earliest-deadline-first scheduling of unit jobs, as in Tijdeman's chairman
assignment): shard by shard, the counts at the shard's end (each group gets ``floor`` of its shard target plus
at most one extra, extras with the earliest deadline first), then the slot order inside the shard, where the
j-th sample of group g is released when ``ceil(T_g)`` reaches j and due when ``floor(T_g)`` does. EDF is exact
for unit jobs with release times and deadlines: it finds an order whenever one exists. A split is kept only if
its order exists and its end state leaves room for the samples due next (a state can be within one of target
and still be a dead end); otherwise the next split is tried, backtracking to earlier shards if needed (rare:
none in thousands of random ratio/phase/shard-size cases). Shards inside one phase that start in the same
rounding state get the same order, so orders are cached: planning a paper-size stage (2 x 10^8 samples,
20K shards) takes about a second.

Sources inside a group (constant weights) use the same EDF over the group's draws; that sequence is periodic
with period ``sum(weights)`` (counts are exact at every multiple of it), so draw j maps to its source and the
ordinal of that source's draw in closed form.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

MAX_PERIOD = 1_000_000
"""Largest allowed sum of reduced integer weights (ratios finer than this are almost surely a typo)."""
MAX_BACKTRACKS = 10_000
"""Shard splits revisited before giving up."""
MAX_TRIES = 64
"""Splits of a shard's extras tried before giving up (each costs one EDF pass over the shard)."""


class BlendError(ValueError):
    """Ratios or lengths that cannot be blended, or (never observed) an infeasible schedule."""


def integer_weights(weights: Sequence[float]) -> np.ndarray:
    """Non-negative ratios -> the smallest integers in the same proportion (exact for decimal inputs)."""
    fracs = [Fraction(str(w)) for w in weights]
    if not fracs or any(f < 0 for f in fracs) or sum(fracs) == 0:
        raise BlendError(f"ratios must be non-negative with a positive sum, got {list(weights)}")
    den = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * den) for f in fracs]
    g = math.gcd(*ints)
    out = np.array([i // g for i in ints], dtype=np.int64)
    if out.sum() > MAX_PERIOD:
        raise BlendError(f"ratios {list(weights)} reduce to integers summing to {out.sum()} > {MAX_PERIOD}")
    return out


def stable_int(*parts: object) -> int:
    """A 63-bit integer from names and numbers, identical across processes (unlike ``hash``)."""
    text = "\0".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


@dataclass(frozen=True)
class Schedule:
    """Piecewise-constant target ratios over a stream of ``total`` slots."""

    starts: np.ndarray
    """(P,) first slot of each phase; starts[0] == 0."""
    rates: np.ndarray
    """(P, G) target increment per slot, in units of 1/denom (each row sums to denom)."""
    denom: int
    """Common denominator D of all targets."""
    total: int
    """Number of slots in the stream."""
    bases: np.ndarray = field(init=False)
    """(P, G) scaled target counts at each phase start."""

    def __post_init__(self) -> None:
        lengths = np.diff(np.append(self.starts, self.total))
        bases = np.zeros_like(self.rates)
        bases[1:] = np.cumsum(self.rates[:-1] * lengths[:-1, None], axis=0)
        object.__setattr__(self, "bases", bases)

    @property
    def num_groups(self) -> int:
        return int(self.rates.shape[1])

    def phase_of(self, k: np.ndarray) -> np.ndarray:
        """Phase of the slot that ends prefix k (k >= 1); prefix 0 belongs to phase 0."""
        return np.maximum(np.searchsorted(self.starts, np.asarray(k) - 1, side="right") - 1, 0)

    def scaled_targets(self, k: np.ndarray) -> np.ndarray:
        """(len(k), G) int64: D x target count of each group in the first k slots."""
        k = np.asarray(k, dtype=np.int64)
        p = self.phase_of(k)
        return self.bases[p] + self.rates[p] * (k - self.starts[p])[:, None]

    def targets(self, k: np.ndarray) -> np.ndarray:
        """(len(k), G) float target counts (for reports)."""
        return self.scaled_targets(k) / self.denom


def build_schedule(phase_ratios: Sequence[Sequence[float]], phase_lengths: Sequence[int], total: int) -> Schedule:
    """Phases in order with their ratios (same group order in each) and lengths (summing to ``total``)."""
    if total <= 0:
        raise BlendError(f"a stage needs a positive number of samples, got {total}")
    if len(phase_ratios) != len(phase_lengths) or not phase_ratios:
        raise BlendError("give one length per phase and at least one phase")
    if any(n <= 0 for n in phase_lengths) or sum(phase_lengths) != total:
        raise BlendError(f"phase lengths {list(phase_lengths)} must be positive and sum to {total}")
    ints = [integer_weights(r) for r in phase_ratios]
    if len({len(w) for w in ints}) != 1:
        raise BlendError("every phase must give a ratio for the same groups")
    denom = math.lcm(*(int(w.sum()) for w in ints))
    if denom * total >= 2**62:
        raise BlendError(f"targets overflow int64: denominator {denom} x {total} samples")
    rates = np.stack([w * (denom // int(w.sum())) for w in ints]).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(phase_lengths)[:-1]]).astype(np.int64)
    return Schedule(starts=starts, rates=rates, denom=denom, total=int(total))


def shard_bounds(total: int, shard_size: int) -> np.ndarray:
    """(S+1,) slot positions where shards start, then ``total``."""
    if shard_size <= 0:
        raise BlendError(f"shard size must be positive, got {shard_size}")
    return np.append(np.arange(0, total, shard_size, dtype=np.int64), np.int64(total))


def _floor_ceil(scaled: np.ndarray, denom: int) -> tuple[np.ndarray, np.ndarray]:
    return scaled // denom, -((-scaled) // denom)


def extendable(sched: Schedule, k: int, counts: np.ndarray, horizon: int) -> bool:
    """Whether counts at prefix k leave room for every group's due samples in the next ``horizon`` slots.

    The samples group g must have by prefix b are floor(T_g(b)); those beyond its current count must fit in the
    b - k slots in between (a state can be within one of target and still be a dead end).
    """
    end = min(sched.total, k + horizon)
    if end <= k:
        return True
    b = np.arange(k + 1, end + 1)
    due = np.maximum(sched.scaled_targets(b) // sched.denom - counts, 0).sum(axis=1)
    return bool((due <= b - k).all())


def _extra_choices(deadline: list[int], must: np.ndarray, allowed: np.ndarray, m: int) -> list[np.ndarray]:
    """Ways to hand out m one-sample extras: the musts plus free groups, earliest deadline first."""
    free = [g for g in np.argsort(deadline, kind="stable") if allowed[g] and not must[g]]
    need = m - int(must.sum())
    if (must & ~allowed).any() or need < 0 or need > len(free):
        return []
    combos = sorted(itertools.combinations(free, need), key=lambda c: sorted(deadline[g] for g in c))
    out = []
    for combo in combos[:MAX_TRIES]:
        x = must.astype(np.int64)
        x[list(combo)] += 1
        out.append(x)
    return out


def order_slots(sched: Schedule, start: int, end: int, c0: np.ndarray, c1: np.ndarray) -> np.ndarray | None:
    """Group of each slot in [start, end) going from counts c0 to c1, within one of target at every prefix.

    Earliest-deadline-first; None when no such order exists (EDF is exact for unit jobs).
    """
    length = end - start
    lo, hi = _floor_ceil(sched.scaled_targets(np.arange(start + 1, end + 1)), sched.denom)
    releases: list[list[int]] = []
    deadlines: list[list[int]] = []
    for g in range(sched.num_groups):
        jobs = np.arange(c0[g] + 1, c1[g] + 1)
        releases.append(np.searchsorted(hi[:, g], jobs, side="left").tolist())
        deadlines.append(np.minimum(np.searchsorted(lo[:, g], jobs, side="left"), length - 1).tolist())
    heads = [0] * sched.num_groups
    out = np.empty(length, dtype=np.int16)
    for i in range(length):
        best, best_dl = -1, length + 1
        for g in range(sched.num_groups):
            h = heads[g]
            if h < len(releases[g]) and releases[g][h] <= i and deadlines[g][h] < best_dl:
                best, best_dl = g, deadlines[g][h]
        if best < 0 or best_dl < i:
            return None
        heads[best] += 1
        out[i] = best
    return out


class BlendIndex:
    """The group of every slot of a stage: counts at shard bounds, then each shard's slot order (cached)."""

    def __init__(self, sched: Schedule, shard_size: int) -> None:
        self.sched = sched
        self.bounds = shard_bounds(sched.total, shard_size)
        self._cache: dict[tuple, Any] = {}
        self._keys: list[tuple] = []
        periods = sched.rates.sum(axis=1) // np.gcd.reduce(sched.rates, axis=1)
        self._horizon = int(2 * periods.max() + shard_size)
        self.counts = self._plan()

    @property
    def num_shards(self) -> int:
        return len(self.bounds) - 1

    def _plan(self) -> np.ndarray:
        """(S+1, G) counts at shard bounds; every shard gets floor of its target plus at most one extra.

        Depth-first over shards: a shard's split must have an order inside the shard and leave a state that
        can go on; when none does, the previous shard's next split is tried (rare; bounded by MAX_BACKTRACKS).
        """
        sched, bounds = self.sched, self.bounds
        scaled = sched.scaled_targets(bounds)
        step = np.diff(scaled, axis=0)
        base = step // sched.denom
        has_frac = (step % sched.denom) > 0
        floors = np.vstack([np.zeros((1, sched.num_groups), np.int64), np.cumsum(base, axis=0)])
        # F: the part of the target the floors leave; the cumulative extras must stay within one of it.
        lo, hi = _floor_ceil(scaled - floors * sched.denom, sched.denom)
        counts = [floors[0].copy()]
        pending: list[Iterator[np.ndarray]] = []
        backtracks = 0
        while len(counts) < len(bounds):
            s = len(counts)
            if len(pending) < s:
                extras = counts[-1] - floors[s - 1]
                m = int(bounds[s] - bounds[s - 1] - base[s - 1].sum())
                must = extras < lo[s]
                allowed = has_frac[s - 1] & (extras + 1 <= hi[s])
                deadline = [int(np.searchsorted(lo[:, g], e + 1, side="left")) for g, e in enumerate(extras)]
                pending.append(iter(_extra_choices(deadline, must, allowed, m)))
            for x in pending[s - 1]:
                c1 = counts[-1] + base[s - 1] + x
                if (
                    self._extendable(int(bounds[s]), c1, scaled[s])
                    and self._order(s - 1, counts[-1], c1, scaled[s - 1]) is not None
                ):
                    counts.append(c1)
                    break
            else:
                pending.pop()
                backtracks += 1
                if s == 1 or backtracks > MAX_BACKTRACKS:
                    raise BlendError(
                        f"no exact split of shard {s - 1} (slots {bounds[s - 1]}..{bounds[s]}); "
                        "please report the ratios and sizes"
                    )
                counts.pop()
        return np.stack(counts)

    def _extendable(self, k: int, c: np.ndarray, scaled: np.ndarray) -> bool:
        end = min(self.sched.total, k + self._horizon)
        phases = self.sched.phase_of(np.array([k + 1, end]))
        if phases[0] != phases[1] or end - k < self._horizon:
            return extendable(self.sched, k, c, self._horizon)
        key = ("ext", int(phases[0]), tuple((c * self.sched.denom - scaled).tolist()))
        if key not in self._cache:
            self._cache[key] = extendable(self.sched, k, c, self._horizon)
        return self._cache[key]

    def _order(self, s: int, c0: np.ndarray, c1: np.ndarray, scaled0: np.ndarray) -> np.ndarray | None:
        start, end = int(self.bounds[s]), int(self.bounds[s + 1])
        phases = self.sched.phase_of(np.array([start + 1, end]))
        # Same phase, same rounding state, same counts -> same order; mixed-phase shards get a unique key.
        state = (int(phases[0]), end - start, tuple((c0 * self.sched.denom - scaled0).tolist()))
        key = (*state, tuple((c1 - c0).tolist())) if phases[0] == phases[1] else ("at", s, tuple(c1.tolist()))
        order = self._cache.get(key)
        if order is None:
            order = order_slots(self.sched, start, end, c0, c1)
            if order is None:
                return None
            self._cache[key] = order
        if len(self._keys) == s:
            self._keys.append(key)
        else:
            self._keys[s] = key
        return order

    def shard_groups(self, s: int) -> np.ndarray:
        """(len,) group index of each slot of shard s."""
        return self._cache[self._keys[s]]

    def counts_at(self, k: int) -> np.ndarray:
        """(G,) count of each group in the first k slots."""
        s = min(int(np.searchsorted(self.bounds, k, side="right")) - 1, self.num_shards - 1)
        part = self.shard_groups(s)[: k - int(self.bounds[s])]
        return self.counts[s] + np.bincount(part, minlength=self.sched.num_groups)

    def all_groups(self) -> np.ndarray:
        """The whole stream (tests, small stages)."""
        return np.concatenate([self.shard_groups(s) for s in range(self.num_shards)])


@dataclass(frozen=True)
class SourcePattern:
    """Which source serves each draw of a group (constant weights, periodic)."""

    weights: np.ndarray
    """(S,) reduced integer weights."""
    pattern: np.ndarray
    """(period,) source of each draw in one period."""
    rank: np.ndarray
    """(period,) how many earlier draws of the same source the period holds."""

    @property
    def period(self) -> int:
        return len(self.pattern)

    def draws(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Draw ids -> (source index, ordinal of the draw within its source)."""
        q, r = np.divmod(np.asarray(j, dtype=np.int64), self.period)
        src = self.pattern[r]
        return src, q * self.weights[src] + self.rank[r]

    def quotas(self, n: int) -> np.ndarray:
        """(S,) draws of each source among the first n draws."""
        q, r = divmod(n, self.period)
        return q * self.weights + np.bincount(self.pattern[:r], minlength=len(self.weights))


def build_source_pattern(weights: Sequence[float]) -> SourcePattern:
    ints = integer_weights(weights)
    period = int(ints.sum())
    sched = build_schedule([ints.tolist()], [period], period)
    pattern = order_slots(sched, 0, period, np.zeros_like(ints), ints).astype(np.int64)
    rank = np.zeros(period, dtype=np.int64)
    seen = np.zeros(len(ints), dtype=np.int64)
    for i, s in enumerate(pattern):
        rank[i] = seen[s]
        seen[s] += 1
    return SourcePattern(weights=ints, pattern=pattern, rank=rank)


def window_permute(j: np.ndarray, n: int, window: int, seed: Sequence[int]) -> np.ndarray:
    """Map slot j (0 <= j < n) to a draw id: a seeded permutation inside each window of ``window`` slots.

    Counts at every window boundary are unchanged by this shuffle; ``window <= 1`` is the identity.
    """
    j = np.asarray(j, dtype=np.int64)
    if window <= 1 or len(j) == 0:
        return j.copy()
    block, offset = np.divmod(j, window)
    out = np.empty_like(j)
    for b in np.unique(block):
        size = min(window, n - int(b) * window)
        perm = np.random.default_rng([*seed, int(b)]).permutation(size)
        sel = block == b
        out[sel] = int(b) * window + perm[offset[sel]]
    return out


def sample_permutation(n: int, epoch: int, seed: Sequence[int]) -> np.ndarray:
    """The order a source's n samples are used in during one pass (epoch) over it."""
    return np.random.default_rng([*seed, epoch]).permutation(n)


def prefix_counts(groups: np.ndarray, num_groups: int) -> np.ndarray:
    """(len+1, G) count of each group in every prefix (row k = first k slots)."""
    onehot = np.zeros((len(groups), num_groups), dtype=np.int64)
    onehot[np.arange(len(groups)), groups] = 1
    return np.vstack([np.zeros((1, num_groups), np.int64), np.cumsum(onehot, axis=0)])


def max_prefix_deviation(groups: np.ndarray, sched: Schedule) -> np.ndarray:
    """(G,) largest |count - target| over all prefixes (the guarantee: < 1)."""
    counts = prefix_counts(groups, sched.num_groups)
    target = sched.targets(np.arange(len(groups) + 1))
    return np.abs(counts - target).max(axis=0)
