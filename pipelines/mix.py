"""Stage mixtures: ``python -m pipelines.mix --config configs/data/mix_<recipe>.yaml [key=value ...]``.

Reads curated sources (their manifests and tars) and writes, per training stage of the recipe,
``{out_dir}/{recipe}/{stage}/{stage}-{000000..N}.tar`` at the recipe's exact group ratios, plus the stage's
``manifest.json`` (target and realised ratios for the whole set and the worst shard, repeat factors, seed,
source manifest hashes). Optionally precomputes VQ ids / VAE latents for the generation samples. Prints the
realised-vs-target table and records it in the MLflow run "mix".
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.config import config_hash, parse_job_args, save_resolved
from common.lineage import curated_dataset, stage_dataset
from common.ray_session import ray_session
from common.tracking import TrackingConfig, build_tracker
from data_prep.manifests import MANIFEST_NAME, StageManifest
from data_prep.mixture import StageConfig, build_stage_plan, load_source
from data_prep.precompute import PrecomputeConfig, precompute_config_encoder, run_precompute
from data_prep.stage_shards import build_manifest, finalize_manifest, write_stage_shards

log = logging.getLogger("pipelines.mix")


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
    stages: dict[str, StageConfig] = field(default_factory=dict)
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


CONFIG = MixConfig


def content_hash(cfg: MixConfig) -> str:
    """Hash of what decides the shard bytes: not where files live, how many workers, or tracking
    (the sources' identity is recorded by their manifests' hashes)."""
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


def build_stage(cfg: MixConfig, name: str, sources: dict, chash: str) -> StageManifest:
    """Plan, write (and optionally precompute) one stage; returns its manifest."""
    stage = cfg.stages[name]
    plan = build_stage_plan(
        name, stage, sources, samples_per_shard=cfg.samples_per_shard, window=cfg.shuffle_window, mix_seed=cfg.seed
    )
    stage_dir = Path(cfg.out_dir) / cfg.recipe / name
    written = write_stage_shards(plan, sources, stage_dir, stage.caption_first_sentence, cfg.write_workers)
    manifest = build_manifest(
        plan,
        written,
        sources,
        recipe=cfg.recipe,
        config_hash=chash,
        samples_per_shard=cfg.samples_per_shard,
        caption_fraction=stage.caption_first_sentence,
    )
    if cfg.precompute.kind != "none":
        cls, kwargs = precompute_config_encoder(cfg.precompute)
        encoded = run_precompute(
            [stage_dir / n for n in written["names"]],
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
    return finalize_manifest(stage_dir, manifest)


def ratio_table(manifests: dict[str, StageManifest]) -> str:
    """Realised vs target ratios per stage and group: whole set and worst shard."""
    lines = [f"{'stage':<14}{'group':<15}{'target':>9}{'realised':>10}{'count':>9}{'worst shard dev':>17}"]
    for stage, m in manifests.items():
        for g, info in m.groups.items():
            lines.append(
                f"{stage:<14}{g:<15}{info['target_ratio']:>9.4f}{info['realised_ratio']:>10.4f}"
                f"{info['count']:>9d}{info['worst_shard_deviation']:>17.3f}"
            )
        for p, ph in enumerate(m.phases if len(m.phases) > 1 else []):
            pairs = ", ".join(f"{g} {ph['realised_ratios'][g]:.4f}/{t:.4f}" for g, t in ph["target_ratios"].items())
            lines.append(f"{'':<14}phase {p} [{ph['start']}, {ph['end']}): realised/target {pairs}")
    return "\n".join(lines)


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
    tracker.log_datasets([stage_dataset(Path(cfg.out_dir) / cfg.recipe / name / MANIFEST_NAME)], "output")


def absolute_paths(cfg: MixConfig) -> MixConfig:
    """Ray tasks and actors run in their own node's working directory, not the driver's: the paths they are
    handed must not be relative (URIs stay as they are)."""

    def local(path: str | None) -> str | None:
        return os.path.abspath(path) if path and "://" not in path else path

    pre = dataclasses.replace(cfg.precompute, encoder_path=local(cfg.precompute.encoder_path))
    return dataclasses.replace(cfg, curated_dir=local(cfg.curated_dir), out_dir=local(cfg.out_dir), precompute=pre)


def run(cfg: MixConfig) -> dict[str, StageManifest]:
    """Write the chosen stages; returns their manifests by stage name."""
    stages = cfg.only or list(cfg.stages)
    chash = content_hash(cfg)
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
                "config_hash": chash,
                "seed": cfg.seed,
                "samples_per_shard": cfg.samples_per_shard,
                "shuffle_window": cfg.shuffle_window,
            }
        )
        tracker.log_artifact(out_root / "config.resolved.yaml")
        for name in stages:
            manifests[name] = build_stage(cfg, name, sources, chash)
            log_stage(tracker, name, manifests[name])
            log_lineage(tracker, cfg, name, sources)
    return manifests


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(MixConfig, argv, prog="python -m pipelines.mix", doc=__doc__ or "")
    manifests = run(cfg)
    log.info("recipe %s: stage shards in %s", cfg.recipe, Path(cfg.out_dir) / cfg.recipe)
    print(ratio_table(manifests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
