"""A mix recipe's stages: its config, and building one stage (plan, shards, optional precompute, manifest).

The job (pipelines.mix) loops over the recipe's stages and records them; what a stage holds is decided here and
in data_prep.stage_plan (the plan) and data_prep.stage_shards (the bytes and the stage manifest,
data_prep.manifests.StageManifest).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.config import config_hash
from common.tracking import TrackingConfig
from data_prep.manifests import StageManifest
from data_prep.precompute import PrecomputeConfig, precompute_config_encoder, run_precompute
from data_prep.stage_plan import SourceEntry, StageMixConfig, build_stage_plan
from data_prep.stage_shards import build_manifest, finalize_manifest, write_stage_shards


@dataclass(kw_only=True)
class MixConfig:
    recipe: str = ""
    """Name of the mixture; stage shards go to {out_dir}/{recipe}/{stage}/."""
    curated_dir: str = "outputs/curated"
    """Directory of curated sources ({curated_dir}/{source}/manifest.json), unless a source gives its path."""
    out_dir: str = "outputs/stages"
    """Root of the stage shards."""
    samples_per_shard: int = 1000
    """Samples in every stage shard (the last may be short)."""
    shuffle_window: int = 1000
    """Draws of a group shuffled together (bounded, deterministic); 1 keeps the blend order."""
    seed: int = 0
    """Mixture seed; each stage derives its own unless it gives one."""
    stages: dict[str, StageMixConfig] = field(default_factory=dict)
    """Training stages in order, by name."""
    write_workers: int = 1
    """Ray tasks writing a stage's shards in parallel (1: in this process, no Ray); bytes do not change."""
    only: list[str] = field(default_factory=list)
    """Write only these stages (default: all)."""
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    """Optional VQ-id / VAE-latent precompute of the generation samples."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Where the "mix" run is recorded."""

    def __post_init__(self) -> None:
        if not self.recipe or "/" in self.recipe:
            raise ValueError(f"recipe must be a non-empty name without '/', got {self.recipe!r}")
        if not self.stages:
            raise ValueError("stages: a recipe needs at least one stage")
        if self.samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {self.samples_per_shard}")
        if self.write_workers <= 0:
            raise ValueError(f"write_workers must be positive, got {self.write_workers}")
        if self.shuffle_window <= 0:
            raise ValueError(f"shuffle_window must be positive, got {self.shuffle_window}")
        unknown = sorted(set(self.only) - set(self.stages))
        if unknown:
            raise ValueError(f"only: unknown stages {unknown}; the recipe has {list(self.stages)}")


def content_hash(cfg: MixConfig) -> str:
    """Hash of what decides the shard bytes: common.config.config_hash of the config with what does not (where
    files live, how many workers, tracking) set to fixed values, as every job's content hash is made
    (data_prep.curation.content_config_hash too). The sources' identity is recorded by their manifests' hashes."""
    pre = dataclasses.replace(cfg.precompute, num_actors=1, num_gpus_per_actor=None)
    return config_hash(
        dataclasses.replace(
            cfg, curated_dir="", out_dir="", write_workers=1, only=[], precompute=pre, tracking=TrackingConfig()
        )
    )


def source_dirs(cfg: MixConfig, stages: Sequence[str]) -> dict[str, Path]:
    """Every source the chosen stages use -> its curated directory (a name must mean one directory)."""
    out: dict[str, Path] = {}
    for stage in stages:
        for group in cfg.stages[stage].groups.values():
            for name, src in group.sources.items():
                path = Path(src.path) if src.path else Path(cfg.curated_dir) / name
                if out.setdefault(name, path) != path:
                    raise ValueError(f"source {name!r} is given two paths: {out[name]} and {path}")
    return out


def build_stage(cfg: MixConfig, name: str, sources: dict[str, SourceEntry], config_digest: str) -> StageManifest:
    """Plan, write (and optionally precompute) one stage; returns its manifest."""
    stage = cfg.stages[name]
    plan = build_stage_plan(
        name, stage, sources, samples_per_shard=cfg.samples_per_shard, window=cfg.shuffle_window, mix_seed=cfg.seed
    )
    folder = stage_dir(cfg, name)
    written = write_stage_shards(plan, sources, folder, stage.caption_first_sentence, cfg.write_workers)
    manifest = build_manifest(
        plan,
        written,
        sources,
        recipe=cfg.recipe,
        config_hash=config_digest,
        samples_per_shard=cfg.samples_per_shard,
        caption_fraction=stage.caption_first_sentence,
    )
    if cfg.precompute.kind != "none":
        cls, kwargs = precompute_config_encoder(cfg.precompute)
        encoded = run_precompute(
            [folder / n for n in written["names"]],
            cls,
            kwargs,
            batch_size=cfg.precompute.batch_size,
            num_actors=cfg.precompute.num_actors,
            num_gpus_per_actor=cfg.precompute.num_gpus_per_actor,
        )
        precomputed = {
            "kind": cfg.precompute.kind,
            "field": cls.field,
            "encoder_path": cfg.precompute.encoder_path,
            "resolution": cfg.precompute.resolution,
            "encoded": sum(encoded.values()),
            "latent_scaled": False if cfg.precompute.kind == "vae" else None,
        }
        manifest = dataclasses.replace(manifest, precompute=precomputed)
    return finalize_manifest(folder, manifest)


def absolute_paths(cfg: MixConfig) -> MixConfig:
    """Ray tasks and actors run in their own node's working directory, not the driver's: the paths they are
    handed must not be relative (URIs stay as they are)."""

    def local(path: str | None) -> str | None:
        return os.path.abspath(path) if path and "://" not in path else path

    pre = dataclasses.replace(cfg.precompute, encoder_path=local(cfg.precompute.encoder_path))
    return dataclasses.replace(cfg, curated_dir=local(cfg.curated_dir), out_dir=local(cfg.out_dir), precompute=pre)


def stage_dir(cfg: MixConfig, name: str) -> Path:
    """Where a stage's shards and manifest go: {out_dir}/{recipe}/{stage}."""
    return Path(cfg.out_dir) / cfg.recipe / name
