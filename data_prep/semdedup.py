"""Semantic deduplication (SemDeDup, as NeMo Curator runs it) on the CLIP image embeddings of the scorers.

    images kept by exact / near dedup, with an embedding (per unit: staging file minus its decisions)
      -> a seeded sample -> k-means fit (one worker task)            -> centroids (an object ref)
      -> nearest centroid per image (map tasks)                      -> cluster ids
      -> groupby cluster: in job order, an image whose cosine similarity to an earlier *kept* image of its
         cluster is >= threshold is dropped as ``duplicate_semantic`` of the earliest such image (parallel tasks)

What the driver holds: dataset handles and counts. Decisions depend only on the data, the config and the
seed, never on how Ray cuts blocks: the fit sample is chosen by a hash of each image's job order, the fit
input is sorted by job order, the k-means fit runs single-threaded (scikit-learn's multi-threaded Lloyd step
adds chunk sums in whatever order threads finish, see its _k_means_lloyd.pyx), and similarities are computed
in float64 per cluster in job order.

Why scikit-learn and not faiss: it is already a dependency (no new native wheel, none per CUDA version), its
KMeans is exact Lloyd with k-means++ seeding and a ``random_state``, and the fit sees a bounded sample
(``fit_samples``), so its cost does not grow with the corpus; the work that does grow (assignment and the
within-cluster comparisons) is plain matrix products in parallel Ray tasks.

Like SemDeDup, two copies that k-means puts in different clusters are not compared: fewer, larger clusters
catch more and cost more (the comparisons of a cluster grow with its size times its kept images).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.dedup import DECISION_SCHEMA, SemanticConfig, _mix64

REASON = "duplicate_semantic"
CLUSTER_SIZE = 1000
"""Candidates per cluster when semantic.clusters is 0."""
SEMANTIC_SCHEMA = pa.schema([("order", pa.int64()), ("key", pa.string()), ("embedding", pa.list_(pa.float32()))])
"""One image semantic dedup compares: its job order, key and embedding."""
BLOCK = 256
"""Rows of a cluster compared at once against the kept images (bounds a task's memory)."""


@dataclass(kw_only=True)
class EmbeddingsConfig:
    scorer: str = ""
    """The clip scorer whose L2-normalised image embeddings are kept ('' keeps none)."""
    write: bool = False
    """Write {source}-NNNNNN.embeddings.parquet (key, embedding) beside each shard, in the tar's order."""


def embedding_matrix(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<float32> column without nulls -> float32 [n, d]."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(n, -1) if n else np.empty((0, 0), np.float32)


def unit_semantic_candidates(staging: str, decisions: str | None, gid: int, shift: int) -> pa.Table:
    """One unit's images that take part: candidates with an embedding, not dropped by earlier dedup steps.
    Columns order, key, embedding."""
    t = pq.read_table(staging, columns=["pos", "key", "reason", "phash", "embedding"])
    t = t.filter(pc.and_(pc.and_(pc.is_null(t["reason"]), pc.is_valid(t["phash"])), pc.is_valid(t["embedding"])))
    order = (np.int64(gid) << np.int64(shift)) | t["pos"].to_numpy().astype(np.int64)
    if decisions is not None:
        dropped = pq.read_table(decisions, columns=["order"])["order"].to_numpy()
        keep = ~np.isin(order, dropped)
        t, order = t.filter(pa.array(keep)), order[keep]
    return pa.table({"order": order, "key": t["key"], "embedding": t["embedding"]}, schema=SEMANTIC_SCHEMA)


def in_fit_sample(order: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each image is in the k-means fit sample: a seeded hash of its job order, so the sample is
    the same however the rows are split into blocks."""
    if fraction >= 1.0:
        return np.ones(len(order), bool)
    with np.errstate(over="ignore"):
        h = _mix64(order.astype(np.uint64) ^ _mix64(np.array([seed], np.uint64))[0])
    return h < np.uint64(int(fraction * 2.0**64))


def n_clusters(cfg: SemanticConfig, candidates: int, fitted_on: int) -> int:
    want = cfg.clusters or math.ceil(candidates / CLUSTER_SIZE)
    return max(1, min(want, fitted_on))


def fit_centroids(k: int, cfg: SemanticConfig, *tables: pa.Table) -> np.ndarray:
    """k-means on the sample (tables of order, embedding; any order) -> float64 centroids [k, d]."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    t = pa.concat_tables(tables).sort_by("order")
    x = embedding_matrix(t["embedding"])
    k = max(1, min(k, len(x)))
    with threadpool_limits(limits=1):  # bit-identical fits: see the module docstring
        km = KMeans(n_clusters=k, n_init=1, max_iter=cfg.max_iter, random_state=cfg.seed).fit(x)
    return km.cluster_centers_.astype(np.float64)


def assign_clusters(emb: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (Euclidean, as the fit) per row; ties go to the lowest index."""
    x = emb.astype(np.float64)
    dist = (centroids * centroids).sum(1)[None, :] - 2.0 * (x @ centroids.T)
    return np.argmin(dist, axis=1).astype(np.int64)


def resolve_cluster(emb: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one cluster in job order -> (dropped rows, the row each one duplicates): the single-pass rule,
    only kept rows standing for others, compared BLOCK rows at a time."""
    x = emb.astype(np.float64)
    kept: list[int] = []
    dropped: list[int] = []
    of: list[int] = []
    for lo in range(0, len(x), BLOCK):
        block = x[lo : lo + BLOCK]
        earlier = np.array(kept, dtype=np.int64)
        hit_prev = (block @ x[earlier].T) >= threshold if len(earlier) else np.zeros((len(block), 0), bool)
        inner = block @ block.T
        block_kept: list[int] = []
        for i in range(len(block)):
            if hit_prev.shape[1] and hit_prev[i].any():  # earlier blocks' kept rows are the earliest
                dropped.append(lo + i)
                of.append(int(earlier[np.argmax(hit_prev[i])]))
                continue
            hits = [j for j in block_kept if inner[i, j - lo] >= threshold]
            if hits:
                dropped.append(lo + i)
                of.append(hits[0])
            else:
                block_kept.append(lo + i)
        kept.extend(block_kept)
    return np.array(dropped, dtype=np.int64), np.array(of, dtype=np.int64)


def semantic_duplicates(t: pa.Table, threshold: float) -> pa.Table:
    """Rows of the clusters of one partition (cluster, order, key, embedding) -> decisions."""
    t = t.sort_by([("cluster", "ascending"), ("order", "ascending")])
    cluster = t["cluster"].to_numpy()
    order = t["order"].to_numpy()
    keys = t["key"].to_numpy(zero_copy_only=False)
    emb = embedding_matrix(t["embedding"])
    cuts = [0, *(np.flatnonzero(np.diff(cluster)) + 1).tolist(), len(cluster)]
    out_order, out_dup = [], []
    for lo, hi in itertools.pairwise(cuts):
        dropped, of = resolve_cluster(emb[lo:hi], threshold)
        out_order.append(order[lo:hi][dropped])
        out_dup.append(keys[lo:hi][of])
    orders = np.concatenate(out_order) if out_order else np.empty(0, np.int64)
    dups = np.concatenate(out_dup) if out_dup else np.empty(0, object)
    return pa.table(
        {"order": orders, "reason": pa.array([REASON] * len(orders), pa.string()), "dup_of": pa.array(dups.tolist())},
        schema=DECISION_SCHEMA,
    )


def _sample(t: pa.Table, fraction: float, seed: int) -> pa.Table:
    mask = in_fit_sample(t["order"].to_numpy(), fraction, seed)
    return t.filter(pa.array(mask)).select(["order", "embedding"])


def _with_cluster(t: pa.Table, centroids: Any) -> pa.Table:
    import ray

    c = ray.get(centroids)
    return t.append_column("cluster", pa.array(assign_clusters(embedding_matrix(t["embedding"]), c), pa.int64()))


def semantic_decisions(candidates: Any, cfg: SemanticConfig, rows_per_task: int) -> Any:
    """A materialized dataset of semantic candidates (order, key, embedding) -> a materialized dataset of
    decisions (dedup.DECISION_SCHEMA)."""
    import ray

    from data_prep.dedup_stages import grouped

    n = candidates.count()
    if n < 2:
        return ray.data.from_arrow(DECISION_SCHEMA.empty_table()).materialize()
    fraction = min(1.0, cfg.fit_samples / n)
    sample = candidates.map_batches(_sample, batch_format="pyarrow", fn_kwargs={"fraction": fraction, "seed": cfg.seed})
    sample = sample.materialize()
    k = n_clusters(cfg, n, sample.count())
    centroids = ray.remote(num_cpus=1)(fit_centroids).remote(k, cfg, *sample.to_arrow_refs())
    del sample
    clustered = candidates.map_batches(_with_cluster, batch_format="pyarrow", fn_kwargs={"centroids": centroids})
    return grouped(clustered.materialize(), "cluster", semantic_duplicates, rows_per_task, threshold=cfg.threshold)
