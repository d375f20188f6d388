"""What every Ray Train worker runs for one stage. Knows nothing of ray.init, the cluster or argv.

Per stage: build the model (random, from a checkpoint path, or from the previous stage's weights), apply
the stage's freeze schedule, shard it with FSDP2 (the task wrapper is the FSDP root so every parameter is
gathered inside its forward), train with AdamW + warm-up, report sharded checkpoints, and at the end write
the full weights that the next stage starts from.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from common import faults
from common.config import config_from_dict
from common.lineage import STAGE_DIR_TAG
from common.tracking import DatasetRef, Tracker, build_tracker, system_metrics
from data_prep.schema import Sample, decode_sample
from model.build import build_collate, build_model, build_task, resolve_family
from model.family import get_family
from model.fit_vision import apply_vision, load_vision
from model.flavors import get_flavor
from model.flops import flops_per_batch, peak_flops
from model.freeze import apply_freeze
from model.janusflow_task import apply_ema_update, build_ema
from model.tokenizer import load_tokenizer
from model.weights import StageWeights, load_weights
from training.checkpoint import (
    TrainState,
    full_model_state_dict,
    latest_complete_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from training.config import StageConfig, TrainConfig, stage_index
from training.outputs import (
    export_stage_model,
    log_previews,
    run_previews,
    unsharded_model,
)
from training.parallelize import compute_dtype, init_process_group
from training.step import TrainStep, build_optimizer, parallelize_task

log = logging.getLogger("training.runner")

STEP_END_POINT = "train.step_end"
"""Fault point after each optimizer step (and its checkpoint); context: stage, rank, step."""
UPLOAD_POINT = "train.checkpoint_upload"
"""Fault point at each checkpoint save; context: stage, rank, step, pgid (the driver's process group)."""


def lr_lambda(stage: StageConfig) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step ``s``: linear warm-up, then constant or cosine."""

    def f(step: int) -> float:
        if stage.warmup_steps and step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        if stage.schedule == "constant":
            return 1.0
        progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * cosine

    return f


def rows_to_samples(batch: dict[str, np.ndarray]) -> list[Sample]:
    """A Ray Data batch of raw webdataset columns -> schema Samples (missing fields are None/NaN)."""
    keys = list(batch)
    n = len(batch[keys[0]])
    out = []
    for i in range(n):
        record = {k: batch[k][i] for k in keys if isinstance(batch[k][i], bytes | str)}
        out.append(decode_sample(record))
    return out


def iterate_samples(shard: Any, micro: int, skip: int, per_rank: int) -> Iterator[list[Sample]]:
    """Micro-batches of Samples from this worker's stream, skipping the ``skip`` already consumed.

    The stream is deterministic (the trainer preserves order), so skipping rows gives exactly the data an
    uninterrupted run would see next. Past the end of the stage's data the stream starts a new epoch.
    """
    per_rank = max(micro, per_rank - per_rank % micro)
    to_skip = (skip % per_rank) // micro
    while True:
        produced = 0
        for i, batch in enumerate(shard.iter_batches(batch_size=micro, batch_format="numpy", drop_last=True)):
            if i < to_skip:
                continue  # raw bytes only: nothing is decoded for skipped rows
            produced += 1
            yield rows_to_samples(batch)
        if produced == 0 and to_skip == 0:
            raise RuntimeError("the stage's data stream is empty for this worker")
        to_skip = 0


def _dist_info() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_stage_model(cfg: TrainConfig, stage: str, init_weights: str | None, device: torch.device):
    """Model + task for a stage, frozen by the stage's schedule; same init on every rank. A frozen VAE
    (JanusFlow) runs in the compute dtype on the GPU, in fp32 on the CPU."""
    flavor = get_flavor(cfg.model.flavor)
    family = resolve_family(flavor, cfg.model.family)
    torch.manual_seed(cfg.seed)
    model = build_model(flavor, family, path=None if init_weights else cfg.model.path)
    if init_weights:
        model.load_state_dict(load_weights(init_weights), strict=True)
    elif cfg.model.vision_path:  # a pre-fitted understanding encoder; later stages keep what they trained
        apply_vision(model, load_vision(cfg.model.vision_path))
    counts = apply_freeze(model, family, stage_index(stage), cfg.stage[stage].also_train)
    torch.manual_seed(cfg.seed + 7919 * stage_index(stage))  # the VAE (JanusFlow debug) is seeded apart
    task = build_task(model, flavor, cfg.model)
    vae = task.vae
    if vae is not None:
        vae.to(device).eval().requires_grad_(False)
        if device.type == "cuda" and compute_dtype(cfg.parallel, device.type) != vae.dtype:
            vae.to(compute_dtype(cfg.parallel, device.type))
    return flavor, family, model, task, counts


def gather_weights(task: nn.Module) -> dict[str, torch.Tensor] | None:
    """Collective: the model's full weights on rank 0 (None elsewhere), keys as in its own state_dict."""
    full = full_model_state_dict(task)
    if _dist_info()[0] != 0:
        return None
    prefix = "model."
    weights = {k[len(prefix) :]: v.contiguous() for k, v in full.items() if k.startswith(prefix)}
    seen: set[int] = set()
    for k, v in list(weights.items()):  # tied weights arrive as one tensor twice; safetensors wants copies
        if v.data_ptr() in seen:
            weights[k] = v.clone()
        seen.add(v.data_ptr())
    return weights


def gather_ema(ema: Any) -> dict[str, torch.Tensor] | None:
    """Collective: the EMA shadow weights, unsharded, on rank 0."""
    if ema is None:
        return None
    full = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu() for n, t in ema.shadow.items()}
    return full if _dist_info()[0] == 0 else None


class StageRunner:
    """One stage's training state inside a worker (built once, stepped many times)."""

    def __init__(
        self, cfg: TrainConfig, stage: str, *, device: torch.device, init_weights: str | None, stage_dir: str | Path
    ) -> None:
        self.cfg, self.stage, self.stage_cfg = cfg, stage, cfg.stage[stage]
        init_process_group(device.type)  # a group of one outside Ray Train: a mesh at every world size
        self.rank, self.world = _dist_info()
        self.device = device
        if device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals from small late-training values slow CPU math ~10x
        else:
            torch.cuda.set_device(device)  # the CUDA RNG state a checkpoint saves is this device's
        self.micro, self.accum = self.stage_cfg.accumulation(self.world)
        self.flavor, self.family, self.model, self.task, counts = build_stage_model(cfg, stage, init_weights, device)
        self.trainable = counts["_all"]["trainable"]
        parallelize_task(self.task, self.model, cfg.parallel, device)
        self.optimizer = build_optimizer(
            self.task,
            lr=self.stage_cfg.lr,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.stage_cfg))
        self.state = TrainState()
        torch.manual_seed(cfg.seed + 1_000_003 * (self.rank + 1) + stage_index(stage))
        random.seed(cfg.seed + self.rank)
        np.random.seed((cfg.seed + self.rank) % 2**32)
        self.collate = build_collate(self.flavor, cfg.model, seed=cfg.seed)
        self.out_dir = Path(stage_dir)
        self.spec = get_family(self.family)
        self.ema = build_ema(self.model, cfg.ema_decay) if self.spec.keeps_ema and cfg.ema_decay else None
        self.peak = peak_flops(device, cfg.mfu_peak_tflops)
        self.dataset: DatasetRef | None = None
        """The stage shards, as MLflow records the dataset (set by the Ray entry point)."""
        stage_number = stage_index(stage)
        self.train_step = TrainStep(
            self.task,
            self.optimizer,
            self.scheduler,
            device=device,
            accum=self.accum,
            grad_clip=cfg.optim.grad_clip,
            count=lambda batch: flops_per_batch(self.flavor, self.family, batch, stage=stage_number),
            after_step=(lambda: apply_ema_update(self.ema, self.model)) if self.ema is not None else None,
        )

    def extra_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """What a checkpoint holds besides model, optimizer and scheduler: the EMA shadow weights, if kept."""
        return {"ema": self.ema.shadow} if self.ema is not None else {}

    def restore(self, path: str | Path) -> None:
        """Continue from a checkpoint (collective)."""
        self.state = load_checkpoint(path, self.task, self.optimizer, self.scheduler, self.extra_state())

    def tracker(self) -> Tracker:
        """The stage's tracker: MLflow on rank 0 (one stable run per stage), a JSONL log on every rank."""
        jsonl = self.out_dir / "logs" / f"rank{self.rank}.jsonl"
        tags = {"janus.stage": self.stage, "janus.family": self.family, "janus.flavor": self.flavor.name}
        return build_tracker(
            self.cfg.tracking,
            f"stage_{self.stage}",
            rank=self.rank,
            jsonl_path=jsonl,
            run_key=f"{self.cfg.name}/stage_{self.stage}",
            tags=tags,
        )

    def step(self, batches: Iterator[list[Sample]]) -> None:
        """One optimizer step over ``accum`` micro-batches (metrics stay on the device until :meth:`flush`)."""
        self.train_step(lambda: self.collate(next(batches)))
        self.state.step += 1
        self.state.samples_seen += self.micro * self.accum

    def flush(self) -> dict[str, float]:
        """Collective: the metrics since the last flush, reduced over ranks (see training.step)."""
        return self.train_step.flush(self.stage_cfg.global_batch, self.peak)

    def write_outputs(self, tracker: Tracker, final: bool) -> None:
        """Collective: previews (and at the end: stage weights, export) from the gathered full weights."""
        weights, ema = gather_weights(self.task), gather_ema(self.ema)
        if weights is None:
            return
        step = self.state.step
        if final:
            record = StageWeights(stage=self.stage, steps=step, family=self.family, flavor=self.flavor.name)
            record.write(self.out_dir / "final", weights)
        model = unsharded_model(self.flavor, self.family, weights, self.device)
        tokenizer = load_tokenizer(self.flavor, self.cfg.model.path)
        vae = self.task.vae
        paths = run_previews(
            model, self.flavor, self.family, vae, tokenizer, self.cfg.preview, self.out_dir / "previews", step
        )
        log_previews(tracker, paths)
        if final and self.cfg.export:
            ema_full = {**weights, **ema} if ema else None
            export = export_stage_model(model, self.family, tokenizer, self.out_dir / "export", ema_full)
            self.log_model(tracker, export)

    def log_model(self, tracker: Tracker, export: Path) -> str | None:
        """The export as an MLflow logged model of the stage's run (a pyfunc that samples and answers)."""
        import shutil

        from model.inference import save_mlflow_model

        folder = self.out_dir / "mlflow_model"
        shutil.rmtree(folder, ignore_errors=True)
        save_mlflow_model(export, folder, self.spec.vae_for(self.cfg.model))
        record = self.out_dir / "inputs.json"
        tags = {
            STAGE_DIR_TAG: str(self.out_dir.resolve()),
            "janus.recipe": self.cfg.name,
            "janus.stage": self.stage,
            "janus.family": self.family,
            "janus.flavor": self.flavor.name,
            "janus.inputs_sha256": json.loads(record.read_text())["sha256"] if record.is_file() else "",
            "janus.data_digest": self.dataset.digest if self.dataset else "",
        }
        return tracker.log_model(folder, f"{self.cfg.name}-stage_{self.stage}", tags=tags, step=self.state.step)

    def report(self, metrics: dict[str, float], checkpoint: bool, driver_pgid: int = 0) -> None:
        """``ray.train.report`` from every rank; with a checkpoint, each rank hands over its own files.

        Fault point ``train.checkpoint_upload`` (stage, rank, step, pgid = the driver's process group): a
        ``raise``/``kill``/``kill_group`` drill fires before the save; a ``custom`` one kills the whole job in
        the middle of the upload (:func:`kill_job_mid_upload`)."""
        import ray.train

        if not checkpoint:
            ray.train.report(metrics)
            return
        context = {"stage": self.stage, "rank": self.rank, "step": self.state.step, "pgid": driver_pgid}
        faults.point(UPLOAD_POINT, **context)
        with tempfile.TemporaryDirectory(prefix="janus-ckpt-") as tmp:
            save_checkpoint(tmp, self.task, self.optimizer, self.scheduler, self.state, self.extra_state())
            upload = self._drill_upload(driver_pgid, context)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_upload_fn=upload)

    def _drill_upload(self, driver_pgid: int, context: dict[str, Any]) -> Callable[..., Any] | None:
        """The upload that kills the whole job mid-save, when a ``custom`` drill is armed here (None otherwise)."""
        drill = faults.matching(UPLOAD_POINT, **context) if driver_pgid else None
        if drill is None or drill.action != "custom":
            return None
        return functools.partial(
            kill_job_mid_upload, dest_root=self.out_dir, rank=self.rank, world=self.world, pgid=driver_pgid
        )


def resume_from(runner: StageRunner, registered: Any) -> None:
    """Restore the newest complete checkpoint: the one in the run folder (rank 0 looks, every rank follows)
    or Ray's registered one when the run folder is not on a shared filesystem (collective)."""
    choice: list[str | None] = [None]
    if runner.rank == 0 and runner.out_dir.is_dir():
        found = latest_complete_checkpoint(runner.out_dir)
        choice[0] = str(found) if found is not None else None
    if runner.world > 1:
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is not None:
        if registered is not None and Path(registered.path).name != Path(choice[0]).name and runner.rank == 0:
            log.warning("resume: %s is complete but was not registered by Ray; resuming from it", Path(choice[0]).name)
        runner.restore(choice[0])
    elif registered is not None:
        with registered.as_directory() as path:
            runner.restore(path)


def kill_job_mid_upload(checkpoint: Any, dir_name: str, *, dest_root: Path, rank: int, world: int, pgid: int) -> None:
    """Fault drill (a ``checkpoint_upload_fn``): wait until the other ranks' files of this checkpoint are in
    storage, copy half of this rank's shard beside them, then SIGKILL the driver's process group and this worker:
    the job dies in the middle of a save, as on a lost head node."""
    dest = dest_root / dir_name
    others = [f"__{r}_0.distcp" for r in range(world) if r != rank] + ([".metadata"] if rank != 0 else [])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all((dest / name).is_file() for name in others):
        time.sleep(0.05)
    time.sleep(0.5)  # let the last of their files finish
    own = Path(checkpoint.path) / f"__{rank}_0.distcp"
    data = own.read_bytes()
    dest.mkdir(parents=True, exist_ok=True)
    (dest / own.name).write_bytes(data[: len(data) // 2])
    log.warning("fault drill: killing the job (process group %d) while saving %s", pgid, dir_name)
    os.killpg(pgid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Ray Train entry point: ``loop`` = {"cfg": resolved TrainConfig dict, "stage", "init_weights",
    "samples_per_rank", "stage_dir", "driver_pgid" (the job-killing fault drill's target)}."""
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(TrainConfig, loop["cfg"])
    stage = loop["stage"]
    runner = StageRunner(
        cfg, stage, device=ray.train.torch.get_device(), init_weights=loop["init_weights"], stage_dir=loop["stage_dir"]
    )
    runner.dataset = DatasetRef(**loop["dataset"]) if loop.get("dataset") else None
    resume_from(runner, ray.train.get_checkpoint())
    shard = ray.train.get_dataset_shard("train")
    batches = iterate_samples(shard, runner.micro, runner.state.samples_seen, int(loop["samples_per_rank"]))
    context = ray.train.get_context()
    with runner.tracker() as tracker:
        run_id = [tracker.run_id]
        if runner.world > 1:
            dist.broadcast_object_list(run_id, src=0)  # every node's first worker samples its machine into it
        monitored = run_id[0] if context.get_local_rank() == 0 else None
        with system_metrics(cfg.tracking, monitored, f"node{context.get_node_rank()}"):
            run_stage_loop(runner, tracker, cfg, stage, int(loop.get("driver_pgid", 0)), batches)


def run_stage_loop(
    runner: StageRunner, tracker: Tracker, cfg: TrainConfig, stage: str, driver_pgid: int, batches: Iterator
) -> None:
    """Train the stage to its end: log, checkpoint, preview, write the final weights and export.

    Fault point ``train.step_end`` (stage, rank, step): after each optimizer step and its checkpoint; a ``kill``
    drill there is a worker lost mid-stage (Ray Train restarts the group, which resumes from the checkpoint)."""
    stage_cfg = runner.stage_cfg
    if runner.state.step == 0:
        tracker.log_params(
            {
                "stage": stage,
                "trainable_params": runner.trainable,
                "world_size": runner.world,
                "micro_batch": runner.micro,
                "accumulation": runner.accum,
                **{f"stage.{k}": v for k, v in vars(stage_cfg).items()},
            }
        )
        if runner.dataset is not None:
            tracker.log_datasets([runner.dataset], "training")
    while runner.state.step < stage_cfg.steps:
        runner.step(batches)
        step = runner.state.step
        last = step == stage_cfg.steps
        checkpoint = last or step % cfg.checkpoint.every_steps == 0
        if checkpoint or step % cfg.log_every == 0:  # the only points where the host waits on the device
            metrics = runner.flush()
            tracker.log_metrics(metrics, step=step)
        if checkpoint:
            runner.report({"step": step, "loss": metrics["loss"]}, True, driver_pgid)
        if cfg.sample_every and step % cfg.sample_every == 0 and not last:
            runner.write_outputs(tracker, final=False)
        faults.point(STEP_END_POINT, stage=stage, rank=runner.rank, step=step)  # a drill may SIGKILL us here
    runner.write_outputs(tracker, final=True)
    tracker.log_metrics({"stage_done": 1.0}, step=runner.state.step)
