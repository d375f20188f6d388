"""Where the model runs: device mesh, FSDP2, activation checkpointing, torch.compile (torchtitan style).

The model stays a plain ``nn.Module``; these ``apply_*`` functions change it in place, in this order:
activation checkpointing -> compile -> FSDP (per decoder block, then the root).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DEVICE_TYPES = ("auto", "cpu", "cuda")


@dataclass(kw_only=True)
class ParallelConfig:
    device: str = "auto"
    """cuda (NCCL) or cpu (gloo); auto picks cuda when the worker has a GPU."""
    replicate: int = 1
    """HSDP: replicate groups (e.g. the number of nodes); shard within each group. 1 = plain FSDP."""
    mixed_precision: bool = True
    """bf16 parameters/compute with fp32 gradient reduction on GPU; always fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute each decoder block in the backward pass (memory for compute)."""
    compile: bool = False
    """torch.compile each decoder block."""
    reshard_after_forward: bool = True
    """FSDP: free gathered block parameters after forward (ZeRO-3); False keeps them (ZeRO-2-like)."""

    def __post_init__(self) -> None:
        if self.device not in DEVICE_TYPES:
            raise ValueError(f"parallel.device must be one of {DEVICE_TYPES}, got {self.device!r}")
        if self.replicate < 1:
            raise ValueError(f"parallel.replicate must be >= 1, got {self.replicate}")


def resolve_device_type(cfg: ParallelConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def build_device_mesh(device_type: str, world_size: int, replicate: int = 1) -> DeviceMesh:
    """A 1-D ("shard") mesh, or 2-D ("replicate", "shard") for HSDP. Always explicit about its device."""
    if world_size % replicate:
        raise ValueError(f"parallel.replicate={replicate} does not divide the world size {world_size}")
    if replicate == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard"))


def apply_activation_checkpointing(blocks: list[nn.Module], parent: nn.Module) -> list[nn.Module]:
    """Wrap every decoder block (in place, inside ``parent``) so its activations are recomputed in backward.

    Returns the wrappers, which are what FSDP must shard from then on."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    wrapped = {id(b): checkpoint_wrapper(b, preserve_rng_state=False) for b in blocks}
    for module in list(parent.modules()):
        for name, child in list(module.named_children()):
            if id(child) in wrapped:
                module.register_module(name, wrapped[id(child)])
    return [wrapped[id(b)] for b in blocks]


def apply_compile(blocks: list[nn.Module]) -> None:
    for block in blocks:
        block.compile()


def apply_fsdp(
    model: nn.Module,
    blocks: list[nn.Module],
    mesh: DeviceMesh,
    *,
    mixed_precision: bool,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder block, then the root (which takes every remaining parameter)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by the root's backward: keep them.
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model


def apply_all_params_in_graph(task: nn.Module, blocks: list[nn.Module]) -> None:
    """Make every trainable parameter outside the decoder blocks part of every rank's graph.

    FSDP2 reduce-scatters only the gradients that exist; when one rank's micro-batch has no generation
    sample (say) and another's has, their sets differ and the collective breaks. A zero-weighted touch of
    each such parameter gives it a (zero) gradient on every rank without changing loss or values. The task
    must return ``(loss, metrics)``; the hook runs inside the root's forward, while parameters are gathered.
    """
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    names = [n for n, p in task.named_parameters() if p.requires_grad and id(p) not in in_blocks]

    def hook(module: nn.Module, args: object, output: tuple) -> tuple:
        loss, metrics = output
        touch = sum(module.get_parameter(n).reshape(-1)[:1].sum() for n in names)
        return loss + 0.0 * touch, metrics

    if names:
        task.register_forward_hook(hook)


def apply_parallelism(
    model: nn.Module, blocks: list[nn.Module], cfg: ParallelConfig, mesh: DeviceMesh | None
) -> nn.Module:
    """Everything in the right order; ``mesh=None`` (a single process) skips FSDP."""
    device_type = mesh.device_type if mesh is not None else resolve_device_type(cfg)
    if mesh is not None:
        apply_all_params_in_graph(model, blocks)
    if cfg.activation_checkpointing:
        blocks = apply_activation_checkpointing(blocks, model)
    if cfg.compile:
        apply_compile(blocks)
    if mesh is not None:
        apply_fsdp(
            model,
            blocks,
            mesh,
            mixed_precision=cfg.mixed_precision and device_type == "cuda",
            reshard_after_forward=cfg.reshard_after_forward,
        )
    return model
