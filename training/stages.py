"""Three-stage training with Ray Train + FSDP2 on the cluster this process is connected to (or a local one).

Each stage is one Ray Train run named ``{name}-stage_{S}`` under ``checkpoint.dir``: running again with the
same name resumes the unfinished stage from its last checkpoint and skips finished ones, unless its inputs
changed (training.records). Stage N+1 starts from stage N's final weights (model.weights) with its own freeze
schedule and a fresh optimizer. ``run_training(cfg)`` returns each stage's final weights folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import faults
from common.config import load_config, save_resolved, to_dict
from common.lineage import REGISTERED_TAG, find_stage_model, register_model, stage_dataset
from common.ray_session import ray_session
from common.tracking import PARENT_ENV, pipeline_run, resolve_uri
from data_prep.manifests import MANIFEST_NAME, StageManifest
from model.weights import StageWeights
from training.config import STAGE_NAMES, TrainConfig
from training.progress import StageProgress, stage_summary
from training.records import StageInputs, check_stage_inputs
from training.runner import train_loop_per_worker

log = logging.getLogger("training.stages")


REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = "outputs/stages"


def data_root(cfg: TrainConfig) -> Path:
    """Where relative stage shard folders are: data_root when given, else where the mixture recipe writes its
    stages ({out_dir}/{recipe}, data_prep.mixing), else outputs/stages."""
    if cfg.data_root:
        return Path(cfg.data_root)
    if not cfg.mixture:
        return Path(DEFAULT_DATA_ROOT)
    from data_prep.mixing import MixConfig

    recipe = Path(cfg.mixture)
    if not recipe.is_absolute() and not recipe.exists():
        recipe = REPO / recipe
    mix = load_config(MixConfig, recipe)
    return Path(mix.out_dir) / mix.recipe


def stage_shard_paths(cfg: TrainConfig, stage: str) -> list[Path]:
    folder = Path(cfg.stage[stage].shards or f"stage_{stage}")
    if not folder.is_absolute():
        folder = data_root(cfg) / folder
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"stage {stage}: no .tar shards in {folder.resolve()} (stage.{stage}.shards)")
    return [t.resolve() for t in tars]


def count_samples(tars: Sequence[Path]) -> int:
    """Samples in the stage: the stage manifest's count when present (data_prep.manifests.StageManifest; one
    of another version is an error naming the file), else the keys in the tars."""
    manifest = tars[0].parent / MANIFEST_NAME
    if manifest.is_file():
        return StageManifest.read(manifest).samples
    total = 0
    for tar in tars:
        with tarfile.open(tar) as f:
            total += len({m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in f if m.isfile()})
    return total


def build_stage_dataset(tars: Sequence[Path]):
    """The stage shards as a Ray Dataset of raw webdataset columns (bytes; decoded in the workers)."""
    import ray.data

    return ray.data.read_webdataset([str(t) for t in tars], decoder=None, override_num_blocks=len(tars))


def stage_dir(cfg: TrainConfig, stage: str) -> Path:
    """The stage's Ray Train run folder (checkpoints, logs, inputs record, final weights), absolute."""
    return Path(cfg.checkpoint.dir).resolve() / f"{cfg.name}-stage_{stage}"


def initial_weights(cfg: TrainConfig, stage: str) -> Path | None:
    """Where a stage starts: the previous stage's final weights, or model.path / random for stage I."""
    idx = STAGE_NAMES.index(stage)
    if idx == 0 or cfg.stage_init == "model":
        return None
    previous = stage_dir(cfg, STAGE_NAMES[idx - 1]) / "final"
    if StageWeights.exists(previous):
        return previous
    if cfg.model.path:
        return None  # starts from the given checkpoint
    raise FileNotFoundError(
        f"stage {stage} starts from stage {STAGE_NAMES[idx - 1]}'s final weights, but {previous} is not "
        f"complete: run that stage first (same name={cfg.name!r}) or set model.path"
    )


def check_cpu_budget(cfg: TrainConfig) -> None:
    """Ray Data runs the reads on CPUs the training workers did not reserve; with none left, it waits
    forever. Fail early with the knob to turn instead."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    reserved = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if total - reserved < 0.5:
        raise ValueError(
            f"scaling: {cfg.scaling.num_workers} workers x cpus_per_worker={cfg.scaling.cpus_per_worker} reserve "
            f"{reserved:g} of the cluster's {total:g} CPUs, leaving none for the data pipeline; lower "
            "scaling.cpus_per_worker (it is a reservation, not a thread limit) or add CPUs"
        )


def build_trainer(cfg: TrainConfig, stage: str, loop: dict[str, Any], tars: Sequence[Path]) -> Any:
    """The stage's Ray Train ``TorchTrainer``: ``loop`` is its workers' config, ``tars`` the shards they read."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=f"{cfg.name}-stage_{stage}",
            storage_path=str(Path(cfg.checkpoint.dir).resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            # Armed fault drills reach the workers even when this job joined a Ray started before they were armed.
            worker_runtime_env={"env_vars": faults.env_vars()} if faults.env_vars() else None,
        ),
        datasets={"train": build_stage_dataset(tars)},
        # Deterministic order and split: a resumed worker skips exactly the rows it had consumed.
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )


def run_stage(cfg: TrainConfig, stage: str) -> Path:
    """Train one stage to its end (resuming if it was interrupted); returns its final weights folder."""
    final = stage_dir(cfg, stage) / "final"
    init = initial_weights(cfg, stage)
    tars = stage_shard_paths(cfg, stage)
    check_stage_inputs(stage_dir(cfg, stage), StageInputs.of(cfg, stage, init, tars), stage)
    if StageWeights.exists(final):
        log.info("stage %s already finished (%s); skipping", stage, final)
        return final
    check_cpu_budget(cfg)
    num_samples = count_samples(tars)
    workers = cfg.scaling.num_workers
    manifest = tars[0].parent / MANIFEST_NAME
    loop = {
        "cfg": to_dict(cfg),
        "stage": stage,
        "init_weights": str(init) if init else None,
        "samples_per_rank": num_samples // workers,
        "stage_dir": str(stage_dir(cfg, stage)),
        "driver_pgid": os.getpgrp(),
        "dataset": dataclasses.asdict(stage_dataset(manifest)) if manifest.is_file() else None,
    }
    trainer = build_trainer(cfg, stage, loop, tars)
    log.info(
        "stage %s: %d samples in %d shards, %d workers, from %s",
        stage,
        num_samples,
        len(tars),
        workers,
        init or "scratch",
    )
    log_file = stage_dir(cfg, stage) / "logs" / "rank0.jsonl"
    since = log_file.stat().st_size if log_file.is_file() else 0
    with StageProgress(log_file, stage, cfg.stage[stage].steps):
        trainer.fit()
    if not StageWeights.exists(final):
        raise RuntimeError(f"stage {stage} ended without writing its final weights to {final}")
    log.info("%s", stage_summary(log_file, stage, since))
    return final


def _absolute_sqlite(uri: str) -> str:
    """Workers run elsewhere: a relative sqlite path must become absolute before it crosses over."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _absolute_model_paths(cfg: TrainConfig) -> None:
    """Workers run in their own directories: relative weight/tokenizer paths are the driver's, made absolute."""
    for name in ("path", "vq_path", "vae_path", "vision_path"):
        value = getattr(cfg.model, name)
        if value and "://" not in value and not Path(value).is_absolute():
            setattr(cfg.model, name, str(Path(value).resolve()))


def register_final_model(cfg: TrainConfig, run_ids: list[str]) -> str | None:
    """Register the run's last stage's logged model as a new version of ``registry.name`` (once: a rerun that
    skipped the finished stage finds its version) and tag the runs ``run_ids`` with it; returns its URI."""
    if not cfg.registry.name or cfg.tracking.backend != "mlflow" or not cfg.export:
        return None
    stage = cfg.stages[-1]
    model_id = find_stage_model(cfg.tracking, stage_dir(cfg, stage))
    if model_id is None:
        raise RuntimeError(f"registry: stage {stage} of {cfg.name!r} logged no model to register")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_uri(cfg.tracking))
    tags = client.get_logged_model(model_id).tags
    keep = ("janus.recipe", "janus.stage", "janus.family", "janus.flavor", "janus.inputs_sha256", "janus.data_digest")
    uri = register_model(cfg.tracking, cfg.registry.name, model_id, {k: tags[k] for k in keep if k in tags})
    for run_id in run_ids:
        client.set_tag(run_id, f"{REGISTERED_TAG}.{cfg.registry.name}", uri)
    log.info("registered stage %s's model as %s", stage, uri)
    return uri


def run_training(cfg: TrainConfig) -> dict[str, Path]:
    """Train ``cfg.stages`` in order under one pipeline run; returns each stage's final weights folder."""
    cfg.tracking.uri = _absolute_sqlite(resolve_uri(cfg.tracking))
    _absolute_model_paths(cfg)
    out = {}
    outer = cfg.tracking.parent_run_id or os.environ.get(PARENT_ENV)
    with (
        ray_session(log_to_driver=True),  # the job's cluster (RAY_ADDRESS) or a local instance
        pipeline_run(cfg.tracking, f"train-{cfg.name}", run_key=f"train/{cfg.name}") as parent,
    ):
        cfg.tracking.parent_run_id = parent.run_id
        save_resolved(cfg, Path(cfg.checkpoint.dir) / cfg.name)
        for stage in cfg.stages:
            start = time.perf_counter()
            out[stage] = run_stage(cfg, stage)
            parent.log_metrics({f"time_s/stage_{stage}": time.perf_counter() - start})
        register_final_model(cfg, [r for r in (parent.run_id, outer) if r])
    return out
