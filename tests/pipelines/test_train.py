"""Three-stage training on a local Ray instance, 2 CPU workers, FSDP2 over gloo, the debug flavor: Janus-Pro's run
(JanusFlow's is in test_train_janusflow.py), a worker killed mid-stage, a checkpoint of two ranks read by one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common import faults
from common.faults import Fault
from model.build import build_model
from model.flavors import get_flavor
from tests.pipelines.train_fixtures import (  # noqa: F401 - fixtures
    RESUMED,
    check_three_stages,
    ray_local,
    stage_data,
    stage_weights,
    three_stages,
    train_cfg,
)
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.stages import run_training, stage_dir

pytestmark = pytest.mark.ray


def test_three_stages_freeze_and_mlflow(three_stages) -> None:  # noqa: F811
    check_three_stages("janus_pro", three_stages)


def test_killed_worker_resumes_with_identical_losses(three_stages, stage_data: Path, tmp_path: Path) -> None:  # noqa: F811
    clean, _ = three_stages("janus_pro")  # its stage I: 4 steps, checkpoints at 2 and 4, nobody killed
    faulty = train_cfg(tmp_path / "faulty", stage_data, "model.family=janus_pro", *RESUMED, "stages=[I]", "name=faulty")
    # Ray (the module's fixture) started before the drill was armed: it reaches the workers via their runtime_env.
    marker = tmp_path / "fault_killed_rank1_after_step3"
    drill = Fault("train.step_end", "kill", when={"stage": "I", "rank": 1, "step": 3}, once=str(marker))
    with faults.arm(drill):
        run_training(faulty)
    assert "pid" in marker.read_text(), "the drill did not fire"

    def losses(cfg: TrainConfig) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for line in (stage_dir(cfg, "I") / "logs" / "rank0.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "metrics" and "loss" in rec["metrics"]:
                out.setdefault(rec["step"], []).append(rec["metrics"]["loss"])
        return out

    a, b = losses(clean), losses(faulty)
    assert all(len(a[step]) == 1 for step in (1, 2, 3, 4)), f"the clean run ran each step once: {a}"
    assert len(b[3]) == 2, "step 3 ran before the kill and again after the resume from step 2"
    for step in (1, 2, 3, 4):
        assert b[step][-1] == pytest.approx(a[step][-1], rel=1e-6), f"step {step}: {b[step]} vs {a[step]}"
    wa, wb = stage_weights(clean, "I"), stage_weights(faulty, "I")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)


def test_checkpoint_of_two_workers_loads_in_one(three_stages) -> None:  # noqa: F811
    cfg, _ = three_stages("janus_pro")
    ckpts = sorted(p for p in stage_dir(cfg, "I").glob("checkpoint_*") if p.is_dir())
    assert ckpts and len({p.name for p in ckpts[-1].glob("__*_0.distcp")}) == 2, "written by 2 ranks"
    flavor = get_flavor("debug")
    from model.build import build_task

    model = build_model(flavor, "janus_pro")
    task = build_task(model, flavor, cfg.model)
    state = load_checkpoint(ckpts[-1], task, None, None)  # one process, no process group
    assert (state.step, state.world_size) == (cfg.stage["I"].steps, 2)
    final = stage_weights(cfg, "I")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], final[k]) for k in final)
