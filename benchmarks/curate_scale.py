"""Global dedup against corpus size: time per sample, driver and job memory, planted duplicates found.

    .venv/bin/python benchmarks/curate_scale.py [--sizes 10000 100000 1000000] [--cpus 2] [--max-hamming 4]

A synthetic corpus of precomputed hash rows (what curation's dedup sees of a sample: key, content hash,
64-bit pHash) is generated inside Ray Data, never on the driver, in groups of 20 consecutive samples:
14 distinct random images, 1 exact copy of one of them (same content hash and pHash), 4 near copies (a new
content hash, a pHash 1..max_hamming bits away from one of the group's originals) and 1 decoy
max_hamming + 2 bits away (must stay). Each size runs in a fresh process with its own local Ray instance;
only the dedup stages (data_prep.dedup_stages.dedup_decisions, as the curation job runs them) are timed.
Planted duplicates are checked in Ray Data too: every drop must name the original it was planted from, and
every near drop must be within the radius of the pHash it names.

Reported per size: dedup wall time and time per sample, the driver's peak RSS and the whole process tree's
peak PSS (Ray's GCS, raylet, workers, object store pages) during the dedup, recall and precision of the
planted exact and near copies, near drops beyond the radius, and the growth exponent of time between sizes
(1 = linear). Targets: time per sample and driver memory flat within 1.5x from 100k to 1M; near recall
>= 0.99 at max_hamming 4; no drop beyond the radius.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.curate_memory import TreeSampler, mib
from data_prep.dedup import CANDIDATE_SCHEMA, DedupConfig, _mix64, popcount

GROUP = 20
ORIGINALS = 14
EXACT_POS = 14
NEAR_POS = (15, 16, 17, 18)
DECOY_POS = 19
ROWS_PER_BLOCK = 50_000
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def hex_words(words: np.ndarray) -> np.ndarray:
    """(n, k) uint64 -> (n, 16k) ASCII hex digits."""
    nibbles = np.stack([(words >> np.uint64(s)) & np.uint64(15) for s in range(60, -4, -4)], axis=-1)
    return _HEX[nibbles.reshape(len(words), -1)]


def string_array(prefix: bytes, digits: np.ndarray) -> pa.Array:
    """Fixed-width strings ``prefix + digits[i]`` built from buffers (no Python string per row)."""
    n = len(digits)
    body = np.concatenate([np.tile(np.frombuffer(prefix, np.uint8), (n, 1)), digits], axis=1)
    offsets = np.arange(0, (n + 1) * body.shape[1], body.shape[1], dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(body.tobytes())])


def _rand(idx: np.ndarray, salt: int) -> np.ndarray:
    return _mix64(idx.astype(np.uint64) * np.uint64(4) + np.uint64(salt))


def _flip_mask(idx: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """A mask with exactly ``bits`` set bits per row, drawn from the row's random words."""
    mask = np.zeros(len(idx), np.uint64)
    word, salt = _rand(idx, 2), 3
    while (need := popcount(mask) < bits).any():
        low = word & (~word + np.uint64(1))  # lowest set bit of the word
        mask = np.where(need, mask | low, mask)
        word = np.where(low == 0, _rand(idx + np.uint64(salt), 2), word & ~low)
        salt += 1
    return mask


def original_of(i: np.ndarray) -> np.ndarray:
    """The original each sample stands for (itself for originals and decoys' own identity)."""
    group, pos = i // GROUP, i % GROUP
    picked = group * GROUP + (_rand(group, 1) + pos.astype(np.uint64)).astype(np.int64) % ORIGINALS
    return np.where(pos < ORIGINALS, i, picked)


def synth_phash(i: np.ndarray, radius: int) -> np.ndarray:
    pos = i % GROUP
    base = _rand(original_of(i), 0)
    near_bits = 1 + (pos - NEAR_POS[0]) % max(radius, 1)
    bits = np.where(pos == DECOY_POS, radius + 2, np.where(np.isin(pos, NEAR_POS), near_bits, 0))
    bits = np.where(radius == 0, np.where(pos == DECOY_POS, 2, 0), bits)
    return base ^ _flip_mask(i, bits)


def generate(batch: dict[str, np.ndarray], radius: int) -> pa.Table:
    """Rows ``batch["id"]`` of the synthetic corpus (dedup.CANDIDATE_SCHEMA)."""
    i = batch["id"].astype(np.int64)
    pos = i % GROUP
    same_content = np.where(pos == EXACT_POS, original_of(i), i)  # the exact copy shares its original's
    words = np.stack([_rand(same_content, 10 + k) for k in range(4)], axis=1)
    key_words = _rand(i, 20)[:, None]
    return pa.table(
        {
            "order": i,
            "key": string_array(
                b"synthetic-", np.concatenate([hex_words(i.astype(np.uint64)[:, None]), hex_words(key_words)], axis=1)
            ),
            "content_hash": string_array(b"", hex_words(words)),
            "phash": synth_phash(i, radius),
            "participates": np.ones(len(i), bool),
        },
        schema=CANDIDATE_SCHEMA,
    )


def check(t: pa.Table, radius: int) -> pa.Table:
    """Decisions -> one row of counts: correct exact / near drops, wrong drops, near drops beyond the radius."""
    i = t["order"].to_numpy()
    pos = i % GROUP
    named = np.array(
        [int(k[len("synthetic-") : len("synthetic-") + 16], 16) for k in t["dup_of"].to_pylist()], dtype=np.int64
    )
    reason = np.asarray(t["reason"].to_pylist(), dtype=object)
    right = named == original_of(i)
    exact_ok = (reason == "duplicate_exact") & (pos == EXACT_POS) & right
    near_ok = (reason == "duplicate_near") & np.isin(pos, NEAR_POS) & right
    is_near = reason == "duplicate_near"
    dist = popcount(synth_phash(i[is_near], radius) ^ synth_phash(named[is_near], radius))
    return pa.table(
        {
            "exact_ok": [int(exact_ok.sum())],
            "near_ok": [int(near_ok.sum())],
            "wrong": [int((~(exact_ok | near_ok)).sum())],
            "beyond": [int((dist > radius).sum())],
            "decoys": [int((pos == DECOY_POS).sum())],
            "drops": [len(i)],
        }
    )


def child(args: argparse.Namespace) -> dict:
    import ray

    from data_prep.curation import configure_ray_data
    from data_prep.dedup_stages import dedup_decisions

    n, radius, interval = args.child, args.max_hamming, args.interval
    store = int(args.object_store_gb * 2**30) if args.object_store_gb else None
    ray.init(num_cpus=args.cpus, object_store_memory=store, include_dashboard=False, log_to_driver=False)
    try:
        configure_ray_data(False, args.shuffle)
        blocks = max(1, math.ceil(n / ROWS_PER_BLOCK))
        cands = (
            ray.data.range(n, override_num_blocks=blocks)
            .map_batches(generate, batch_format="numpy", batch_size=None, fn_kwargs={"radius": radius})
            .materialize()
        )
        time.sleep(2)
        _, idle_pss, idle_driver = TreeSampler(interval).read()
        sampler = TreeSampler(interval)
        sampler.start()
        start = time.perf_counter()
        decisions = dedup_decisions(cands, DedupConfig(max_hamming=radius), args.rows_per_task).materialize()
        wall = time.perf_counter() - start
        sampler.stop()
        counts = (
            decisions.map_batches(check, batch_format="pyarrow", batch_size=None, fn_kwargs={"radius": radius})
            .to_pandas()
            .sum()
            .to_dict()
        )
    finally:
        ray.shutdown()
    groups, rest = divmod(n, GROUP)
    planted_exact = groups + (rest > EXACT_POS)
    planted_near = groups * len(NEAR_POS) + sum(rest > p for p in NEAR_POS)
    return {
        "samples": n,
        "wall_s": wall,
        "idle_pss": idle_pss,
        "peak_pss": sampler.peak_pss,
        "idle_driver": idle_driver,
        "peak_driver": sampler.peak_driver,
        "planted_exact": planted_exact,
        "planted_near": planted_near,
        **{k: int(v) for k, v in counts.items()},
    }


def report(rows: list[dict], radius: int) -> str:
    head = (
        f"{'samples':>10} {'dedup s':>8} {'us/sample':>9} {'driver MiB':>10} {'job PSS MiB':>11} "
        f"{'exact rec':>9} {'near rec':>9} {'precision':>9} {'beyond r':>8} {'decoys':>6} {'exp':>5}"
    )
    lines = [f"max_hamming {radius}", head, "-" * len(head)]
    for k, r in enumerate(rows):
        found = r["exact_ok"] + r["near_ok"]
        exp = ""
        if k:
            p = rows[k - 1]
            exp = f"{math.log(r['wall_s'] / p['wall_s']) / math.log(r['samples'] / p['samples']):.2f}"
        lines.append(
            f"{r['samples']:>10,} {r['wall_s']:>8.1f} {1e6 * r['wall_s'] / r['samples']:>9.1f} "
            f"{mib(r['peak_driver']):>10} {mib(r['peak_pss']):>11} {r['exact_ok'] / max(r['planted_exact'], 1):>9.4f} "
            f"{r['near_ok'] / max(r['planted_near'], 1):>9.4f} {found / max(r['drops'], 1):>9.4f} "
            f"{r['beyond']:>8} {r['decoys']:>6} {exp:>5}"
        )
    big = [r for r in rows if r["samples"] >= 100_000]
    if len(big) >= 2:
        a, b = big[0], big[-1]
        lines.append(
            f"{a['samples']:,} -> {b['samples']:,}: time per sample x"
            f"{(b['wall_s'] / b['samples']) / (a['wall_s'] / a['samples']):.2f}, driver peak "
            f"x{b['peak_driver'] / a['peak_driver']:.2f}, job peak PSS x{b['peak_pss'] / a['peak_pss']:.2f} "
            "(targets: time and driver <= 1.5x)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--max-hamming", type=int, default=4)
    parser.add_argument("--rows-per-task", type=int, default=200_000, help="exec.dedup_rows_per_task")
    parser.add_argument("--shuffle", default="sort_shuffle_pull_based", help="exec.shuffle")
    parser.add_argument("--object-store-gb", type=float, default=0, help="Ray object store size (0: Ray's default)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory readings")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    passed = ["--cpus", "--max-hamming", "--rows-per-task", "--shuffle", "--object-store-gb", "--interval"]
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(n)]
        for flag in passed:
            cmd += [flag, str(getattr(args, flag[2:].replace("-", "_")))]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{n:,} samples: dedup {rows[-1]['wall_s']:.1f} s", file=sys.stderr)
    print(report(rows, args.max_hamming))


if __name__ == "__main__":
    main()
