"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), no pickle anywhere.

A checkpoint directory holds:
    .metadata, __{rank}_0.distcp     model + optimizer, sharded (DCP; loads at any world size)
    trainer_state.json               step, samples seen per rank, LR scheduler state (rank 0)
    rng_rank{r}.json                 each rank's torch / python / numpy RNG state

Every rank writes its own files into a local folder and hands it to ``ray.train.report``; Ray Train merges
the ranks' files into one checkpoint and registers it only when every rank has reported, so a crash in
the middle of a save never becomes the latest checkpoint. Keeping K and resuming by run name are Ray's.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """What a checkpoint holds besides tensors."""

    step: int = 0
    """Optimizer steps taken in this stage."""
    samples_seen: int = 0
    """Samples this rank has consumed from its data stream (all ranks consume equally)."""
    world_size: int = 1
    """World size that wrote the checkpoint."""
    scheduler: dict[str, Any] = field(default_factory=dict)
    """LR scheduler state_dict (JSON-safe)."""


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _json_safe_scheduler(sched: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    # LambdaLR keeps its lambdas out of state_dict (as None entries); everything else is numbers.
    return json.loads(json.dumps(sched.state_dict(), default=lambda _: None))


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Collective: every rank calls it with its own local ``path``; returns the path.

    ``extra`` holds more (sharded) tensor groups to save, e.g. ``{"ema": shadow weights}``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, **(extra or {})}, checkpoint_id=str(path))
    state.world_size = dist.get_world_size() if dist.is_initialized() else 1
    state.scheduler = _json_safe_scheduler(scheduler)
    if rank == 0:
        (path / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    (path / f"rng_rank{rank}.json").write_text(json.dumps(_rng_state()))
    return path


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> TrainState:
    """Collective: load into an already-parallelised model; works at another world size (DCP reshards).

    ``extra`` groups (as given to :func:`save_checkpoint`) are filled in place."""
    path = Path(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd, **(extra or {})}, checkpoint_id=str(path))
        set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={})
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd, **(extra or {})}, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    state = TrainState(**json.loads((path / STATE_FILE).read_text()))
    if scheduler is not None and state.scheduler:
        scheduler.load_state_dict(state.scheduler)
    rng_file = path / f"rng_rank{rank}.json"
    if rng_file.is_file():  # absent when resuming at a larger world size: that rank keeps its seed
        _set_rng_state(json.loads(rng_file.read_text()))
    return state


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole unsharded model on CPU, on rank 0 (empty elsewhere)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
