"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), no pickle anywhere.

A checkpoint directory holds:
    .metadata, __{rank}_0.distcp     model + optimizer, sharded (DCP; loads at any world size)
    trainer_state.json               step, samples seen per rank, LR scheduler state (rank 0)
    rng_rank{r}.json                 each rank's torch / python / numpy (and CUDA device) RNG state

Every rank writes its own files into a local folder and hands it to ``ray.train.report``; Ray Train merges
the ranks' files into one checkpoint and registers it only when every rank has reported, so a crash in
the middle of a save never becomes the latest checkpoint. Keeping K and resuming by run name are Ray's.
Ray registers a checkpoint only when its controller next polls the workers, though: a job killed in that
window loses a checkpoint that is complete in storage. So a restarted stage resumes from
:func:`latest_complete_checkpoint`, the newest folder whose files are all there at the lengths the DCP
metadata records (Ray's registered checkpoint is always among them).

DCP itself unpickles: ``.metadata`` with ``pickle.load`` and non-tensor items with ``torch.load(weights_only=
False)``. Loading goes through :class:`SafeFileSystemReader` (only DCP's own metadata classes may be named)
and :class:`SafeLoadPlanner` (``weights_only=True``), so a checkpoint we did not write cannot run code.
"""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

STATE_FILE = "trainer_state.json"
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    *(("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
    ("collections", "OrderedDict"),
}
"""What DCP's ``.metadata`` pickle may name (besides torch dtypes): its own plain records, nothing callable."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file that would run code or build objects other than tensors and DCP records on load."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader, except that ``.metadata`` is unpickled with an allow-list of DCP's own classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, AttributeError, ImportError, EOFError) as exc:
                raise UnsafeCheckpointError(f"{path}: refused to load: {exc}") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor items load with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            why = next((ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler error" in ln), str(exc))
            raise UnsafeCheckpointError(f"checkpoint item {fqn!r}: refused to load: {why}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def dcp_load(state_dict: dict[str, Any], path: str | Path) -> None:
    """``dcp.load`` through the safe reader and planner; a refused file raises :class:`UnsafeCheckpointError`
    (DCP would wrap it into a CheckpointException per rank)."""
    reader = SafeFileSystemReader(str(path))
    reader.read_metadata()  # refuse unsafe metadata before DCP reads it and wraps the error
    try:
        dcp.load(state_dict, storage_reader=reader, planner=SafeLoadPlanner())
    except CheckpointException as exc:
        for failure in exc.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure  # DCP keeps (exception, traceback)
            if isinstance(inner, UnsafeCheckpointError):
                raise inner from None
        raise


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
    """This rank's RNG states; with CUDA also the current device's (JanusFlow draws t and noise there)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():  # absent when the checkpoint was written on CPUs
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _json_safe_scheduler(sched: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    # LambdaLR keeps its lambdas out of state_dict (as None entries); everything else is numbers.
    return json.loads(json.dumps(sched.state_dict(), default=lambda _: None))


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a complete checkpoint folder: every file its ranks write is there, and every tensor and
    item the DCP metadata lists lies within its file; None for a partial (or foreign) folder."""
    path = Path(path)
    try:
        metadata = SafeFileSystemReader(str(path)).read_metadata()
        state = TrainState(**json.loads((path / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError, UnsafeCheckpointError):
        return None
    if not all((path / f"rng_rank{r}.json").is_file() for r in range(state.world_size)):
        return None
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in ends.items():
        if not (path / name).is_file() or (path / name).stat().st_size < end:
            return None
    return state.step


def latest_complete_checkpoint(folder: str | Path, pattern: str = "checkpoint_*") -> Path | None:
    """The complete checkpoint of the highest step under ``folder`` (Ray's run folder), or None."""
    best: tuple[int, str] | None = None
    for path in Path(folder).glob(pattern):
        step = checkpoint_step(path) if path.is_dir() else None
        if step is not None and (best is None or (step, path.name) > best):
            best = (step, path.name)
    return Path(folder) / best[1] if best else None


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
        dcp_load({"model": model_sd, **(extra or {})}, path)
        set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={})
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp_load({"model": model_sd, "optim": optim_sd, **(extra or {})}, path)
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
