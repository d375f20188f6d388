"""A shortened demo, end to end in a fresh working directory: every artefact and every MLflow run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray]

SMALL_WORLD = [
    "toyworld.digits_max=200",
    "toyworld.shapes.train=90",
    "toyworld.shapes.eval=10",
    "toyworld.charts_docs.train=40",
    "toyworld.charts_docs.eval=5",
    "toyworld.photos.train=20",
    "toyworld.photos.eval=4",
    "toyworld.text.train=60",
    "toyworld.text.eval=5",
]
SHORT_TRAINING = [
    *(f"mix_overrides=[{','.join(f'stages.stage{i}.steps=2' for i in (1, 2, 3))}]",),
    f"train_overrides=[{','.join(f'stage.{s}.steps=2' for s in ('I', 'II', 'III'))},checkpoint.every_steps=1]",
]


def test_short_demo_end_to_end(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pipelines.demo",
        "--config",
        str(REPO / "configs/demo.yaml"),
        *SMALL_WORLD,
        *SHORT_TRAINING,
        "ray_num_cpus=2",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out = tmp_path / "outputs"
    assert "demo finished" in done.stdout and str(out) in done.stdout
    # Every step left its artefacts.
    assert json.loads((out / "toyworld" / "toyworld.json").read_text())["sources"]["digits"]["counts"]["train"] == 180
    for source in ("digits", "shapes", "charts_docs", "photos", "text"):
        manifest = json.loads((out / "curated" / source / "manifest.json").read_text())
        assert manifest["kept"] + manifest["rejected"] == manifest["inputs"] > 0
    for stage in ("stage1", "stage2", "stage3"):
        manifest = json.loads((out / "stages" / "toy_janus_pro" / stage / "manifest.json").read_text())
        assert manifest["samples"] > 0
    for stage in ("I", "II", "III"):
        final = out / "checkpoints" / f"debug_janus_pro-stage_{stage}" / "final"
        assert json.loads((final / "stage_done.json").read_text())["steps"] == 2
    # MLflow: the demo's parent run holds every job's run; training stages nest under the training run.
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("janus-pipeline").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["demo"].info.run_id
    for name in ("toyworld", "curate", "mix", "train-debug_janus_pro"):
        assert by_name[name].data.tags.get("mlflow.parentRunId") == parent, name
    train_id = by_name["train-debug_janus_pro"].info.run_id
    for stage in ("I", "II", "III"):
        assert by_name[f"stage_{stage}"].data.tags["mlflow.parentRunId"] == train_id
    assert all(r.info.status == "FINISHED" for r in runs)
