"""Stage mixtures: ``python -m pipelines.mix --config configs/data/mix_<recipe>.yaml [key=value ...]``.

Reads curated sources (their manifests and tars) and writes, per training stage of the recipe,
``{out_dir}/{recipe}/{stage}/{stage}-{000000..N}.tar`` at the recipe's exact group ratios, plus the stage's
``manifest.json`` (target and realised ratios for the whole set and the worst shard, repeat factors, seed,
source manifest hashes). Optionally precomputes VQ ids / VAE latents for the generation samples. Prints the
realised-vs-target table and records it in the MLflow run "mix". What a stage holds is data_prep.stage_mix (and
the plan and bytes behind it); this module is the config, ``run(cfg)`` and ``main(argv)``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.config import parse_job_args, save_resolved
from common.lineage import curated_dataset, stage_dataset
from common.ray_session import ray_session
from common.tracking import build_tracker
from data_prep.manifests import MANIFEST_NAME, StageManifest
from data_prep.stage_mix import (
    MixConfig,
    absolute_paths,
    build_stage,
    content_hash,
    source_dirs,
    stage_dir,
)
from data_prep.stage_plan import load_source

log = logging.getLogger("pipelines.mix")


CONFIG = MixConfig
"""The job's config schema (pipelines.__main__ and the recipe tests look for it)."""


@dataclass(frozen=True)
class MixResult:
    """What a mix run hands training: each stage's folder and manifest."""

    out_dir: Path
    """The recipe's root, {out_dir}/{recipe} (absolute)."""
    stage_dirs: dict[str, Path]
    """Stage name -> its folder of shards and manifest.json, in recipe order."""
    manifests: dict[str, StageManifest]
    """Stage name -> its manifest (data_prep.manifests.StageManifest)."""


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
    tracker.log_datasets([stage_dataset(stage_dir(cfg, name) / MANIFEST_NAME)], "output")


def run(cfg: MixConfig) -> MixResult:
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


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(MixConfig, argv, prog="python -m pipelines.mix", doc=__doc__ or "")
    result = run(cfg)
    log.info("recipe %s: stage shards in %s", cfg.recipe, Path(cfg.out_dir) / cfg.recipe)
    print(ratio_table(result.manifests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
