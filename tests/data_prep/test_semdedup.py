"""Semantic dedup: the per-cluster rule against a brute-force single pass, the seeded fit sample, and the Ray
Data stages (many clusters in parallel) against the per-cluster rule, equal however the rows are cut."""

import numpy as np
import pyarrow as pa
import pytest

from data_prep.dedup import SemanticConfig
from data_prep.semdedup import (
    BLOCK,
    assign_clusters,
    fit_centroids,
    in_fit_sample,
    resolve_cluster,
    semantic_decisions,
)
from tests.data_prep.curate_fixtures import ray_local  # noqa: F401


def reference(emb: np.ndarray, threshold: float) -> dict[int, int]:
    """The single-pass rule, one row at a time: dropped row -> the earliest kept row it is similar to."""
    kept, out = [], {}
    for i in range(len(emb)):
        hit = [j for j in kept if emb[i].astype(np.float64) @ emb[j].astype(np.float64) >= threshold]
        if hit:
            out[i] = hit[0]
        else:
            kept.append(i)
    return out


def corpus(rng: np.random.Generator, n: int, dim: int = 8, groups: int = 40) -> np.ndarray:
    """Unit vectors around a few directions, with near copies and chains (a ~ b ~ c)."""
    centres = rng.normal(size=(groups, dim))
    x = centres[rng.integers(0, groups, n)] + rng.normal(scale=0.25, size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_cluster_rule_equals_single_pass(seed):
    rng = np.random.default_rng(seed)
    emb = corpus(rng, int(rng.integers(2, 2 * BLOCK + 40)), groups=int(rng.integers(3, 30)))
    threshold = float(rng.uniform(0.8, 0.98))
    dropped, of = resolve_cluster(emb, threshold)
    assert dict(zip(dropped.tolist(), of.tolist(), strict=True)) == reference(emb, threshold)
    assert len(dropped) > 0 and len(dropped) < len(emb)


def test_only_kept_rows_stand_for_others():
    # b is within the threshold of a, c of b but not of a: b is dropped (as a's copy) and c stays
    a, b, c = np.array([1.0, 0.0]), np.array([np.cos(0.3), np.sin(0.3)]), np.array([np.cos(0.6), np.sin(0.6)])
    dropped, of = resolve_cluster(np.stack([a, b, c]).astype(np.float32), float(np.cos(0.35)))
    assert dropped.tolist() == [1] and of.tolist() == [0]


def test_fit_sample_and_centroids_do_not_depend_on_row_order():
    order = np.arange(10_000, dtype=np.int64) * 7
    mask = in_fit_sample(order, 0.1, seed=3)
    assert 800 < mask.sum() < 1200
    perm = np.random.default_rng(0).permutation(len(order))
    assert np.array_equal(in_fit_sample(order[perm], 0.1, seed=3), mask[perm])
    assert not np.array_equal(in_fit_sample(order, 0.1, seed=4), mask)
    emb = corpus(np.random.default_rng(1), 300)
    t = pa.table({"order": np.arange(300), "embedding": list(emb)})
    cfg = SemanticConfig(seed=5)
    first = fit_centroids(6, cfg, t)
    mixed = t.take(np.random.default_rng(2).permutation(300))
    again = fit_centroids(6, cfg, mixed.slice(0, 150), mixed.slice(150))
    assert np.array_equal(first, again)
    assert assign_clusters(emb, first).tolist() == assign_clusters(emb[::-1], first)[::-1].tolist()


@pytest.mark.ray
def test_ray_stages_equal_the_rule_per_cluster_and_do_not_depend_on_blocks(ray_local):  # noqa: F811
    import ray

    rng = np.random.default_rng(7)
    n = 1500
    emb = corpus(rng, n, dim=12, groups=60)
    order = np.sort(rng.choice(1 << 40, size=n, replace=False)).astype(np.int64)
    keys = [f"k{i}" for i in range(n)]
    table = pa.table({"order": order, "key": keys, "embedding": list(emb)})
    cfg = SemanticConfig(enabled=True, threshold=0.9, clusters=8, fit_samples=600, seed=2)

    def run(blocks: int, rows_per_task: int) -> dict[int, str]:
        shuffled = table.take(np.random.default_rng(blocks).permutation(n))
        ds = ray.data.from_arrow(shuffled).repartition(blocks).materialize()
        out = semantic_decisions(ds, cfg, rows_per_task).to_arrow_refs()
        rows = pa.concat_tables(ray.get(out)).to_pylist()
        assert {r["reason"] for r in rows} == {"duplicate_semantic"}
        return {r["order"]: r["dup_of"] for r in rows}

    got = run(blocks=3, rows_per_task=200)
    assert got == run(blocks=11, rows_per_task=5000)
    # the same fit and assignment in-process, then the rule per cluster: what the stages must have decided
    sample = in_fit_sample(order, 600 / n, cfg.seed)
    centroids = fit_centroids(cfg.clusters, cfg, table.filter(pa.array(sample)).select(["order", "embedding"]))
    cluster = assign_clusters(emb, centroids)
    assert len(set(cluster.tolist())) == cfg.clusters
    want = {}
    for c in range(cfg.clusters):
        rows = np.flatnonzero(cluster == c)
        for d, o in reference(emb[rows], cfg.threshold).items():
            want[int(order[rows[d]])] = keys[rows[o]]
    assert got == want and len(want) > 100
