"""Stage mixtures: recipe configs, curated-source access and the plan of which sample fills each slot.

A stage's plan is pure and cheap: :class:`data_prep.ratio_schedule.BlendIndex` says which group fills each slot (exact
ratios at every prefix and in every shard); inside a group a periodic source pattern says which source serves
each draw, shuffled inside bounded windows of the group's draws; a source's draws walk through seeded
permutations of its samples, one per pass (so a source smaller than its quota repeats, a larger one is
subsampled). Writing the shards lives in :mod:`data_prep.stage_shards`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.io import file_sha256
from data_prep.manifests import MANIFEST_NAME, CuratedManifest
from data_prep.ratio_schedule import (
    BlendIndex,
    SourcePattern,
    build_schedule,
    build_source_pattern,
    sample_permutation,
    stable_int,
    window_permute,
)
from data_prep.schema import GENERATION_TASKS, TASKS, TEXT_TASKS, UNDERSTANDING_TASKS

log = logging.getLogger(__name__)

GROUP_TASKS: dict[str, frozenset[str]] = {
    "understanding": UNDERSTANDING_TASKS,
    "generation": GENERATION_TASKS,
    "text": TEXT_TASKS,
}
"""Task groups a recipe may name, and the sample tasks each accepts."""


@dataclass(kw_only=True)
class MixSourceConfig:
    weight: float = 1.0
    """Share of this source inside its group, relative to the group's other sources."""
    use_as: str | None = None
    """Task the samples carry in this mixture (t2i: a caption source as dense-caption text-to-image)."""
    path: str | None = None
    """Curated source directory (holding manifest.json); default {curated_dir}/{source name}."""

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"source weight must be positive, got {self.weight}")
        if self.use_as is not None and self.use_as not in TASKS:
            raise ValueError(f"source use_as {self.use_as!r} is not one of {TASKS}")


@dataclass(kw_only=True)
class GroupConfig:
    ratio: float | None = None
    """Share of the group in the stage, relative to the other groups (set per phase instead when phased)."""
    sources: dict[str, MixSourceConfig] = field(default_factory=dict)
    """Curated sources feeding the group, by name."""

    def __post_init__(self) -> None:
        if self.ratio is not None and self.ratio < 0:
            raise ValueError(f"group ratio must be >= 0, got {self.ratio}")


@dataclass(kw_only=True)
class PhaseConfig:
    ratios: dict[str, float] = field(default_factory=dict)
    """Group ratios during the phase, naming every group of the stage."""
    steps: int | None = None
    """Phase length in optimizer steps (x the stage's global_batch); both lengths unset: the rest of the stage."""
    samples: int | None = None
    """Phase length in samples."""

    def __post_init__(self) -> None:
        if self.steps is not None and self.samples is not None:
            raise ValueError("a phase gives steps or samples, not both")
        if any(v < 0 for v in self.ratios.values()):
            raise ValueError(f"phase ratios must be >= 0, got {self.ratios}")


@dataclass(kw_only=True)
class StageMixConfig:
    groups: dict[str, GroupConfig] = field(default_factory=dict)
    """Task groups by name (understanding, generation, text) with their ratio and sources."""
    samples: int | None = None
    """Samples in the stage; default steps x global_batch."""
    steps: int | None = None
    """Optimizer steps of the stage (with global_batch, gives samples)."""
    global_batch: int | None = None
    """Samples per optimizer step."""
    phases: list[PhaseConfig] = field(default_factory=list)
    """Ratio phases in order (e.g. JanusFlow stage II: 30:50:20 for 10K steps, then 14:80:6)."""
    seed: int | None = None
    """Seed of this stage; default derived from the mixture seed and the stage name."""
    caption_first_sentence: float = 0.0
    """Fraction of generation prompts truncated to their first sentence (Janus: 0.25)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.groups) - set(GROUP_TASKS))
        if unknown:
            raise ValueError(f"stage groups {unknown} are not among {sorted(GROUP_TASKS)}")
        if not 0.0 <= self.caption_first_sentence <= 1.0:
            raise ValueError(f"caption_first_sentence must be in [0, 1], got {self.caption_first_sentence}")
        if self.samples is None and (self.steps is None or self.global_batch is None):
            raise ValueError("a stage needs samples, or steps and global_batch")
        if self.num_samples <= 0:
            raise ValueError(f"a stage needs a positive number of samples, got {self.num_samples}")
        for name, group in self.groups.items():
            if group.ratio is None and not self.phases:
                raise ValueError(f"group {name!r} needs a ratio (or give the stage phases)")
            if group.ratio is not None and self.phases:
                raise ValueError(f"group {name!r}: with phases, give ratios per phase, not group.ratio")
        for i, phase in enumerate(self.phases):
            if set(phase.ratios) != set(self.groups):
                raise ValueError(
                    f"phase {i} ratios name {sorted(phase.ratios)}, the stage's groups are {sorted(self.groups)}"
                )
            if phase.steps is not None and self.global_batch is None:
                raise ValueError(f"phase {i} gives steps but the stage has no global_batch")

    @property
    def num_samples(self) -> int:
        if self.samples is not None:
            return self.samples
        return int(self.steps or 0) * int(self.global_batch or 0)


def phase_plan(stage: StageMixConfig, groups: list[str]) -> tuple[list[list[float]], list[int]]:
    """(ratios per phase in ``groups`` order, length per phase); one phase when the stage has none."""
    total = stage.num_samples
    if not stage.phases:
        return [[float(stage.groups[g].ratio or 0.0) for g in groups]], [total]
    ratios, lengths = [], []
    for i, phase in enumerate(stage.phases):
        if phase.samples is not None:
            n = phase.samples
        elif phase.steps is not None:
            n = phase.steps * int(stage.global_batch or 0)
        elif i == len(stage.phases) - 1:
            n = total - sum(lengths)
        else:
            raise ValueError(f"phase {i} needs a length (only the last phase may run to the end)")
        ratios.append([float(phase.ratios[g]) for g in groups])
        lengths.append(n)
    if sum(lengths) != total or any(n <= 0 for n in lengths):
        raise ValueError(f"phase lengths {lengths} must be positive and sum to the stage's {total} samples")
    return ratios, lengths


def active_groups(stage: StageMixConfig) -> list[str]:
    """Groups with a positive ratio somewhere in the stage, in recipe order (ratio 0 = absent)."""
    if stage.phases:
        return [g for g in stage.groups if any(p.ratios[g] > 0 for p in stage.phases)]
    return [g for g, cfg in stage.groups.items() if (cfg.ratio or 0) > 0]


@dataclass
class SourceEntry:
    """One curated source: its manifest and where each of its samples sits in its tars."""

    name: str
    task: str
    directory: Path
    manifest_sha256: str
    shards: list[Path]
    members: list[tuple[int, list[tuple[str, int, int]]]]
    """Per sample: (shard index, [(extension, data offset, size)]) in shard order then tar order."""
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def load_source(name: str, directory: str | Path) -> SourceEntry:
    """Read a curated source's manifest and index its tars (member offsets, no payload reads)."""
    import tarfile

    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"source {name!r}: no {MANIFEST_NAME} in {directory} (run pipelines.curate)")
    manifest = CuratedManifest.read(manifest_path)
    shards = [directory / s.name for s in manifest.shards]
    members: list[tuple[int, list[tuple[str, int, int]]]] = []
    keys: list[str] = []
    for si, shard in enumerate(shards):
        with tarfile.open(shard, "r") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, ext = info.name.rsplit("/", 1)[-1].partition(".")
                if not keys or keys[-1] != key or members[-1][0] != si:
                    keys.append(key)
                    members.append((si, []))
                members[-1][1].append((ext, info.offset_data, info.size))
    if manifest.kept != len(keys):
        raise ValueError(f"source {name!r}: manifest says {manifest.kept} samples, its tars hold {len(keys)}")
    if not keys:
        raise ValueError(f"source {name!r} in {directory} has no samples")
    return SourceEntry(
        name=name,
        task=manifest.task,
        directory=directory,
        manifest_sha256=file_sha256(manifest_path),
        shards=shards,
        members=members,
        keys=keys,
    )


@dataclass
class GroupPlan:
    name: str
    sources: list[str]
    """Source names in recipe order."""
    use_as: list[str]
    """Task each source's samples carry in this stage."""
    pattern: SourcePattern
    total: int
    """Draws of the group in the whole stage."""
    quotas: np.ndarray
    """(S,) draws of each source in the whole stage."""
    available: np.ndarray
    """(S,) samples each source holds."""


@dataclass
class StagePlan:
    """Everything needed to say which sample fills each slot of a stage, shard by shard."""

    name: str
    seed: int
    groups: list[GroupPlan]
    index: BlendIndex
    phase_ratios: list[list[float]]
    phase_lengths: list[int]
    window: int

    @property
    def num_shards(self) -> int:
        return self.index.num_shards

    def shard_slots(self, s: int) -> dict[str, np.ndarray]:
        """Shard s as arrays: group, source (index in its group), sample (index in its source), epoch."""
        groups = self.index.shard_groups(s).astype(np.int64)
        n = len(groups)
        out = {k: np.zeros(n, dtype=np.int64) for k in ("group", "source", "sample", "epoch")}
        out["group"] = groups
        for gi, gp in enumerate(self.groups):
            slots = np.flatnonzero(groups == gi)
            if len(slots) == 0:
                continue
            j = self.index.counts[s, gi] + np.arange(len(slots))
            draw = window_permute(j, gp.total, self.window, [self.seed, 1, gi])
            src, ordinal = gp.pattern.draws(draw)
            for si in np.unique(src):
                sel = src == si
                size = int(gp.available[si])
                epoch, pos = np.divmod(ordinal[sel], size)
                sample = np.empty_like(pos)
                for e in np.unique(epoch):
                    perm = sample_permutation(size, int(e), [self.seed, 2, stable_int(gp.sources[si])])
                    sample[epoch == e] = perm[pos[epoch == e]]
                out["source"][slots[sel]] = si
                out["sample"][slots[sel]] = sample
                out["epoch"][slots[sel]] = epoch
        return out


def stage_seed(mix_seed: int, stage_name: str, stage: StageMixConfig) -> int:
    return stage.seed if stage.seed is not None else stable_int("stage", mix_seed, stage_name) % (2**31)


def check_source_task(group: str, source: SourceEntry, use_as: str | None) -> str:
    """The task the source's samples carry in this group; an error when it does not belong there."""
    task = use_as or source.task
    if task not in GROUP_TASKS[group]:
        raise ValueError(
            f"source {source.name!r} (task {source.task!r}, use_as {use_as!r}) cannot feed group "
            f"{group!r}, which takes {sorted(GROUP_TASKS[group])}"
        )
    return task


def build_stage_plan(
    name: str,
    stage: StageMixConfig,
    sources: dict[str, SourceEntry],
    *,
    samples_per_shard: int,
    window: int,
    mix_seed: int,
) -> StagePlan:
    """The plan of one stage over already-loaded sources (``sources`` keyed by name)."""
    groups = active_groups(stage)
    if not groups:
        raise ValueError(f"stage {name!r} has no group with a positive ratio")
    ratios, lengths = phase_plan(stage, groups)
    index = BlendIndex(build_schedule(ratios, lengths, stage.num_samples), samples_per_shard)
    seed = stage_seed(mix_seed, name, stage)
    plans = []
    for gi, g in enumerate(groups):
        cfg = stage.groups[g]
        if not cfg.sources:
            raise ValueError(f"stage {name!r}: group {g!r} has a positive ratio but no sources")
        names = list(cfg.sources)
        use_as = [check_source_task(g, sources[s], cfg.sources[s].use_as) for s in names]
        pattern = build_source_pattern([cfg.sources[s].weight for s in names])
        total = int(index.counts[-1, gi])
        quotas = pattern.quotas(total)
        available = np.array([len(sources[s]) for s in names], dtype=np.int64)
        for s, q, a in zip(names, quotas, available, strict=True):
            if q > a:
                log.warning(
                    "stage %s, group %s: source %s holds %d samples for a quota of %d: repeated x%.2f",
                    name,
                    g,
                    s,
                    a,
                    q,
                    q / a,
                )
        plans.append(GroupPlan(g, names, use_as, pattern, total, quotas, available))
    return StagePlan(name, seed, plans, index, ratios, lengths, window)
