"""Distributed dedup against the single-pass reference: the probe masks, the per-partition functions (run here
in-process, partition by partition, as the Ray Data stages run them) and the Ray Data stages themselves on
seeded random corpora with planted exact copies, near copies, chains and repeated keys."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from data_prep.dedup import (
    CANDIDATE_SCHEMA,
    DedupConfig,
    choose_levels,
    connected_components,
    exact_edges,
    explode_chunks,
    near_edges,
    probe_masks,
    resolve_components,
    split_key_duplicates,
    string_partition,
    text_duplicates,
    value_partition,
)
from tests.data_prep.curate_fixtures import ray_local  # noqa: F401
from tests.data_prep.dedup_reference import MultiIndexHash, find_duplicates


def test_probe_masks_cover_every_hash_within_the_radius():
    rng = random.Random(0)
    for radius in range(0, 9):
        for levels in (1, 2, 3):
            if (radius + 1) ** levels > 1024:
                continue
            masks = [m for _, m in probe_masks(radius, levels)]
            for _ in range(2000):
                x = sum(1 << b for b in rng.sample(range(64), rng.randint(0, radius)))
                assert any(x & m == 0 for m in masks), (radius, levels, hex(x))
    # exhaustively for a small radius: every pattern of up to 2 flipped bits
    masks = [m for _, m in probe_masks(2, 2)]
    for bits in itertools.chain.from_iterable(itertools.combinations(range(64), k) for k in range(3)):
        assert any(sum(1 << b for b in bits) & m == 0 for m in masks)


def test_levels_grow_with_the_corpus_so_keys_stay_selective():
    assert [choose_levels(4, n) for n in (10_000, 1_000_000, 72_000_000)] == [1, 2, 3]
    for n in (10_000, 1_000_000, 72_000_000, 10**9):
        masks = probe_masks(4, choose_levels(4, n))
        bits = min(int(m).bit_count() for _, m in masks)
        # keys per sample times unrelated hashes expected to share a key: bounded whatever the corpus
        assert len(masks) * n / 2**bits < 200


def test_reference_multi_index_matches_brute_force():
    rng = random.Random(0)
    base = [rng.getrandbits(64) for _ in range(300)]
    values = base + [b ^ sum(1 << rng.randrange(64) for _ in range(rng.randrange(7))) for b in base[:100]]
    for radius in (0, 3, 6):
        index = MultiIndexHash(radius)
        for i, v in enumerate(values[:300]):
            index.add(v, i)
        for v in values[300:]:
            expect = min((i for i in range(300) if (values[i] ^ v).bit_count() <= radius), default=None)
            assert index.query(v) == expect


def _by_partition(t: pa.Table, column: str, parts: int) -> list[pa.Table]:
    col = t[column]
    part = string_partition(col, parts) if pa.types.is_string(col.type) else value_partition(col.to_numpy(), parts)
    return [t.filter(pa.array(part == p)) for p in range(parts) if (part == p).any()]


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(tables) if tables else schema.empty_table()


def local_decisions(cands: pa.Table, cfg: DedupConfig, parts: int) -> dict[int, tuple[str, str]]:
    """data_prep.dedup_stages.dedup_decisions without Ray: the same functions on the same hash partitions."""
    keyed = pa.concat_tables([split_key_duplicates(p) for p in _by_partition(cands, "key", parts)])
    decided = keyed.filter(pc.is_valid(keyed["reason"]))
    out = dict(
        zip(
            decided["order"].to_pylist(),
            zip(decided["reason"].to_pylist(), decided["dup_of"].to_pylist(), strict=True),
            strict=True,
        )
    )
    alive = keyed.filter(pc.and_(pc.is_null(keyed["reason"]), keyed["participates"]))
    texts = alive.filter(pc.is_null(alive["phash"]))
    images = alive.filter(pc.is_valid(alive["phash"]))
    found = [text_duplicates(p) for p in _by_partition(texts, "content_hash", parts)] if cfg.text else []
    edges = [exact_edges(p) for p in _by_partition(images, "content_hash", parts)] if cfg.exact else []
    if cfg.near and images.num_rows:
        r, near_parts = cfg.max_hamming, parts * (cfg.max_hamming + 1)
        levels = choose_levels(r, images.num_rows)
        rows = explode_chunks(images["order"].to_numpy(), images["phash"].to_numpy(), r, near_parts)
        edges += [near_edges(p.drop_columns(["part"]), r, levels) for p in _by_partition(rows, "part", near_parts)]
    nodes, comp = connected_components(edges)
    on_pair = np.isin(images["order"].to_numpy(), nodes)
    involved = images.filter(pa.array(on_pair))
    involved = involved.append_column("comp", pa.array(comp[np.searchsorted(nodes, involved["order"].to_numpy())]))
    found += [resolve_components(p, cfg) for p in _by_partition(involved, "comp", parts)]
    for t in found:
        out.update(
            zip(t["order"].to_pylist(), zip(t["reason"].to_pylist(), t["dup_of"].to_pylist(), strict=True), strict=True)
        )
    return out


def reference_decisions(cands: pa.Table, cfg: DedupConfig) -> dict[int, tuple[str, str]]:
    t = cands.sort_by("order")
    ref = find_duplicates(
        t["key"].to_pylist(), t["content_hash"].to_pylist(), t["phash"].to_pylist(), cfg, t["participates"].to_pylist()
    )
    return {o: d for o, d in zip(t["order"].to_pylist(), ref, strict=True) if d is not None}


def flip(value: int, rng: random.Random, bits: int) -> int:
    for b in rng.sample(range(64), bits):
        value ^= 1 << b
    return value


def random_corpus(seed: int, n: int, radius: int) -> pa.Table:
    """Originals, exact copies, near copies, copies of copies (chains), the same content hash with another
    pHash, repeated keys, text with repeats, non-participants; shuffled job order."""
    rng = random.Random(seed)
    rows: list[tuple[str, str | None, int | None, bool]] = []
    for i in range(n):
        u = rng.random()
        images = [r for r in rows if r[2] is not None]
        if images and u < 0.25:  # near copy (of an original or of a copy: chains), within or just past the radius
            ph = rng.choice(images[-20:] if rng.random() < 0.5 else images)[2]
            rows.append((f"k{i}", f"h{i}", flip(ph, rng, rng.randint(0, radius + 1)), rng.random() < 0.95))
        elif images and u < 0.3:
            rows.append((f"k{i}", *rng.choice(images)[1:3], True))  # exact copy
        elif images and u < 0.33:
            rows.append((f"k{i}", rng.choice(images)[1], rng.getrandbits(64), True))  # same pixels hash, other pHash
        elif rows and u < 0.36:
            rows.append((rng.choice(rows)[0], f"h{i}", rng.getrandbits(64), True))  # a key seen before
        elif u < 0.48:
            rows.append((f"k{i}", f"t{rng.randrange(max(n // 8, 1))}", None, rng.random() < 0.9))  # text
        else:
            rows.append((f"k{i}", f"h{i}", rng.getrandbits(64), rng.random() < 0.95))
    order = rng.sample(range(10 * n), n)  # orders need not be dense, only sortable
    order.sort()
    return pa.table(
        {
            "order": order,
            "key": [r[0] for r in rows],
            "content_hash": [r[1] for r in rows],
            "phash": [r[2] for r in rows],
            "participates": [r[3] for r in rows],
        },
        schema=CANDIDATE_SCHEMA,
    )


CONFIGS = [
    DedupConfig(),
    DedupConfig(max_hamming=0),
    DedupConfig(max_hamming=2, exact=False),
    DedupConfig(max_hamming=6, near=False),
    DedupConfig(max_hamming=3, text=False),
    DedupConfig(max_hamming=8),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"r{c.max_hamming}-e{c.exact:d}n{c.near:d}t{c.text:d}")
def test_partition_functions_agree_with_the_reference_on_random_corpora(cfg):
    for seed in range(40):
        cands = random_corpus(seed, 40 + 13 * seed, cfg.max_hamming)
        expect = reference_decisions(cands, cfg)
        assert local_decisions(cands, cfg, parts=1 + seed % 4) == expect, seed
        assert any(r == "duplicate_near" for r, _ in expect.values()) or not cfg.near or seed < 2


def test_chains_count_kept_samples_only():
    a, b, c, d = 0, 0b1111, 0b1111_1111, 0b11  # b near a; c near b only; d near a and b
    t = pa.table(
        {
            "order": [1, 2, 3, 4, 5],
            "key": ["a", "b", "c", "d", "e"],
            "content_hash": ["ha", "hb", "hc", "hd", "hc"],
            "phash": [a, b, c, d, c ^ (1 << 40)],
            "participates": [True] * 5,
        },
        schema=CANDIDATE_SCHEMA,
    )
    got = local_decisions(t, DedupConfig(max_hamming=4), parts=2)
    # c stays: the only image within 4 bits of it (b) was dropped; e has c's pixels: exact before near
    assert got == {2: ("duplicate_near", "a"), 4: ("duplicate_near", "a"), 5: ("duplicate_exact", "c")}
    assert got == reference_decisions(t, DedupConfig(max_hamming=4))


def test_near_edges_report_each_pair_once():
    rng = random.Random(1)
    phash = [rng.getrandbits(64) for _ in range(200)]
    phash += [flip(p, rng, rng.randint(1, 4)) for p in phash[:80]] + phash[:10]  # near copies and repeats
    order = np.arange(len(phash))
    rows = explode_chunks(order, np.array(phash, np.uint64), 4, 7)
    edges = pa.concat_tables([near_edges(p.drop_columns(["part"]), 4, 2) for p in _by_partition(rows, "part", 7)])
    pairs = sorted(tuple(sorted(e)) for e in zip(edges["a"].to_pylist(), edges["b"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs))
    reps = {}
    for i, p in enumerate(phash):
        reps.setdefault(p, i)
    expect = {tuple(sorted((i, reps[p]))) for i, p in enumerate(phash) if reps[p] != i}
    rep_items = sorted(reps.items(), key=lambda kv: kv[1])
    for (pa_, ia), (pb, ib) in itertools.combinations(rep_items, 2):
        if (pa_ ^ pb).bit_count() <= 4:
            expect.add((ia, ib))
    assert set(pairs) == expect


def test_connected_components_name_their_first_sample():
    edges = [pa.table({"a": [5, 9, 2], "b": [7, 5, 3]})]
    nodes, comp = connected_components(edges)
    assert nodes.tolist() == [2, 3, 5, 7, 9] and comp.tolist() == [2, 2, 5, 5, 5]
    assert connected_components([])[0].size == 0


@pytest.mark.ray
def test_ray_data_stages_agree_with_the_reference(ray_local):  # noqa: F811
    import ray

    from data_prep.curation import configure_ray_data
    from data_prep.dedup_stages import dedup_decisions

    configure_ray_data(False)
    for seed, cfg in enumerate([DedupConfig(), DedupConfig(max_hamming=2, exact=False, text=False)]):
        cands = random_corpus(100 + seed, 600, cfg.max_hamming)
        ds = ray.data.from_arrow(cands).repartition(4).materialize()
        got = dedup_decisions(ds, cfg, rows_per_task=150).take_all()
        assert {r["order"]: (r["reason"], r["dup_of"]) for r in got} == reference_decisions(cands, cfg)
    empty = ray.data.from_arrow(CANDIDATE_SCHEMA.empty_table()).materialize()
    assert dedup_decisions(empty, DedupConfig(), rows_per_task=10).count() == 0


def test_dedup_config_validation():
    with pytest.raises(ValueError, match="dedup.max_hamming"):
        DedupConfig(max_hamming=40)
