"""Fixtures of the three-stage training tests: a module-scoped local Ray, stage shards holding every task, and
each family's three-stage run (trained once per module that asks for it), with the checks they share.

The two families' runs live in two test modules so that parallel test workers can train them side by side."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from common.config import load_config
from data_prep.schema import encode_sample
from data_prep.shards import write_tar
from model.build import build_model, resolve_family
from model.family import get_family
from model.flavors import get_flavor
from model.freeze import FREEZE_SCHEDULES, param_group
from model.weights import WEIGHTS_FILE
from tests.data_prep.curate_fixtures import ray_local  # noqa: F401 - the module's local Ray
from tests.model.toy import ALL_TASKS, make_sample
from training.config import TrainConfig
from training.stages import run_training, stage_dir


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


def train_cfg(tmp: Path, data: Path, *overrides: str) -> TrainConfig:
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
def three_stages(
    ray_local,  # noqa: F811
    stage_data: Path,
    tmp_path_factory: pytest.TempPathFactory,
):
    """``get(family) -> (cfg, finals)``: each family's three-stage run, trained once per module and read by
    several tests (a three-stage run costs about a minute and a half on 2 cores)."""
    runs: dict[str, tuple[TrainConfig, dict]] = {}

    def get(family: str) -> tuple[TrainConfig, dict]:
        if family not in runs:
            extra = RESUMED if family == "janus_pro" else []
            tmp = tmp_path_factory.mktemp(family)
            names = [f"model.family={family}", f"name={family}", f"registry.name=toy-{family}"]
            cfg = train_cfg(tmp, stage_data, *names, *extra)
            runs[family] = (cfg, run_training(cfg))
        return runs[family]

    return get


def stage_weights(cfg: TrainConfig, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(stage_dir(cfg, stage) / "final" / WEIGHTS_FILE))


def check_freeze(family: str, stage: int, before: dict, after: dict) -> None:
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


def param_names(family: str) -> set[str]:
    model = build_model(get_flavor("debug"), family, device="meta")
    return {n for n, _ in model.named_parameters()}


def check_three_stages(family: str, three_stages) -> None:
    """Each stage froze what its schedule freezes; MLflow holds the parent run, a child per stage with its
    metrics, previews, logged model and system metrics; the last stage is registered and its export loads."""
    cfg, finals = three_stages(family)
    assert set(finals) == {"I", "II", "III"}
    names = param_names(family)
    torch.manual_seed(cfg.seed)  # the stage I starting point, as the workers built it
    flavor = get_flavor("debug")
    start = {k: v for k, v in build_model(flavor, resolve_family(flavor, family)).state_dict().items() if k in names}
    previous = start
    for idx, stage in enumerate(("I", "II", "III"), start=1):
        weights = {k: v for k, v in stage_weights(cfg, stage).items() if k in names}
        assert set(weights) == names
        check_freeze(family, idx, previous, weights)
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
    trained = stage_weights(cfg, "III")
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in trained.items()}
    if spec.keeps_ema:  # JanusFlow: the EMA weights, in the reference layout
        assert any(not torch.equal(loaded[k], trained[k]) for k in trained), "export should carry the EMA"
    else:  # Janus-Pro: stock transformers loads the trained weights
        from transformers import JanusForConditionalGeneration

        stock = JanusForConditionalGeneration.from_pretrained(export_dir)
        assert torch.equal(stock.state_dict()["lm_head.weight"], trained["lm_head.weight"])
