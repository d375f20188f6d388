"""The step every worker runs, in this process at world size 1: a mesh of one, FSDP2, bf16 on the CPU too,
and no host sync between the batch and the optimizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from common.config import load_config
from tests.cpu_math import fast_cpu_math  # noqa: F401 - autouse, module scope
from tests.model.toy import ALL_TASKS, make_sample
from training.config import TrainConfig
from training.runner import StageRunner

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


@pytest.mark.parametrize("family", ["janus_pro", "janusflow"])
def test_compiled_blocks_compile_once_across_packed_batches(family: str, tmp_path: Path) -> None:
    """Packed batches differ in rows, sample count and sample lengths; the blocks must not recompile for each.
    dynamo decides recompiles before any backend runs, so its plain "eager" backend keeps this fast."""
    import random

    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    extra = ("parallel.compile=true", "parallel.compile_backend=eager", "stage.II.micro_batch=12")
    runner = _runner(tmp_path, family, "bf16", *extra)
    rng = random.Random(0)
    samples = [make_sample(t, i, vq_tokens=64) for i, t in enumerate(ALL_TASKS * 6)]
    rows: set[int] = set()

    def batches():
        while True:
            rng.shuffle(samples)
            rows.add(runner.collate(samples[:12])["input_ids"].shape[0])
            yield samples[:12]

    stream = batches()
    for _ in range(5):
        runner.step(stream)
    assert len(rows) >= 2, "the test needs batches of different shapes"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert runner.flush()["loss"] > 0
    torch._dynamo.reset()


def _device_params():
    gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, gpu])]


@pytest.mark.parametrize("device", _device_params())
def test_resume_continues_with_the_same_random_draws(device: str, tmp_path: Path) -> None:
    """JanusFlow draws t and noise on the training device: a checkpoint carries that device's RNG state, so
    a resumed run continues with the same draws (and losses) as one that never stopped."""
    from training.checkpoint import save_checkpoint

    overrides = ["model.family=janusflow", "model.pack=true", "model.max_len=300", "stage.II.global_batch=6"]
    overrides += ["stage_init=model", f"parallel.device={device}", "stage.II.lr=0.003"]

    def fresh() -> StageRunner:
        torch.manual_seed(0)
        cfg = load_config(TrainConfig, None, overrides)
        return StageRunner(cfg, "II", device=torch.device(device), init_weights=None, stage_dir=tmp_path / "run")

    runner, batches = fresh(), _batches()
    for _ in range(2):
        runner.step(batches)
    runner.flush()  # the window so far; what follows is compared step by step
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, runner.task, runner.optimizer, runner.scheduler, runner.state, runner.extra_state())
    saved_rng = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()
    straight = []
    for _ in range(3):
        runner.step(batches)
        straight.append(runner.flush()["loss/rf"])

    resumed = fresh()
    resumed.restore(ckpt)
    assert torch.equal(torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state(), saved_rng)
    batches = _batches()
    for _ in range(2):
        next(batches)  # the data position: the two micro-batches the first run had consumed
    again = []
    for _ in range(3):
        resumed.step(batches)
        again.append(resumed.flush()["loss/rf"])
    tol = 0.0 if device == "cpu" else 1e-3  # GPU index_add backward is not bitwise deterministic
    torch.testing.assert_close(torch.tensor(again), torch.tensor(straight), rtol=tol, atol=tol)
