"""Mixing: a mix recipe's config, building each of its stages (plan, shards, optional precompute, manifest) and
recording them in the MLflow run "mix". ``mix(cfg)`` is what the job (pipelines.mix) runs, and what the demo
chains; what a stage holds is decided in data_prep.stage_plan (which sample fills each slot) and
data_prep.stage_shards (the bytes and the stage manifest, data_prep.manifests.StageManifest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.config import config_hash, save_resolved
from common.lineage import curated_dataset, stage_dataset
from common.ray_session import ray_session
from common.tracking import TrackingConfig, build_tracker
from data_prep.manifests import MANIFEST_NAME, StageManifest
from data_prep.precompute import PrecomputeConfig, precompute_config_encoder, run_precompute
from data_prep.stage_plan import SourceEntry, StageMixConfig, build_stage_plan, load_source
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


@dataclass(frozen=True)
class MixResult:
    """What a mix run hands training: each stage's folder and manifest."""

    out_dir: Path
    """The recipe's root, {out_dir}/{recipe} (absolute)."""
    stage_dirs: dict[str, Path]
    """Stage name -> its folder of shards and manifest.json, in recipe order."""
    manifests: dict[str, StageManifest]
    """Stage name -> its manifest (data_prep.manifests.StageManifest)."""


def log_stage(tracker, name: str, manifest: StageManifest) -> None:
    metrics = {}
    for g, info in manifest.groups.items():
        metrics[f"{name}/{g}/target_ratio"] = info["target_ratio"]
        metrics[f"{name}/{g}/realised_ratio"] = info["realised_ratio"]
        metrics[f"{name}/{g}/worst_shard_deviation"] = info["worst_shard_deviation"]
        for s, src in info["sources"].items():
            metrics[f"{name}/{g}/{s}/repeat_factor"] = src["repeat_factor"]
    metrics[f"{name}/samples"] = manifest.samples
    tracker.log_metrics(metrics)
    tracker.log_dict(manifest.to_dict(), f"manifests/{name}.json")


def log_lineage(tracker, cfg: MixConfig, name: str, sources: dict) -> None:
    """The curated datasets a stage read (inputs) and the stage shards it wrote (output), for MLflow lineage."""
    used = {src for group in cfg.stages[name].groups.values() for src in group.sources}
    tracker.log_datasets([curated_dataset(sources[s].directory / MANIFEST_NAME) for s in sorted(used)], "input")
    tracker.log_datasets([stage_dataset(stage_dir(cfg, name) / MANIFEST_NAME)], "output")


def mix(cfg: MixConfig) -> MixResult:
    """Write the chosen stages and record the run "mix"; the result says where each stage's shards are."""
    stages = cfg.only or list(cfg.stages)
    config_digest = content_hash(cfg)
    cfg = absolute_paths(cfg)
    out_root = Path(cfg.out_dir) / cfg.recipe
    save_resolved(cfg, out_root)
    sources = {name: load_source(name, path.absolute()) for name, path in source_dirs(cfg, stages).items()}
    manifests: dict[str, StageManifest] = {}
    tracker = build_tracker(
        cfg.tracking, "mix", jsonl_path=out_root / "mix.jsonl", tags={"janus.kind": "mix", "janus.recipe": cfg.recipe}
    )
    needs_ray = cfg.precompute.kind != "none" or cfg.write_workers > 1  # one Ray for all stages
    with tracker, ray_session() if needs_ray else contextlib.nullcontext():
        tracker.log_params(
            {
                "recipe": cfg.recipe,
                "config_hash": config_digest,
                "seed": cfg.seed,
                "samples_per_shard": cfg.samples_per_shard,
                "shuffle_window": cfg.shuffle_window,
            }
        )
        tracker.log_artifact(out_root / "config.resolved.yaml")
        for name in stages:
            manifests[name] = build_stage(cfg, name, sources, config_digest)
            log_stage(tracker, name, manifests[name])
            log_lineage(tracker, cfg, name, sources)
    return MixResult(out_root, {name: stage_dir(cfg, name) for name in manifests}, manifests)


def stage_dir(cfg: MixConfig, name: str) -> Path:
    """Where a stage's shards and manifest go: {out_dir}/{recipe}/{stage}."""
    return Path(cfg.out_dir) / cfg.recipe / name
