"""The step every worker runs, in this process at world size 1: a mesh of one, FSDP2, bf16 on the CPU too,
and no host sync between the batch and the optimizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from pipelines.config import load_config
from pipelines.train_config import TrainConfig
from pipelines.train_loop import StageRunner
from tests.cpu_math import fast_cpu_math  # noqa: F401 - autouse, module scope
from tests.model.toy import ALL_TASKS, make_sample

SYNCING_OPS = {
    "aten._local_scalar_dense.default",  # .item(), float(), int(), bool(), .tolist()
    "aten.nonzero.default",  # boolean-mask indexing, masked_select
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor",  # output size from a tensor
    "aten.equal.default",
    "aten.is_nonzero.default",
}
"""Ops that make the host wait for the device (they need a value or an output size computed there)."""


class HostSyncGuard(TorchDispatchMode):
    """Records every op that would wait on the device."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNCING_OPS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module", autouse=True)
def single_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _runner(tmp_path: Path, family: str, precision: str, *extra: str) -> StageRunner:
    cfg = load_config(
        TrainConfig,
        None,
        [
            f"model.family={family}",
            "model.pack=true",
            "model.max_len=300",
            "parallel.device=cpu",
            f"parallel.mixed_precision={precision}",
            "stage.II.global_batch=12",
            "stage.II.micro_batch=6",
            "stage_init=model",
            *extra,
        ],
    )
    return StageRunner(cfg, "II", device=torch.device("cpu"), init_weights=None, stage_dir=tmp_path / precision)


def _batches() -> Iterator[list]:
    samples = [make_sample(t, i, vq_tokens=64) for i, t in enumerate(ALL_TASKS * 2)]
    while True:
        for i in range(0, len(samples), 6):
            yield samples[i : i + 6]


def _block_output_dtypes(runner: StageRunner) -> list[torch.dtype]:
    from model.build import decoder_blocks

    seen: list[torch.dtype] = []
    decoder_blocks(runner.model)[0].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("family", ["janus_pro", "janusflow"])
def test_bf16_fsdp_step_on_cpu_follows_the_fp32_step(family: str, tmp_path: Path) -> None:
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        runner = _runner(tmp_path, family, precision)
        assert runner.world == 1 and dist.is_initialized()
        assert all(type(p).__name__ == "DTensor" for p in runner.task.parameters())  # sharded, a mesh of one
        assert all(p.dtype == torch.float32 for p in runner.task.parameters())  # fp32 master weights
        dtypes = _block_output_dtypes(runner)
        before = {n: p.detach().full_tensor().clone() for n, p in runner.task.named_parameters() if p.requires_grad}
        batches, history = _batches(), []
        for _ in range(3):
            runner.step(batches)
            history.append(runner.flush())
        assert set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float32}
        after = dict(runner.task.named_parameters())
        moved = [n for n, v in before.items() if not torch.equal(v, after[n].detach().full_tensor())]
        assert len(moved) > 0.9 * len(before)
        losses[precision] = [m["loss"] for m in history]
        assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in history)
        assert history[-1]["loss"] < history[0]["loss"]
    torch.testing.assert_close(torch.tensor(losses["bf16"]), torch.tensor(losses["fp32"]), rtol=1e-2, atol=1e-2)


def _unguarded(fn):
    def call(*args, **kwargs):
        with _disable_current_modes():
            return fn(*args, **kwargs)

    return call


@pytest.mark.parametrize("family", ["janus_pro", "janusflow"])
def test_step_never_waits_on_the_device(family: str, tmp_path: Path) -> None:
    runner = _runner(tmp_path, family, "bf16")
    step = runner.train_step
    # Host work by design, left unguarded: collating and counting the CPU batch before its transfer, and
    # AdamW's step counter, which lives on the CPU off CUDA (the optimizer is fused on CUDA).
    runner.collate = _unguarded(runner.collate)
    step.prepare = _unguarded(step.prepare)
    step.optimizer.step = _unguarded(step.optimizer.step)
    batches = _batches()
    guard = HostSyncGuard()
    with guard:
        for _ in range(2):
            runner.step(batches)
    assert guard.seen == []
    metrics = runner.flush()  # the one sync, at a log step
    assert {"loss", "grad_norm", "tokens_per_s", "step_time_s"} <= set(metrics)
