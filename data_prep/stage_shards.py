"""Write a stage's shards from its plan, and the stage manifest with target and realised ratios.

Samples keep the schema: the mixer only changes ``meta.task`` (a source used as another task, e.g. caption ->
t2i), the key (suffixed so that a repeated or re-tasked sample stays unique) and, for the chosen fraction of
generation prompts, the text (first sentence only). Everything is a function of the plan, so the bytes are
reproducible.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from common.io import file_sha256
from data_prep.manifests import MANIFEST_NAME, StageManifest, StageShard
from data_prep.ratio_schedule import stable_int
from data_prep.schema import GENERATION_TASKS, KEY_FIELD, decode_sample, encode_sample
from data_prep.shards import TarShardWriter, shard_name
from data_prep.stage_plan import SourceEntry, StagePlan

MAX_OPEN_FILES = 64
"""Source tars a reader keeps open at once."""
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def first_sentence(text: str) -> str:
    """The text up to and including its first sentence end (the whole text when it has one sentence)."""
    match = _SENTENCE_END.search(text.strip())
    return text.strip()[: match.end()] if match else text


def truncation_chosen(seed: int, key: str, fraction: float) -> bool:
    """Deterministic per-sample choice with probability ``fraction``."""
    return fraction > 0 and stable_int("caption", seed, key) / 2**63 < fraction


class SourceReader:
    """Raw records of curated samples by index, reading only their bytes from the tars."""

    def __init__(self, sources: dict[str, SourceEntry]) -> None:
        self.sources = sources
        self._files: dict[Path, BinaryIO] = {}

    def record(self, source: str, index: int) -> dict[str, Any]:
        entry = self.sources[source]
        shard, members = entry.members[index]
        path = entry.shards[shard]
        fh = self._files.get(path)
        if fh is None:
            if len(self._files) >= MAX_OPEN_FILES:  # oldest first (dicts keep insertion order)
                self._files.pop(next(iter(self._files))).close()
            fh = self._files[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
        out: dict[str, Any] = {KEY_FIELD: entry.keys[index]}
        for ext, offset, size in members:
            fh.seek(offset)
            out[ext] = fh.read(size)
        return out

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


def mix_record(
    record: dict[str, Any], *, task: str, epoch: int, seed: int, caption_fraction: float
) -> tuple[dict[str, Any], bool, bool]:
    """A curated record as it goes into a stage shard; also whether its prompt was chosen for the
    first-sentence treatment and whether that changed it."""
    sample = decode_sample(record)
    key = sample.key
    if task != sample.meta.task:
        key = f"{key}-{task}"
        sample.meta.task = task
    if epoch:
        key = f"{key}-r{epoch}"
    sample.key = key
    chosen = bool(task in GENERATION_TASKS and sample.text and truncation_chosen(seed, key, caption_fraction))
    cut = False
    if chosen and sample.text:
        short = first_sentence(sample.text)
        cut = short != sample.text
        sample.text = short
    return encode_sample(sample), chosen, cut


def write_shard(plan: StagePlan, reader: SourceReader, out_dir: Path, s: int, caption_fraction: float) -> dict:
    """Write shard s of the plan; returns its counts (per group, per source) and first-sentence tallies."""
    slots = plan.shard_slots(s)
    source_counts = [np.zeros(len(g.sources), dtype=np.int64) for g in plan.groups]
    cut = chosen = 0
    with TarShardWriter(out_dir / shard_name(plan.name, s)) as writer:
        for g, src, idx, epoch in zip(
            *(slots[k].tolist() for k in ("group", "source", "sample", "epoch")), strict=True
        ):
            gp = plan.groups[g]
            mixed, was_chosen, was_cut = mix_record(
                reader.record(gp.sources[src], idx),
                task=gp.use_as[src],
                epoch=epoch,
                seed=plan.seed,
                caption_fraction=caption_fraction,
            )
            writer.write(mixed)
            cut += was_cut
            chosen += was_chosen
            source_counts[g][src] += 1
    return {
        "groups": np.bincount(slots["group"], minlength=len(plan.groups)),
        "sources": source_counts,
        "cut": cut,
        "chosen": chosen,
    }


def write_shard_range(
    plan: StagePlan, sources: dict[str, SourceEntry], out_dir: Path, shards: list[int], caption_fraction: float
) -> list[dict]:
    """Write several shards with one reader (the unit of work of a writer task)."""
    reader = SourceReader(sources)
    try:
        return [write_shard(plan, reader, out_dir, s, caption_fraction) for s in shards]
    finally:
        reader.close()


def write_stage_shards(
    plan: StagePlan, sources: dict[str, SourceEntry], out_dir: Path, caption_fraction: float, workers: int = 1
) -> dict:
    """Write every shard of the plan under ``out_dir``; returns the counts the manifest reports.

    Shards are independent given the plan, so ``workers > 1`` writes them as Ray tasks (contiguous ranges);
    the bytes do not depend on the number of workers.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [shard_name(plan.name, s) for s in range(plan.num_shards)]
    for stale in out_dir.glob(f"{plan.name}-*.tar"):
        if stale.name not in names:
            stale.unlink()
    ranges = [r.tolist() for r in np.array_split(np.arange(plan.num_shards), max(1, min(workers, len(names))))]
    if workers > 1:
        import ray

        # SPREAD: one writer per node where it can (each node's CPU and link to the shared store do their share);
        # the default policy keeps tasks on the driver's node while it has a free CPU, so short writers there
        # could all finish on one node.
        task = ray.remote(scheduling_strategy="SPREAD")(write_shard_range)
        plan_ref, sources_ref = ray.put(plan), ray.put(sources)
        results = ray.get([task.remote(plan_ref, sources_ref, out_dir, r, caption_fraction) for r in ranges])
    else:
        results = [write_shard_range(plan, sources, out_dir, r, caption_fraction) for r in ranges]
    per_shard = [x for chunk in results for x in chunk]
    source_counts = [
        sum((x["sources"][g] for x in per_shard), np.zeros(len(gp.sources), np.int64))
        for g, gp in enumerate(plan.groups)
    ]
    return {
        "names": names,
        "shard_counts": np.stack([x["groups"] for x in per_shard]),
        "source_counts": source_counts,
        # each pass over a source is a permutation, so the first min(count, size) draws are all distinct
        "distinct": [np.minimum(c, gp.available).tolist() for c, gp in zip(source_counts, plan.groups, strict=True)],
        "caption_cut": sum(x["cut"] for x in per_shard),
        "caption_chosen": sum(x["chosen"] for x in per_shard),
    }


def _ratios(counts: np.ndarray, groups: list[str]) -> dict[str, float]:
    total = max(int(counts.sum()), 1)
    return {g: round(float(c) / total, 6) for g, c in zip(groups, counts, strict=True)}


def build_manifest(
    plan: StagePlan,
    written: dict,
    sources: dict[str, SourceEntry],
    *,
    recipe: str,
    config_hash: str,
    samples_per_shard: int,
    caption_fraction: float = 0.0,
) -> StageManifest:
    """The stage manifest (shard sizes and hashes are added by :func:`finalize_manifest`)."""
    groups = [g.name for g in plan.groups]
    sched, index = plan.index.sched, plan.index
    targets = sched.targets(index.bounds)
    shard_targets = np.diff(targets, axis=0)
    dev = np.abs(written["shard_counts"] - shard_targets)
    worst = int(dev.max(axis=1).argmax())
    total_target = targets[-1]
    out_groups = {}
    for gi, gp in enumerate(plan.groups):
        srcs = {}
        for si, s in enumerate(gp.sources):
            count = int(written["source_counts"][gi][si])
            srcs[s] = {
                "weight": float(gp.pattern.weights[si]),
                "use_as": gp.use_as[si],
                "available": int(gp.available[si]),
                "count": count,
                "distinct_used": int(written["distinct"][gi][si]),
                "repeat_factor": round(count / int(gp.available[si]), 6),
                "manifest_sha256": sources[s].manifest_sha256,
            }
        out_groups[gp.name] = {
            "target_ratio": round(float(total_target[gi] / sched.total), 6),
            "realised_ratio": round(float(index.counts[-1, gi] / sched.total), 6),
            "target_count": round(float(total_target[gi]), 6),
            "count": int(index.counts[-1, gi]),
            "worst_shard_deviation": round(float(dev[:, gi].max()), 6),
            "sources": srcs,
        }
    phases = []
    for p, (ratios, start) in enumerate(zip(plan.phase_ratios, sched.starts.tolist(), strict=True)):
        end = start + plan.phase_lengths[p]
        realised = index.counts_at(end) - index.counts_at(start)
        phases.append(
            {
                "start": start,
                "end": end,
                "target_ratios": _ratios(np.array(ratios), groups),
                "realised_ratios": _ratios(realised, groups),
            }
        )
    return StageManifest(
        recipe=recipe,
        config_hash=config_hash,
        samples_per_shard=samples_per_shard,
        stage=plan.name,
        seed=plan.seed,
        samples=sched.total,
        shuffle_window=plan.window,
        groups=out_groups,
        phases=phases,
        target_ratios=_ratios(total_target, groups),
        realised_ratios=_ratios(index.counts[-1], groups),
        worst_shard={
            "name": written["names"][worst],
            "max_deviation": round(float(dev[worst].max()), 6),
            "target_counts": [round(float(t), 6) for t in shard_targets[worst]],
            "counts": written["shard_counts"][worst].tolist(),
            "realised_ratios": _ratios(written["shard_counts"][worst], groups),
        },
        caption_first_sentence={
            "chosen": int(written["caption_chosen"]),
            "truncated": int(written["caption_cut"]),
            "fraction": caption_fraction,
        },
        source_manifests={s: sources[s].manifest_sha256 for gp in plan.groups for s in gp.sources},
        shards=[
            StageShard(name=n, samples=int(c.sum()), counts=dict(zip(groups, c.tolist(), strict=True)))
            for n, c in zip(written["names"], written["shard_counts"], strict=True)
        ],
    )


def finalize_manifest(stage_dir: Path, manifest: StageManifest) -> StageManifest:
    """Add each shard's bytes and sha256 (after any precompute rewrote them) and write manifest.json (atomic,
    last: its presence says the stage is complete)."""
    shards = []
    for shard in manifest.shards:
        path = stage_dir / shard.name
        shards.append(dataclasses.replace(shard, bytes=path.stat().st_size, sha256=file_sha256(path)))
    manifest = dataclasses.replace(manifest, shards=shards)
    manifest.write(stage_dir / MANIFEST_NAME)
    return manifest


ShardHook = Callable[[Path, list[str]], dict]
"""Optional step over a stage's written shards (the VQ/VAE precompute); returns what the manifest records."""
