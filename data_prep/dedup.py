"""Global deduplication: what is a duplicate of what, computed per partition so the work per sample stays flat.

What is hashed: exact image duplicates share the SHA-256 of their decoded, EXIF-oriented RGB pixels and size
(``imaging.content_hash``), so a re-saved file with other metadata is exact; near duplicates have 64-bit
pHashes (of the normalised image) within ``max_hamming`` bits, which catches resized and re-encoded copies;
text-only samples are exact duplicates when their stripped text has the same SHA-256.

Semantics, over the candidates (samples that passed validation and filters) in job order (sources in config
order, then each source's input order):

1. ``duplicate_key``: a key already seen -> dropped, pointing at the key itself. Such a sample takes no part
   in what follows, and neither do samples of sources with ``dedup: false``.
2. ``duplicate_text``: a text-only sample whose text hash an earlier one has -> dropped, pointing at the first.
3. images, in job order: dropped as ``duplicate_exact`` of the *kept* image with its content hash, else as
   ``duplicate_near`` of the earliest *kept* image within ``max_hamming`` bits, else kept. Only kept images
   stand for others: in a chain a ~ b ~ c where c is near b but not near a, b is dropped (near a) and c is
   kept. This is the single-pass algorithm that ran on the driver (tests/data_prep/dedup_reference.py).
4. ``duplicate_semantic`` (off by default; data_prep.semdedup): among the images step 3 kept, with a CLIP
   embedding, in job order: dropped when its cosine similarity to an earlier *kept* image of its k-means
   cluster is at least ``semantic.threshold``, pointing at the earliest such image. As in NeMo Curator the
   stages run one after the other, so a near duplicate's ``duplicate_of`` may name an image that this step
   then drops in turn (its own ledger row names the image that stays).

How it is computed without a pass over the whole corpus (data_prep.dedup_stages runs these functions as
Ray Data stages; each one here sees one hash partition and nothing else):

- keys and text hashes: hash-partitioned grouping; the first in job order of each group wins.
- near pairs: multi-index hashing applied twice or more (``probe_masks``). The 64 bits are cut into
  ``r + 1`` chunks (r = max_hamming); two hashes within r bits agree exactly on at least one (pigeonhole).
  Rows are shuffled by (chunk, chunk value) -- r + 1 rows per image. Inside a partition, the bits outside
  the chunk are cut into r + 1 sub-chunks again, and again one of them agrees; so every pair within r bits
  shares one of the (r + 1)^levels composite keys of ~23 bits (r = 4, 2 levels) to ~31 bits (3 levels). The
  number of levels is chosen from the corpus size to minimise keys per sample x (1 + unrelated hashes
  expected to share a key), which keeps the work per sample bounded as the corpus grows (r = 4: 1 level
  below ~17k hashes, 2 up to ~17M, 3 up to ~4.8G; radii above ~9 afford fewer levels and cost more per
  sample). Candidates are verified by Hamming distance and a pair is emitted only under the first composite
  key it shares (once in the job).
- the graph of exact and near pairs is split into connected components (one task over the pairs only; a
  sample with no pair is kept without further work). A decision depends only on kept samples it is a
  duplicate of, all in its component, so each component replays the single-pass rule above on its own
  members, in job order, in parallel tasks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CANDIDATE_SCHEMA = pa.schema(
    [
        ("order", pa.int64()),
        ("key", pa.string()),
        ("content_hash", pa.string()),
        ("phash", pa.uint64()),
        ("participates", pa.bool_()),
    ]
)
"""One row per candidate: ``order`` sorts in job order; ``phash`` is null for text-only samples."""
DECISION_SCHEMA = pa.schema([("order", pa.int64()), ("reason", pa.string()), ("dup_of", pa.string())])
"""One row per dropped candidate: the reason and the key of the copy that stays."""
EDGE_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64())])
"""A pair of candidates (orders) that are duplicates of each other (exact or within the radius)."""
_NULL_HASH = "\x00"  # stands for a missing content hash: the single-pass rule grouped those together too
_MAX_LEVELS = 4
_MAX_KEYS = 1024


@dataclass(kw_only=True)
class SemanticConfig:
    enabled: bool = False
    """Drop images whose CLIP embedding is within ``threshold`` of an earlier kept image (SemDeDup); needs
    embeddings.scorer."""
    threshold: float = 0.95
    """Cosine similarity of L2-normalised image embeddings at or above which an image is a duplicate."""
    clusters: int = 0
    """k-means clusters (similarities are compared within a cluster only); 0: one per 1,000 candidates."""
    fit_samples: int = 100_000
    """Embeddings k-means is fitted on: a seeded sample that does not depend on how blocks are cut."""
    max_iter: int = 50
    """Lloyd iterations of the k-means fit at most."""
    seed: int = 0
    """Seed of the fit sample and of the k-means++ initialisation."""

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"dedup.semantic.threshold must be a cosine similarity in -1..1, got {self.threshold}")
        if self.clusters < 0 or self.fit_samples < 1 or self.max_iter < 1:
            raise ValueError("dedup.semantic: clusters >= 0, fit_samples >= 1 and max_iter >= 1 required")


@dataclass(kw_only=True)
class DedupConfig:
    exact: bool = True
    """Drop exact image duplicates (same decoded pixels) across all sources."""
    near: bool = True
    """Drop near-duplicate images (pHash within max_hamming bits) across all sources."""
    max_hamming: int = 4
    """Largest Hamming distance between 64-bit pHashes that counts as a near duplicate (0..16)."""
    text: bool = True
    """Drop exact duplicate texts in text-only sources."""
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    """Semantic dedup on CLIP image embeddings, after exact and near dedup (data_prep.semdedup)."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_hamming <= 16:
            raise ValueError(f"dedup.max_hamming must be in 0..16, got {self.max_hamming}")


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x.astype(np.uint64, copy=False))


def _mask(bits: list[int]) -> int:
    return sum(1 << b for b in bits)


def probe_masks(radius: int, levels: int) -> list[tuple[int, int]]:
    """Composite keys as (first-level chunk, bit mask): every x with popcount(x) <= radius has x & mask == 0
    for at least one of them. Level by level, the bits not yet in the mask are cut into radius + 1
    contiguous runs, and at most ``radius`` runs can hold a set bit."""
    out: list[tuple[int, int]] = []

    def grow(chunk: int, used: list[int], free: list[int], level: int) -> None:
        if level == levels or not free:
            out.append((chunk, _mask(used)))
            return
        for part in np.array_split(np.array(free), radius + 1):  # an empty run adds no bits and still holds
            taken = set(part.tolist())
            grow(chunk, used + part.tolist(), [b for b in free if b not in taken], level + 1)

    for c, part in enumerate(np.array_split(np.arange(64), radius + 1)):
        rest = [b for b in range(64) if b not in set(part.tolist())]
        grow(c, part.tolist(), rest, 1)
    return out


def choose_levels(radius: int, n: int) -> int:
    """Levels of ``probe_masks`` with the least expected work per sample for ``n`` hashes: keys per sample
    times (1 + unrelated hashes expected to share a key)."""

    def cost(levels: int) -> float:
        masks = probe_masks(radius, levels)
        bits = min(int(m).bit_count() for _, m in masks)
        return len(masks) * (1.0 + n / 2.0**bits)

    options = [lv for lv in range(1, _MAX_LEVELS + 1) if (radius + 1) ** lv <= _MAX_KEYS]
    return min(options, key=lambda lv: (cost(lv), lv))


def chunk_masks(radius: int) -> list[int]:
    """The first-level chunks: rows are shuffled by (chunk, hash & chunk mask)."""
    return [_mask(part.tolist()) for part in np.array_split(np.arange(64), radius + 1)]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a stable, well-spread hash of uint64 values (the same on every node and run)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def string_partition(values: pa.ChunkedArray | pa.Array, parts: int) -> np.ndarray:
    """Partition of each string (nulls together): equal strings always land in the same one."""
    import pandas as pd

    filled = pc.fill_null(values, _NULL_HASH).to_numpy(zero_copy_only=False)
    return (pd.util.hash_array(filled.astype(object)) % np.uint64(parts)).astype(np.int32)


def value_partition(values: np.ndarray, parts: int) -> np.ndarray:
    return (_mix64(values) % np.uint64(parts)).astype(np.int32)


def _group_firsts(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For keys sorted so equal ones are adjacent: whether each row starts its group, and the row index of
    its group's first row."""
    first = np.ones(len(sorted_keys), dtype=bool)
    if len(sorted_keys) > 1:
        first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    head = np.maximum.accumulate(np.where(first, np.arange(len(sorted_keys)), 0))
    return first, head


def _sorted_groups(t: pa.Table, column: str) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    t = t.set_column(t.schema.get_field_index(column), column, pc.fill_null(t[column], _NULL_HASH))
    t = t.sort_by([(column, "ascending"), ("order", "ascending")])
    first, head = _group_firsts(t[column].to_numpy(zero_copy_only=False))
    return t, first, head


def split_key_duplicates(t: pa.Table) -> pa.Table:
    """Rows of one key partition -> the same rows with ``reason``/``dup_of`` set on every later copy of a key."""
    t, first, _ = _sorted_groups(t, "key")
    reason = pa.array(np.where(first, None, "duplicate_key"), pa.string())
    dup_of = pc.if_else(pa.array(first), pa.scalar(None, pa.string()), t["key"])
    return t.append_column("reason", reason).append_column("dup_of", dup_of)


def text_duplicates(t: pa.Table) -> pa.Table:
    """Text rows of one content-hash partition -> a decision for every later copy of a text."""
    t = t.filter(pc.is_valid(t["content_hash"]))  # no hash: never compared (as before)
    t, first, head = _sorted_groups(t, "content_hash")
    later = np.flatnonzero(~first)
    keys = t["key"].to_numpy(zero_copy_only=False)
    return pa.table(
        {
            "order": t["order"].to_numpy()[later],
            "reason": pa.array(["duplicate_text"] * len(later), pa.string()),
            "dup_of": pa.array(keys[head[later]], pa.string()),
        },
        schema=DECISION_SCHEMA,
    )


def exact_edges(t: pa.Table) -> pa.Table:
    """Image rows of one content-hash partition -> an edge from every later copy to the first."""
    t, first, head = _sorted_groups(t, "content_hash")
    order = t["order"].to_numpy()
    later = np.flatnonzero(~first)
    return pa.table({"a": order[later], "b": order[head[later]]}, schema=EDGE_SCHEMA)


def explode_chunks(order: np.ndarray, phash: np.ndarray, radius: int, parts: int) -> pa.Table:
    """Image rows -> one row per first-level chunk, with the partition of its (chunk, chunk value) bucket."""
    masks = chunk_masks(radius)
    n = len(order)
    chunk = np.repeat(np.arange(len(masks), dtype=np.int8), n)
    ph = np.tile(phash, len(masks))
    bucket = ph & np.repeat(np.array(masks, dtype=np.uint64), n)
    with np.errstate(over="ignore"):
        mixed = bucket * np.uint64(0x9E3779B97F4A7C15) + chunk.astype(np.uint64)
    return pa.table(
        {"chunk": chunk, "order": np.tile(order, len(masks)), "phash": ph, "part": value_partition(mixed, parts)}
    )


def _pairs_in_groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i < j) of equal values in a sorted array."""
    left, right = [], []
    idx = np.flatnonzero(keys[1:] == keys[:-1]) if len(keys) > 1 else np.empty(0, np.int64)
    d = 1
    while idx.size:
        left.append(idx)
        right.append(idx + d)
        idx = idx[idx + d + 1 < len(keys)]
        idx = idx[keys[idx + d + 1] == keys[idx]]
        d += 1
    if not left:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(left), np.concatenate(right)


def near_edges(t: pa.Table, radius: int, levels: int) -> pa.Table:
    """Chunk rows of one partition -> edges: each sample to the first sample of the same pHash (emitted from
    chunk 0 only), and every pair of distinct pHashes within the radius (from its first shared key only)."""
    masks = probe_masks(radius, levels)
    mask_arr = np.array([m for _, m in masks], dtype=np.uint64)
    chunk_all = t["chunk"].to_numpy()
    edges_a, edges_b = [], []
    for c in np.unique(chunk_all):
        rows = np.flatnonzero(chunk_all == c)
        order = t["order"].to_numpy()[rows]
        phash = t["phash"].to_numpy()[rows]
        by = np.lexsort((order, phash))
        order, phash = order[by], phash[by]
        first, head = _group_firsts(phash)
        if c == 0:  # the same pHash meets in every chunk's bucket; one of them speaks for it
            edges_a.append(order[~first])
            edges_b.append(order[head[~first]])
        rep_order, rep_phash = order[first], phash[first]
        for k in (k for k, (ck, _) in enumerate(masks) if ck == c):
            a, b = _verified_pairs(rep_phash, mask_arr, k, radius)
            edges_a.append(rep_order[a])
            edges_b.append(rep_order[b])
    if not edges_a:
        return EDGE_SCHEMA.empty_table()
    return pa.table({"a": np.concatenate(edges_a), "b": np.concatenate(edges_b)}, schema=EDGE_SCHEMA)


def _verified_pairs(phash: np.ndarray, masks: np.ndarray, k: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of distinct hashes sharing composite key ``k``, within the radius, and sharing no earlier key."""
    keyed = phash & masks[k]
    by = np.argsort(keyed, kind="stable")
    i, j = _pairs_in_groups(keyed[by])
    a, b = by[i], by[j]
    x = phash[a] ^ phash[b]
    keep = popcount(x) <= radius
    for m in masks[:k]:
        keep &= (x & m) != 0
    return a[keep], b[keep]


def connected_components(edges: list[pa.Table]) -> tuple[np.ndarray, np.ndarray]:
    """Edges -> (every sample on an edge, sorted; its component, the smallest order in it)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_components

    a = np.concatenate([np.asarray(t["a"].to_numpy()) for t in edges] or [np.empty(0, np.int64)])
    b = np.concatenate([np.asarray(t["b"].to_numpy()) for t in edges] or [np.empty(0, np.int64)])
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    if nodes.size == 0:
        return nodes, nodes
    n = nodes.size
    graph = coo_matrix((np.ones(a.size, np.int8), (inverse[: a.size], inverse[a.size :])), shape=(n, n))
    _, label = scipy_components(graph, directed=False)
    smallest = np.full(label.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(smallest, label, nodes)  # nodes are sorted, so this is each component's first in job order
    return nodes, smallest[label]


class _KeptIndex:
    """Kept pHashes of one component, searched by exact lookups on radius + 1 chunks (pigeonhole)."""

    def __init__(self, radius: int) -> None:
        self.radius = radius
        bounds = np.linspace(0, 64, radius + 2).astype(int)
        self.chunks = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in itertools.pairwise(bounds)]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.chunks]
        self.values: list[int] = []

    def add(self, value: int) -> None:
        for table, (shift, mask) in zip(self.tables, self.chunks, strict=True):
            table.setdefault((value >> shift) & mask, []).append(len(self.values))
        self.values.append(value)

    def earliest_within(self, value: int) -> int | None:
        best = math.inf
        for table, (shift, mask) in zip(self.tables, self.chunks, strict=True):
            for pos in table.get((value >> shift) & mask, ()):
                if pos < best and (self.values[pos] ^ value).bit_count() <= self.radius:
                    best = pos
        return None if best == math.inf else int(best)


def resolve_components(t: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Image rows of the components of one partition (columns comp, order, key, content_hash, phash) ->
    decisions, by the single-pass rule replayed on each component's members in job order."""
    t = t.sort_by([("comp", "ascending"), ("order", "ascending")])
    comp, order = t["comp"].to_numpy(), t["order"].to_numpy()
    keys = t["key"].to_pylist()
    chash = pc.fill_null(t["content_hash"], _NULL_HASH).to_pylist()
    phash = [int(v) for v in t["phash"].to_numpy()]
    cuts = [0, *(np.flatnonzero(np.diff(comp)) + 1).tolist(), len(comp)]
    out_order: list[int] = []
    out_reason: list[str] = []
    out_dup: list[str] = []
    for lo, hi in itertools.pairwise(cuts):
        kept_by_hash: dict[str, int] = {}
        kept_rows: list[int] = []
        index = _KeptIndex(cfg.max_hamming)
        for i in range(lo, hi):
            if cfg.exact and chash[i] in kept_by_hash:
                reason, of = "duplicate_exact", kept_by_hash[chash[i]]
            else:
                pos = index.earliest_within(phash[i]) if cfg.near else None
                if pos is None:
                    kept_by_hash.setdefault(chash[i], i)
                    index.add(phash[i])
                    kept_rows.append(i)
                    continue
                reason, of = "duplicate_near", kept_rows[pos]
            out_order.append(int(order[i]))
            out_reason.append(reason)
            out_dup.append(keys[of])
    return pa.table({"order": out_order, "reason": out_reason, "dup_of": out_dup}, schema=DECISION_SCHEMA)
