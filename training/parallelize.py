"""Where the model runs: device mesh, FSDP2, activation checkpointing, torch.compile (torchtitan style).

The model stays a plain ``nn.Module``; these ``apply_*`` functions change it in place, in this order:
activation checkpointing -> compile -> FSDP (per decoder block, then the root).

Every worker shards, a single one too (a mesh of one device, as torchtitan does at shard degree 1): FSDP2's
MixedPrecisionPolicy is what gives bf16 compute over fp32 master weights, and one code path runs at every
world size. The root does not cast its inputs: each module that takes tensors from outside the model
(pixels, VAE latents, flow time steps) casts them to its compute dtype where they enter, and targets such
as the flow's velocity stay in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DEVICE_TYPES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(kw_only=True)
class ParallelConfig:
    device: str = "auto"
    """cuda (NCCL) or cpu (gloo); auto picks cuda when the worker has a GPU."""
    replicate: int = 1
    """HSDP: replicate groups (e.g. the number of nodes); shard within each group. 1 = plain FSDP."""
    mixed_precision: str = "auto"
    """bf16 (bf16 compute over fp32 weights, fp32 gradient reduction), fp32, or auto: bf16 on GPU, fp32 on
    CPU (bf16 works there too, for tests, but CPU bf16 matmuls are slow)."""
    activation_checkpointing: bool = False
    """Recompute each decoder block in the backward pass (memory for compute)."""
    compile: bool = False
    """torch.compile each decoder block."""
    compile_backend: str = "inductor"
    """torch.compile backend (aot_eager or eager to tell a compiler problem from a model one)."""
    reshard_after_forward: bool = True
    """FSDP: free gathered block parameters after forward (ZeRO-3); False keeps them (ZeRO-2-like)."""

    def __post_init__(self) -> None:
        if self.device not in DEVICE_TYPES:
            raise ValueError(f"parallel.device must be one of {DEVICE_TYPES}, got {self.device!r}")
        if self.replicate < 1:
            raise ValueError(f"parallel.replicate must be >= 1, got {self.replicate}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"parallel.mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")


def resolve_device_type(cfg: ParallelConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def compute_dtype(cfg: ParallelConfig, device_type: str) -> torch.dtype:
    """The dtype the model computes in (FSDP's param_dtype; frozen encoders on the GPU run in it too)."""
    if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return torch.float32


def init_process_group(device_type: str) -> None:
    """A process group of one when none exists (a single process outside Ray Train / torchrun), so a mesh
    can be built at world size 1 too."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


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


def apply_compile(blocks: list[nn.Module], backend: str = "inductor") -> None:
    """Compile each decoder block. Blocks share their code, so one compiled graph serves all of them.

    Compiled with dynamic shapes from the start: the rows of a packed batch, the number and length of its
    samples and its token count change from batch to batch, and marking them dynamic on the tensors does not
    survive FSDP2's pre-forward hook (it hands the block new tensors), so static compilation would recompile
    once per newly seen size, up to dynamo's limit."""
    for block in blocks:
        block.compile(backend=backend, dynamic=True)


def apply_fsdp(
    model: nn.Module,
    blocks: list[nn.Module],
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder block, then the root (which takes every remaining parameter).

    With ``param_dtype`` bf16, parameters are gathered and computed in bf16 while the sharded master weights,
    the optimizer and the gradient reduction stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    block_kwargs: dict = {"mesh": mesh}
    root_kwargs: dict = {"mesh": mesh}
    if param_dtype != torch.float32:
        block_kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        root_kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by the root's backward: keep them.
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **block_kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **root_kwargs)
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


def apply_parallelism(model: nn.Module, blocks: list[nn.Module], cfg: ParallelConfig, mesh: DeviceMesh) -> nn.Module:
    """Everything in the right order, on ``mesh`` (also a mesh of one device)."""
    apply_all_params_in_graph(model, blocks)
    if cfg.activation_checkpointing:
        blocks = apply_activation_checkpointing(blocks, model)
    if cfg.compile:
        apply_compile(blocks, cfg.compile_backend)
    apply_fsdp(
        model,
        blocks,
        mesh,
        param_dtype=compute_dtype(cfg, mesh.device_type),
        reshard_after_forward=cfg.reshard_after_forward,
    )
    return model
