"""One optimizer step as every training worker runs it, with no host sync inside (torchtitan's habit).

Imports torch and ``model`` only, so ``benchmarks/gpu_step.py`` runs the same step on a machine without
Ray, MLflow or the data stack.

- A batch is collated on the CPU; its tokens and training FLOPs are counted there, before the transfer.
- The task's metrics are device-side ``(sum, count)`` pairs (model.losses.Metric); the step adds them up
  on the device, with the gradient norm. Nothing calls ``.item()``, ``float()`` or boolean indexing.
- :meth:`TrainStep.flush`, at a log step, reduces the window since the last flush over ranks in one
  collective and brings it to the host once: means of the metrics and throughput over the window (wall time
  is honest only at a sync point, which the flush is).

Every rank must return the same metric keys (each task's keys depend on its family and config only), so the
window reduces as one tensor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.build import decoder_blocks
from model.losses import Metric, metric
from training.parallelize import ParallelConfig, apply_parallelism, build_device_mesh, init_process_group

Batch = dict[str, Any]


def parallelize_task(task: nn.Module, model: nn.Module, cfg: ParallelConfig, device: torch.device) -> None:
    """Shard ``task`` (the FSDP root, holding ``model``) on a mesh of every rank, one rank included."""
    init_process_group(device.type)
    world = dist.get_world_size()
    task.to(device)
    apply_parallelism(task, decoder_blocks(model), cfg, build_device_mesh(device.type, world, cfg.replicate))


def build_optimizer(
    task: nn.Module, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; fused on CUDA (one kernel, its step counter on the device)."""
    params = [p for p in task.parameters() if p.requires_grad]
    cuda = any(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=cuda)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Tensors to ``device`` (asynchronously from pinned memory on CUDA); other values as they are."""
    pin = device.type == "cuda"
    return {
        k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if torch.is_tensor(v) else v
        for k, v in batch.items()
    }


@dataclass
class Window:
    """Host-side counters since the last flush (summed over this rank's micro-batches)."""

    steps: int = 0
    tokens: float = 0.0
    flops: float = 0.0
    data_wait_s: float = 0.0
    text_targets: float = 0.0
    image_slots: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def counters(self) -> list[float]:
        return [self.tokens, self.flops, self.data_wait_s, self.text_targets, self.image_slots]


def add_metrics(total: dict[str, Metric], metrics: dict[str, Metric]) -> None:
    """``total += metrics`` on the device."""
    for key, (s, c) in metrics.items():
        if key in total:
            total[key] = (total[key][0] + s, total[key][1] + c)
        else:
            total[key] = (s.detach().float(), c.detach().float())


class TrainStep:
    """Forward/backward over ``accum`` micro-batches, clip, optimizer and scheduler step, optional EMA.

    ``count(batch) -> FLOPs`` runs on the CPU batch; ``after_step(model)`` (the JanusFlow EMA) after the
    optimizer step.
    """

    def __init__(
        self,
        task: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        device: torch.device,
        accum: int,
        grad_clip: float,
        count: Callable[[Batch], float],
        after_step: Callable[[], None] | None = None,
    ) -> None:
        self.task, self.optimizer, self.scheduler = task, optimizer, scheduler
        self.device, self.accum, self.grad_clip = device, accum, grad_clip
        self.count, self.after_step = count, after_step
        self.params = [p for p in task.parameters() if p.requires_grad]
        self.sums: dict[str, Metric] = {}
        self.window = Window()

    def prepare(self, cpu: Batch) -> Batch:
        """Count the CPU batch's tokens and FLOPs (host work, before the transfer), then move it."""
        w = self.window
        w.tokens += int(cpu["attention_mask"].sum())
        w.text_targets += cpu["text_pos"].numel()
        w.image_slots += cpu["gen_slot_pos"].numel()
        w.flops += self.count(cpu)
        return to_device(cpu, self.device)

    def __call__(self, next_batch: Callable[[], Batch] | Iterator[Batch]) -> None:
        """One optimizer step; ``next_batch`` gives CPU batches (its time counts as data wait)."""
        fetch = next_batch if callable(next_batch) else lambda: next(next_batch)
        w = self.window
        for _ in range(self.accum):
            t0 = time.perf_counter()
            batch = self.prepare(fetch())
            w.data_wait_s += time.perf_counter() - t0
            loss, metrics = self.task(batch)
            (loss / self.accum).backward()
            add_metrics(self.sums, metrics)
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        add_metrics(self.sums, {"grad_norm": metric(norm)})
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()
        w.steps += 1

    def flush(self, global_batch: int, peak_flops: float | None = None) -> dict[str, float]:
        """Collective: the window's metrics and throughput, reduced over ranks; starts a new window."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        keys = sorted(self.sums)
        w = self.window
        device_part = [t for k in keys for t in self.sums[k]]
        host_part = torch.tensor(w.counters(), dtype=torch.float64, device=self.device)
        packed = torch.cat([torch.stack(device_part).double(), host_part]) if keys else host_part
        if world > 1:
            dist.all_reduce(packed)
        values = packed.tolist()  # the one transfer to the host
        wall = time.perf_counter() - w.started
        out = {k: values[2 * i] / values[2 * i + 1] for i, k in enumerate(keys) if values[2 * i + 1] > 0}
        tokens, flops, wait, text, image = values[2 * len(keys) :]
        steps = max(1, w.steps)
        achieved = flops / world / wall
        out.update(
            {
                "lr": self.scheduler.get_last_lr()[0],
                "step_time_s": wall / steps,
                "data_wait_s": wait / world / steps,
                "samples_per_s": global_batch * steps / wall,
                "tokens_per_s": tokens / wall,
                "tokens/text": text / steps,
                "tokens/image": image / steps,
                "tflops_per_s_per_device": achieved / 1e12,
            }
        )
        if peak_flops:
            out["mfu"] = achieved / peak_flops
        self.sums, self.window = {}, Window()
        return out
