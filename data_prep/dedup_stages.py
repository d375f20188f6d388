"""Global deduplication as Ray Data stages: where data_prep.dedup's per-partition functions run.

    candidates --groupby key--> key duplicates, survivors
    survivors (text)   --groupby content hash--> text duplicates
    survivors (images) --groupby content hash--> exact pairs       \\
                       --r+1 rows each, groupby (chunk, value)--> near pairs  --> components (one task)
    images on a pair --groupby component--> exact / near duplicates

Every grouping is a shuffle by a hash of the grouped value into about ``rows / rows_per_task`` partitions
(see ``partitions`` for the cap that keeps shuffle pieces out of the driver). The driver holds dataset
handles and counts, never rows; the only step that sees more than a partition is the component labelling,
a worker task over the duplicate pairs alone (16 bytes a pair). Nothing here starts or stops Ray.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.dedup import (
    DECISION_SCHEMA,
    DedupConfig,
    choose_levels,
    connected_components,
    exact_edges,
    explode_chunks,
    near_edges,
    resolve_components,
    split_key_duplicates,
    string_partition,
    text_duplicates,
    value_partition,
)

MIN_PIECE_BYTES = 256 * 1024
"""Smallest piece of a shuffle we plan for (see ``partitions``)."""
CHUNK_ROW_BYTES = 21
"""Bytes of one near-search row: chunk (1), order (8), pHash (8), partition (4)."""


def _with_part(t: pa.Table, column: str, parts: int) -> pa.Table:
    col = t[column]
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        part = string_partition(col, parts)
    else:
        part = value_partition(col.to_numpy(), parts)
    return t.append_column("part", pa.array(part, pa.int32()))


def _call_on_group(t: pa.Table, fn: Callable[..., pa.Table], kwargs: dict[str, Any]) -> pa.Table:
    return fn(t.drop_columns(["part"]), **kwargs)


def partitions(rows: int, nbytes: int, rows_per_task: int) -> int:
    """Hash partitions for ``rows`` rows of ``nbytes``: about ``rows_per_task`` rows each, but no more than
    sqrt(nbytes / MIN_PIECE_BYTES). A sort shuffle cuts each of P blocks into P pieces, and Ray keeps a task
    result under 100 KiB in its owner's memory -- the driver's: pieces that small would bring the whole
    shuffle through the driver (2 GB of it at 10M samples before this cap)."""
    want = math.ceil(rows / rows_per_task)
    cap = math.isqrt(nbytes // MIN_PIECE_BYTES)
    return max(1, min(want, cap))


def grouped(ds: Any, column: str, fn: Callable[..., pa.Table], rows_per_task: int, **kwargs: Any) -> Any:
    """``fn`` on every hash partition of the materialized ``ds`` by ``column`` (all rows of a value meet in
    one call)."""
    parts = partitions(ds.count(), ds.size_bytes(), rows_per_task)
    with_part = ds.map_batches(_with_part, batch_format="pyarrow", fn_kwargs={"column": column, "parts": parts})
    return _map_partitions(with_part, parts, _call_on_group, {"fn": fn, "kwargs": kwargs})


def _map_partitions(ds: Any, parts: int, udf: Callable[..., pa.Table], kwargs: dict[str, Any]) -> Any:
    # a sort-based shuffle makes as many partitions as its input has blocks (a hash shuffle takes the number):
    # ``parts`` blocks either way
    return (
        ds.repartition(parts)
        .groupby("part", num_partitions=parts)
        .map_groups(udf, batch_format="pyarrow", fn_kwargs=kwargs)
    )


def _dropped(t: pa.Table) -> pa.Table:
    t = t.filter(pc.is_valid(t["reason"]))
    return t.select(["order", "reason", "dup_of"]).cast(DECISION_SCHEMA)


def _survivors(t: pa.Table, text: bool) -> pa.Table:
    keep = pc.and_(pc.is_null(t["reason"]), t["participates"])
    keep = pc.and_(keep, pc.is_null(t["phash"]) if text else pc.is_valid(t["phash"]))
    return t.filter(keep).select(["order", "key", "content_hash", "phash"])


def _chunk_rows(t: pa.Table, radius: int, parts: int) -> pa.Table:
    return explode_chunks(t["order"].to_numpy(), t["phash"].to_numpy(), radius, parts)


def _near_group(t: pa.Table, radius: int, levels: int) -> pa.Table:
    return near_edges(t.drop_columns(["part"]), radius, levels)


def _components_task(*edges: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    return connected_components(list(edges))


def _attach_component(t: pa.Table, labels: Any) -> pa.Table:
    """Keep the images that are on a pair, with their component (labels: a ref to sorted nodes, components)."""
    import ray

    nodes, comp = ray.get(labels)
    order = t["order"].to_numpy()
    pos = np.minimum(np.searchsorted(nodes, order), max(len(nodes) - 1, 0))
    hit = nodes[pos] == order if len(nodes) else np.zeros(len(order), bool)
    return t.filter(pa.array(hit)).append_column("comp", pa.array(comp[pos[hit]], pa.int64()))


def dedup_decisions(candidates: Any, cfg: DedupConfig, rows_per_task: int) -> Any:
    """A dataset of candidates (dedup.CANDIDATE_SCHEMA, any order) -> a materialized dataset of decisions
    (dedup.DECISION_SCHEMA), one per dropped candidate. ``candidates`` must be materialized."""
    import ray

    if candidates.count() == 0:
        return ray.data.from_arrow(DECISION_SCHEMA.empty_table()).materialize()
    keyed = grouped(candidates, "key", split_key_duplicates, rows_per_task).materialize()
    outputs = [keyed.map_batches(_dropped, batch_format="pyarrow").materialize()]
    texts = keyed.map_batches(_survivors, batch_format="pyarrow", fn_kwargs={"text": True}).materialize()
    images = keyed.map_batches(_survivors, batch_format="pyarrow", fn_kwargs={"text": False}).materialize()
    del keyed  # its blocks leave the object store before the biggest shuffle (the near search) starts
    if cfg.text and texts.count():
        outputs.append(grouped(texts, "content_hash", text_duplicates, rows_per_task).materialize())
    del texts
    if (cfg.exact or cfg.near) and images.count() > 1:
        resolved = _image_decisions(images, cfg, rows_per_task)
        if resolved is not None:
            outputs.append(resolved)
    return (outputs[0].union(*outputs[1:]) if len(outputs) > 1 else outputs[0]).materialize()


def _image_decisions(images: Any, cfg: DedupConfig, rows_per_task: int) -> Any | None:
    """Exact and near pairs -> components -> the single-pass rule per component (None: no pair at all)."""
    import ray

    edge_sets = []
    if cfg.exact:
        edge_sets.append(grouped(images, "content_hash", exact_edges, rows_per_task))
    if cfg.near:
        r, n = cfg.max_hamming, images.count()
        parts = partitions(n * (r + 1), n * (r + 1) * CHUNK_ROW_BYTES, rows_per_task)
        rows = images.map_batches(_chunk_rows, batch_format="pyarrow", fn_kwargs={"radius": r, "parts": parts})
        levels = choose_levels(r, n)
        edge_sets.append(_map_partitions(rows, parts, _near_group, {"radius": r, "levels": levels}))
    edges = (edge_sets[0].union(*edge_sets[1:]) if len(edge_sets) > 1 else edge_sets[0]).materialize()
    if edges.count() == 0:
        return None
    labels = ray.remote(num_cpus=1)(_components_task).remote(*edges.to_arrow_refs())
    involved = images.map_batches(_attach_component, batch_format="pyarrow", fn_kwargs={"labels": labels})
    return grouped(involved.materialize(), "comp", resolve_components, rows_per_task, cfg=cfg)
