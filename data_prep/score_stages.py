"""Processing units with model scorers, as a chain of Ray Data stages:

    prepare (CPU tasks) -> [caption languages (CPU actors)] -> one actor-pool stage per scorer group
        (CPU or fractional-GPU actors, weights loaded once per actor) -> finish (CPU tasks: thresholds,
        encoding, the unit's staging file)

A row of these datasets is one whole unit: its prepared samples travel as an Arrow IPC stream in one binary
cell (``payload``), so no stage ever sees part of a unit however Ray Data cuts its blocks, and the finish
stage writes the same staging file as data_prep.process.process_unit would (plus scores and embeddings).
Images travel as their stored (normalised, encoded) bytes: the scorers see exactly the image the shard will
hold, and a unit costs its encoded size in the object store, not its decoded pixels.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from data_prep.captions import LANGUAGE_REASON, LanguageChecker
from data_prep.imaging import ImageConfig
from data_prep.process import (
    STAGING_SCHEMA,
    Candidate,
    finish_candidate,
    prepare_record,
    staging_path,
    unit_summary,
    write_staging,
)
from data_prep.readers import read_unit
from data_prep.schema import Turn
from data_prep.scorers import EMBEDDING, ScorerConfig, build_group, scorer_groups
from data_prep.sources import SourceConfig, Unit
from data_prep.validate import Fields

PAYLOAD_SCHEMA = pa.schema(
    [*STAGING_SCHEMA, pa.field("fields", pa.string()), pa.field("width", pa.int32()), pa.field("height", pa.int32())]
)
"""A prepared unit: staging columns (``image``: the stored bytes) plus, for candidates, their fields as JSON
and the stored image's size. Rejected rows already carry their reason."""


def encode_payload(rows: list[dict[str, Any]]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=PAYLOAD_SCHEMA)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, PAYLOAD_SCHEMA) as writer:
        writer.write_table(table)
    return sink.getvalue()


def decode_payload(data: bytes) -> list[dict[str, Any]]:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all().to_pylist()


def _fields_json(f: Fields) -> str:
    return json.dumps(dataclasses.asdict(f), sort_keys=True, ensure_ascii=False)


def _fields(text: str) -> Fields:
    obj = json.loads(text)
    obj["conversation"] = [Turn(**t) for t in obj["conversation"]]
    return Fields(**obj)


def prepare_unit(unit: Unit, src: SourceConfig, image_cfg: ImageConfig) -> tuple[bytes, dict[str, Any]]:
    """Read and prepare one unit: its payload and its summary (timings of this stage so far)."""
    start, cpu = time.perf_counter(), time.process_time()
    records = list(read_unit(unit, src))
    rows = []
    for pos, rec in enumerate(records):
        p = prepare_record(rec, src, image_cfg, unit.index, pos)
        if isinstance(p, Candidate):
            size = p.size or (None, None)
            p = {**p.row, "image": p.stored, "fields": _fields_json(p.fields), "width": size[0], "height": size[1]}
        rows.append(p)
    return encode_payload(rows), unit_summary(unit, src, records, start, cpu)


def _open(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def _pending(rows: list[dict[str, Any]], images: bool) -> list[int]:
    """Rows still candidates (no reason yet) and, when ``images``, with an image."""
    return [i for i, r in enumerate(rows) if r["reason"] is None and (not images or r["image"] is not None)]


def _add_time(summary: str, start: float, cpu: float) -> str:
    s = json.loads(summary)
    s["seconds"] += time.perf_counter() - start
    s["cpu_seconds"] += time.process_time() - cpu
    return json.dumps(s, sort_keys=True)


class ScorerStage:
    """Ray Data actor: one scorer group, loaded once; scores the candidates with images of each unit."""

    def __init__(self, group: list[ScorerConfig], keep_embedding: bool) -> None:
        self.scorer = build_group(group, keep_embedding)
        self.batch_size = group[0].batch_size

    def score_rows(self, rows: list[dict[str, Any]], source: str) -> None:
        todo = _pending(rows, images=True)
        # decode one batch at a time: a unit of 10k images would be gigabytes of pixels at once
        for lo in range(0, len(todo), self.batch_size):
            chunk = todo[lo : lo + self.batch_size]
            fields = [_fields(rows[i]["fields"]) for i in chunk]
            out = self.scorer.score_batch([_open(rows[i]["image"]) for i in chunk], [f.text for f in fields])
            for k, (i, f) in enumerate(zip(chunk, fields, strict=True)):
                for name, values in out.items():
                    if name == EMBEDDING:
                        rows[i]["embedding"] = values[k].tolist()
                    elif np.isfinite(values[k]):  # NaN: no score for this sample (a CLIP score needs a caption)
                        f.scores[name] = float(values[k])
                rows[i]["fields"] = _fields_json(f)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _map_payloads(batch, self.score_rows)


class LanguageStage:
    """Ray Data actor: the language identifier, loaded once; rejects captions in languages not allowed."""

    def __init__(self, sources: dict[str, SourceConfig]) -> None:
        self.sources = sources
        self.checker = LanguageChecker()

    def check_rows(self, rows: list[dict[str, Any]], source: str) -> None:
        todo = _pending(rows, images=False)
        details = self.checker.check([_fields(rows[j]["fields"]).text for j in todo], self.sources[source].filters)
        for j, detail in zip(todo, details, strict=True):
            if detail is not None:
                rows[j].update(reason=LANGUAGE_REASON, detail=detail, content_hash=None, phash=None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _map_payloads(batch, self.check_rows)


def _map_payloads(batch: dict[str, np.ndarray], fn: Any) -> dict[str, np.ndarray]:
    """``fn(rows, source)`` on every unit of a batch, in place; the stage's time is added to the summary."""
    payloads, summaries = [], []
    for unit, data, summary in zip(batch["unit"], batch["payload"], batch["summary"], strict=True):
        start, cpu = time.perf_counter(), time.process_time()
        rows = decode_payload(data)
        fn(rows, Unit.from_json(str(unit)).source)
        payloads.append(encode_payload(rows))
        summaries.append(_add_time(str(summary), start, cpu))
    return {**batch, "payload": np.array(payloads, dtype=object), "summary": np.array(summaries, dtype=object)}


def finish_rows(rows: list[dict[str, Any]], src: SourceConfig) -> list[dict[str, Any]]:
    """Prepared rows -> staging rows: thresholds on every score, then encoding (data_prep.process)."""
    out = []
    for r in rows:
        if r["reason"] is not None:
            out.append({k: r[k] for k in STAGING_SCHEMA.names})
            continue
        staged = {k: r[k] for k in STAGING_SCHEMA.names}
        size = (r["width"], r["height"]) if r["width"] is not None else None
        cand = Candidate(staged, _fields(r["fields"]), None, r["image"], size)
        row = finish_candidate(cand, src)
        if row["reason"] is not None:
            row["embedding"] = None
        out.append(row)
    return out


def finish_unit(unit: Unit, src: SourceConfig, payload: bytes, summary: str, work_dir: str) -> dict[str, Any]:
    start, cpu = time.perf_counter(), time.process_time()
    rows = finish_rows(decode_payload(payload), src)
    final = json.loads(_add_time(summary, start, cpu))
    write_staging(staging_path(work_dir, src.name, unit.index), rows, final)
    return {**final, "skipped": False}


def scoring_chain(
    ds: Any, scorers: Sequence[ScorerConfig], embedding_scorer: str, sources: dict[str, SourceConfig], actors: int
) -> Any:
    """The language stage (when a source checks languages) and one actor-pool stage per scorer group,
    appended to a dataset of prepared units."""
    if any(s.filters.languages for s in sources.values()):
        kwargs = {"sources": sources}
        ds = ds.map_batches(LanguageStage, batch_size=1, fn_constructor_kwargs=kwargs, concurrency=actors, num_cpus=1)
    for group in scorer_groups(scorers):
        head = group[0]
        ds = ds.map_batches(
            ScorerStage,
            batch_size=1,
            fn_constructor_kwargs={"group": group, "keep_embedding": head.name == embedding_scorer},
            concurrency=head.actors or actors,
            num_cpus=head.num_cpus,
            num_gpus=head.num_gpus or None,
        )
    return ds
