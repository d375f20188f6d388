"""Three-stage training on a local Ray instance, 2 CPU workers, FSDP2 over gloo, the debug flavor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from common import faults
from common.config import load_config
from common.faults import Fault
from data_prep.schema import encode_sample
from data_prep.shards import write_tar
from model.build import build_model, resolve_family
from model.family import get_family
from model.flavors import get_flavor
from model.freeze import FREEZE_SCHEDULES, param_group
from model.weights import WEIGHTS_FILE
from tests.model.toy import ALL_TASKS, make_sample
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.stages import run_training, stage_dir

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage shards holding every task, 2 of each per 12 samples, so every global batch has them all."""
    root = tmp_path_factory.mktemp("stages")
    samples = [make_sample(ALL_TASKS[i % len(ALL_TASKS)], i) for i in range(48)]
    for stage in ("I", "II", "III"):
        for s in range(4):
            chunk = samples[s * 12 : (s + 1) * 12]
            write_tar(root / f"stage_{stage}" / f"stage_{stage}-{s:06d}.tar", [encode_sample(x) for x in chunk])
    return root


def _cfg(tmp: Path, data: Path, *overrides: str) -> TrainConfig:
    base = [
        f"data_root={data}",
        f"checkpoint.dir={tmp / 'ckpt'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5",
        "checkpoint.every_steps=2",
        "tracking.system_metrics_interval_s=0.5",
        *(f"stage.{s}.{k}" for s in ("I", "II", "III") for k in ("steps=2", "global_batch=12", "lr=0.001")),
    ]
    return load_config(TrainConfig, None, [*base, *overrides])


RESUMED = ["stage.I.steps=4", "scaling.max_failures=2"]
"""Stage I of the shared Janus-Pro run is 4 steps (checkpoints at 2 and 4): the killed-worker test reruns it with
a kill at step 3 and compares against it, so its losses and weights need no second clean run."""


@pytest.fixture(scope="module")
def three_stages(ray_local, stage_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """``get(family) -> (cfg, finals)``: each family's three-stage run, trained once per module and read by
    several tests (a three-stage run costs about a minute and a half on 2 cores)."""
    runs: dict[str, tuple[TrainConfig, dict]] = {}

    def get(family: str) -> tuple[TrainConfig, dict]:
        if family not in runs:
            extra = RESUMED if family == "janus_pro" else []
            tmp = tmp_path_factory.mktemp(family)
            names = [f"model.family={family}", f"name={family}", f"registry.name=toy-{family}"]
            cfg = _cfg(tmp, stage_data, *names, *extra)
            runs[family] = (cfg, run_training(cfg))
        return runs[family]

    return get


def _weights(cfg: TrainConfig, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(stage_dir(cfg, stage) / "final" / WEIGHTS_FILE))


def _check_freeze(family: str, stage: int, before: dict, after: dict) -> None:
    """Frozen groups are bit-identical; every group that trains moved."""
    trains = FREEZE_SCHEDULES[family][stage]
    moved: dict[str, bool] = {}
    for name, value in before.items():
        group = param_group(family, name)
        changed = not torch.equal(value, after[name])
        if group not in trains:
            assert not changed, f"stage {stage}: frozen {group} parameter {name} changed"
        moved[group] = moved.get(group, False) or changed
    for group in trains & set(moved):
        assert moved[group], f"stage {stage}: trainable group {group} did not change"


def _param_names(family: str) -> set[str]:
    model = build_model(get_flavor("debug"), family, device="meta")
    return {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("family", ["janus_pro", "janusflow"])
def test_three_stages_freeze_and_mlflow(family: str, three_stages) -> None:
    cfg, finals = three_stages(family)
    assert set(finals) == {"I", "II", "III"}
    names = _param_names(family)
    torch.manual_seed(cfg.seed)  # the stage I starting point, as the workers built it
    flavor = get_flavor("debug")
    start = {k: v for k, v in build_model(flavor, resolve_family(flavor, family)).state_dict().items() if k in names}
    previous = start
    for idx, stage in enumerate(("I", "II", "III"), start=1):
        weights = {k: v for k, v in _weights(cfg, stage).items() if k in names}
        assert set(weights) == names
        _check_freeze(family, idx, previous, weights)
        previous = weights
    # MLflow: the training parent run and one child per stage, with per-task losses and throughput.
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("janus-pipeline")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = runs[f"train-{family}"]
    for stage in ("I", "II", "III"):
        child = runs[f"stage_{stage}"]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "data_wait_s"} <= set(child.data.metrics)
        history = client.get_metric_history(child.info.run_id, "loss")
        assert [m.step for m in history] == list(range(1, cfg.stage[stage].steps + 1))
        assert int(child.data.params["trainable_params"]) > 0
        assert child.data.metrics["tflops_per_s_per_device"] > 0
        previews = {Path(a.path).suffix for a in client.list_artifacts(child.info.run_id, "previews")}
        assert previews == {".png", ".json"}
        # the export is the run's logged model (an MLflow pyfunc around it); each node sampled its machine
        (output,) = client.get_run(child.info.run_id).outputs.model_outputs
        logged = client.get_logged_model(output.model_id)
        assert logged.source_run_id == child.info.run_id and logged.tags["janus.stage"] == stage
        files = {Path(a.path).name for a in client.list_logged_model_artifacts(output.model_id)}
        assert "MLmodel" in files
        system = {k for k in child.data.metrics if k.startswith("system/node0/")}
        assert {"system/node0/cpu_utilization_percentage", "system/node0/system_memory_usage_megabytes"} <= system
    # Stage III's logged model is registered (tagged with its recipe), and the training run links to it.
    (version,) = client.search_model_versions(f"name = 'toy-{family}'")
    assert version.source == f"models:/{output.model_id}" and version.tags["janus.recipe"] == family
    assert parent.data.tags[f"janus.registered_model.toy-{family}"] == f"models:/toy-{family}/1"
    # The exported model of the last stage loads with its family's loader (stock transformers for Janus-Pro).
    export_dir = stage_dir(cfg, "III") / "export"
    spec = get_family(family)
    loaded = spec.load_export(export_dir)[0].state_dict()
    trained = _weights(cfg, "III")
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in trained.items()}
    if spec.keeps_ema:  # JanusFlow: the EMA weights, in the reference layout
        assert any(not torch.equal(loaded[k], trained[k]) for k in trained), "export should carry the EMA"
    else:  # Janus-Pro: stock transformers loads the trained weights
        from transformers import JanusForConditionalGeneration

        stock = JanusForConditionalGeneration.from_pretrained(export_dir)
        assert torch.equal(stock.state_dict()["lm_head.weight"], trained["lm_head.weight"])


def test_killed_worker_resumes_with_identical_losses(three_stages, stage_data: Path, tmp_path: Path) -> None:
    clean, _ = three_stages("janus_pro")  # its stage I: 4 steps, checkpoints at 2 and 4, nobody killed
    faulty = _cfg(tmp_path / "faulty", stage_data, "model.family=janus_pro", *RESUMED, "stages=[I]", "name=faulty")
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
    wa, wb = _weights(clean, "I"), _weights(faulty, "I")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)


def test_checkpoint_of_two_workers_loads_in_one(three_stages) -> None:
    cfg, _ = three_stages("janus_pro")
    ckpts = sorted(p for p in stage_dir(cfg, "I").glob("checkpoint_*") if p.is_dir())
    assert ckpts and len({p.name for p in ckpts[-1].glob("__*_0.distcp")}) == 2, "written by 2 ranks"
    flavor = get_flavor("debug")
    from model.build import build_task

    model = build_model(flavor, "janus_pro")
    task = build_task(model, flavor, cfg.model)
    state = load_checkpoint(ckpts[-1], task, None, None)  # one process, no process group
    assert (state.step, state.world_size) == (cfg.stage["I"].steps, 2)
    final = _weights(cfg, "I")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], final[k]) for k in final)
