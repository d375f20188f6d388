"""Three-stage training with Ray Train + FSDP2: ``python -m pipelines.train --config configs/train/X.yaml``.

The same command works locally (a local Ray instance, CPU workers, gloo), against a cluster (RAY_ADDRESS),
and through ``ray job submit --working-dir . -- python -m pipelines.train ...``. Each stage is one Ray Train
run named ``{name}-stage_{S}`` under ``checkpoint.dir``: running the command again with the same name
resumes the unfinished stage from its last checkpoint and skips finished ones. Stage N+1 starts from
stage N's final weights with its own freeze schedule and a fresh optimizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

from pipelines.config import parse_job_args, save_resolved, to_dict
from pipelines.lineage import REGISTERED_TAG, find_stage_model, register_model, stage_dataset
from pipelines.progress import StageProgress, stage_summary
from pipelines.tracking import PARENT_ENV, pipeline_run, resolve_uri
from pipelines.train_config import STAGE_NAMES, TrainConfig
from pipelines.train_loop import DONE_FILE, train_loop_per_worker

CONFIG = TrainConfig


def stage_shard_paths(cfg: TrainConfig, stage: str) -> list[Path]:
    folder = Path(cfg.stage[stage].shards or f"stage_{stage}")
    if not folder.is_absolute():
        folder = Path(cfg.data_root) / folder
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"stage {stage}: no .tar shards in {folder.resolve()} (stage.{stage}.shards)")
    return [t.resolve() for t in tars]


def count_samples(tars: Sequence[Path]) -> int:
    """Samples in the stage: the stage manifest's count when present, else the keys in the tars."""
    manifest = tars[0].parent / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        for key in ("samples", "num_samples", "total_samples"):
            if isinstance(data.get(key), int):
                return data[key]
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
    return Path(cfg.checkpoint.dir).resolve() / f"{cfg.name}-stage_{stage}"


def initial_weights(cfg: TrainConfig, stage: str) -> Path | None:
    """Where a stage starts: the previous stage's final weights, or model.path / random for stage I."""
    idx = STAGE_NAMES.index(stage)
    if idx == 0 or cfg.stage_init == "model":
        return None
    previous = stage_dir(cfg, STAGE_NAMES[idx - 1]) / "final"
    if (previous / DONE_FILE).is_file():
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


INPUTS_FILE = "inputs.json"
"""Written into a stage's folder before it trains: what its result depends on (see :func:`stage_inputs`)."""


class StageInputsChanged(ValueError):
    """A stage folder holds work done from other inputs than the ones asked for now."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _folder_sha256(path: Path) -> str | None:
    """Hash of a small folder's (or file's) contents; None when it is not there (the job reports that)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not all(f.is_file() for f in files):
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise ValueError("no sha256 field")
    except (OSError, ValueError) as exc:
        raise StageInputsChanged(
            f"{path}: unreadable stage record ({exc}); delete its stage folder to train that stage anew"
        ) from exc
    return record


def stage_inputs(cfg: TrainConfig, stage: str, init: Path | None, tars: Sequence[Path]) -> dict:
    """What a stage's weights depend on: its stage, model and optimizer settings, the seed, where it starts
    (the previous stage's inputs, chained), its shards (names, sizes, the stage manifest's hash) and the
    contents of the fitted tokenizer it trains against (``model.vq_path`` / ``model.vae_path``).

    Not in it: logging, checkpoint cadence, parallelism and scaling (a stage may resume on other hardware).
    """
    manifest = tars[0].parent / "manifest.json"
    start: dict = {"model.path": cfg.model.path, "stage_init": cfg.stage_init}
    if init is not None:
        previous = Path(init).parent / INPUTS_FILE
        start["previous_stage"] = _read_record(previous)["sha256"] if previous.is_file() else str(Path(init).resolve())
    tokenizers = {
        key: _folder_sha256(Path(value))
        for key, value in (("vq_path", cfg.model.vq_path), ("vae_path", cfg.model.vae_path))
        if value
    }
    inputs = {
        "stage": to_dict(cfg.stage[stage]),
        "tokenizers": tokenizers,
        "model": to_dict(cfg.model),
        "optim": to_dict(cfg.optim),
        "seed": cfg.seed,
        "ema_decay": cfg.ema_decay,
        "start": start,
        "shards": {
            "files": [[t.name, t.stat().st_size] for t in tars],
            "manifest_sha256": _sha256(manifest.read_bytes()) if manifest.is_file() else None,
        },
    }
    return {"sha256": _sha256(json.dumps(inputs, sort_keys=True, default=str).encode()), "inputs": inputs}


def _differences(old: object, new: object, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def check_stage_inputs(folder: Path, current: dict, stage: str) -> None:
    """Refuse to skip or resume a stage whose folder was trained from other inputs; record them otherwise.

    A folder from before the record existed (work in it but no record) is trusted, with a warning."""
    path = folder / INPUTS_FILE
    if path.is_file():
        recorded = _read_record(path)
        if recorded["sha256"] == current["sha256"]:
            return
        changed = _differences(recorded.get("inputs", {}), current["inputs"]) or ["(unreadable record)"]
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise StageInputsChanged(
            f"stage {stage}: {folder} holds training from other inputs than this run's (changed: {shown}); "
            f"delete that folder (and the later stages') to train anew, or give another name= or checkpoint.dir="
        )
    if folder.is_dir() and any(folder.iterdir()):
        print(f"train: warning: {folder} has no {INPUTS_FILE}; trusting its work was done from this recipe")
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(current, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def run_stage(cfg: TrainConfig, stage: str) -> Path:
    """Train one stage to its end (resuming if it was interrupted); returns its final weights folder."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    final = stage_dir(cfg, stage) / "final"
    init = initial_weights(cfg, stage)
    tars = stage_shard_paths(cfg, stage)
    check_stage_inputs(stage_dir(cfg, stage), stage_inputs(cfg, stage, init, tars), stage)
    if (final / DONE_FILE).is_file():
        print(f"train: stage {stage} already finished ({final}); skipping")
        return final
    check_cpu_budget(cfg)
    n = count_samples(tars)
    workers = cfg.scaling.num_workers
    manifest = tars[0].parent / "manifest.json"
    loop = {
        "cfg": to_dict(cfg),
        "stage": stage,
        "init_weights": str(init) if init else None,
        "samples_per_rank": n // workers,
        "stage_dir": str(stage_dir(cfg, stage)),
        "driver_pgid": os.getpgrp(),
        "dataset": dataclasses.asdict(stage_dataset(manifest)) if manifest.is_file() else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=f"{cfg.name}-stage_{stage}",
            storage_path=str(Path(cfg.checkpoint.dir).resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
        ),
        datasets={"train": build_stage_dataset(tars)},
        # Deterministic order and split: a resumed worker skips exactly the rows it had consumed.
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    print(f"train: stage {stage}: {n} samples in {len(tars)} shards, {workers} workers, from {init or 'scratch'}")
    log = stage_dir(cfg, stage) / "logs" / "rank0.jsonl"
    since = log.stat().st_size if log.is_file() else 0
    with StageProgress(log, stage, cfg.stage[stage].steps):
        trainer.fit()
    if not (final / DONE_FILE).is_file():
        raise RuntimeError(f"stage {stage} ended without writing its final weights to {final}")
    print(stage_summary(log, stage, since))
    return final


def _absolute_sqlite(uri: str) -> str:
    """Workers run elsewhere: a relative sqlite path must become absolute before it crosses over."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _ensure_ray() -> bool:
    """Connect to RAY_ADDRESS / the job's cluster, or start a local instance; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    return True


def _absolute_model_paths(cfg: TrainConfig) -> None:
    """Workers run in their own directories: relative weight/tokenizer paths are the driver's, made absolute."""
    for name in ("path", "vq_path", "vae_path"):
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
    print(f"train: registered stage {stage}'s model as {uri}")
    return uri


def run_training(cfg: TrainConfig) -> dict[str, Path]:
    cfg.tracking.uri = _absolute_sqlite(resolve_uri(cfg.tracking))
    _absolute_model_paths(cfg)
    out = {}
    outer = cfg.tracking.parent_run_id or os.environ.get(PARENT_ENV)
    started = _ensure_ray()
    try:
        with pipeline_run(cfg.tracking, f"train-{cfg.name}", run_key=f"train/{cfg.name}") as parent:
            cfg.tracking.parent_run_id = parent.run_id
            save_resolved(cfg, Path(cfg.checkpoint.dir) / cfg.name)
            for stage in cfg.stages:
                start = time.perf_counter()
                out[stage] = run_stage(cfg, stage)
                parent.log_metrics({f"time_s/stage_{stage}": time.perf_counter() - start})
            register_final_model(cfg, [r for r in (parent.run_id, outer) if r])
    finally:
        if started:
            import ray

            ray.shutdown()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(TrainConfig, argv, prog="python -m pipelines.train", doc=__doc__ or "")
    finals = run_training(cfg)
    for stage, path in finals.items():
        print(f"train: stage {stage} weights -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
