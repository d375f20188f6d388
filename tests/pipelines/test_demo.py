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
    f"train_overrides=[{','.join(f'stage.{s}.steps=2' for s in ('I', 'II', 'III'))},checkpoint.every_steps=1,"
    "tracking.system_metrics_interval_s=0.5]",
    "fit_overrides=[vq.steps=2,vae.steps=2,max_images_per_source=16,vision.steps=2,vision.max_pairs_per_source=16]",
    "eval_overrides=[num_samples=3,digits_per_class=1,shapes_per_prompt=1]",
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
    for source in ("digits", "shapes", "charts_docs", "photos", "text", "digits_qa", "shapes_qa"):
        manifest = json.loads((out / "curated" / source / "manifest.json").read_text())
        assert manifest["kept"] + manifest["rejected"] == manifest["inputs"] > 0
    for stage in ("stage1", "stage2", "stage3"):
        manifest = json.loads((out / "stages" / "toy_janus_pro" / stage / "manifest.json").read_text())
        assert manifest["samples"] > 0
    for stage in ("I", "II", "III"):
        final = out / "checkpoints" / f"debug_janus_pro-stage_{stage}" / "final"
        assert json.loads((final / "stage_done.json").read_text())["steps"] == 2
    # Only the tokenizer of the family that trains is fitted, and training used it.
    assert (out / "tokenizers" / "vq" / "config.json").is_file() and not (out / "tokenizers" / "vae").exists()
    resolved = (out / "checkpoints" / "debug_janus_pro" / "config.resolved.yaml").read_text()
    assert f"vq_path: {(out / 'tokenizers' / 'vq').resolve()}" in resolved  # absolute: workers run elsewhere
    # ... and the SigLIP pre-fitted on the toy world's texts, graded on held-out retrieval per source.
    assert f"vision_path: {(out / 'tokenizers' / 'vision').resolve()}" in resolved
    fit_report = json.loads((out / "tokenizers" / "fit_tokenizers.json").read_text())
    for source in ("digits", "shapes", "charts_docs", "photos"):
        assert 0.0 <= fit_report[f"vision/heldout_top1/{source}"] <= 1.0, source
    # The evaluation graded the last stage: understanding per question type, both generation judges.
    report = json.loads((out / "eval" / "janus_pro" / "eval.json").read_text())
    assert report["checkpoint"].endswith("debug_janus_pro-stage_III/final")
    results = report["results"]
    graded = ("understanding/digit", "understanding/shape_colour", "generation/digits", "generation/shapes_colour")
    for metric in graded:
        assert 0.0 <= results[metric]["accuracy"] <= 1.0 and results[metric]["n"] > 0, metric
    assert (out / "eval" / "janus_pro" / "digits_grid.png").is_file()
    summary = (out / "summary.txt").read_text()
    assert "generation/digits" in summary and "understanding/digit" in summary
    assert "fixed-position artefact in generated digits" in summary
    assert "generation/digits" in done.stdout and "mlflow ui --backend-store-uri" in done.stdout
    # MLflow: the demo's parent run holds every job's run; training stages nest under the training run.
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("janus-pipeline").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["demo"].info.run_id
    for name in ("toyworld", "curate", "fit_tokenizers", "mix", "train-debug_janus_pro", "evaluate"):
        assert by_name[name].data.tags.get("mlflow.parentRunId") == parent, name
    train_id = by_name["train-debug_janus_pro"].info.run_id
    for stage in ("I", "II", "III"):
        assert by_name[f"stage_{stage}"].data.tags["mlflow.parentRunId"] == train_id
    assert all(r.info.status == "FINISHED" for r in runs)
    digits_accuracy = by_name["demo"].data.metrics["janus_pro/generation/digits/accuracy"]
    assert digits_accuracy == results["generation/digits"]["accuracy"]
    assert "summary.txt" in {a.path for a in client.list_artifacts(parent)}
    # The driver showed training as it went (a line per logged step) and a table at the end of each stage.
    assert "stage II  step 2/2  loss" in done.stderr and "stage III: steps 1..2" in done.stderr  # the job's log
    _check_lineage_and_registry(client, by_name, out)


def _check_lineage_and_registry(client: MlflowClient, by_name: dict, out: Path) -> None:
    """From the demo's registered model back to the raw toy-world sources, through MLflow's API alone."""
    exp = client.get_experiment_by_name("janus-pipeline").experiment_id
    uri = by_name["demo"].data.tags["janus.registered_model.janus-toy-janus_pro"]
    name, version = uri.removeprefix("models:/").split("/")
    registered = client.get_model_version(name, version)
    model = client.get_logged_model(registered.source.removeprefix("models:/"))
    assert registered.tags["janus.stage"] == "III" and registered.tags["janus.data_digest"]
    assert model.source_run_id == by_name["stage_III"].info.run_id
    assert any(m.key.startswith("janus_pro/") or m.key.startswith("understanding/") for m in model.metrics)

    def datasets(run_id: str, context: str) -> list:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        return [d.dataset for d in inputs if {t.key: t.value for t in d.tags}["mlflow.data.context"] == context]

    def writer(dataset) -> str:
        runs = client.search_runs([exp], f"dataset.digest = '{dataset.digest}'")
        (run,) = [r for r in runs if dataset.digest in {d.digest for d in datasets(r.info.run_id, "output")}]
        return run.info.run_id

    (trained_on,) = datasets(model.source_run_id, "training")
    assert (
        trained_on.name == "stages/toy_janus_pro/stage3" and trained_on.digest == registered.tags["janus.data_digest"]
    )
    mix_run = writer(trained_on)
    assert mix_run == by_name["mix"].info.run_id
    curated = datasets(mix_run, "input")
    assert {d.name for d in curated} >= {"curated/digits_qa", "curated/shapes"}
    curate_runs = {writer(d) for d in curated}
    assert curate_runs == {by_name["curate"].info.run_id}
    sources = {d.name for d in datasets(curate_runs.pop(), "source")}
    assert {f"source/{d.name.removeprefix('curated/')}" for d in curated} <= sources
    system = by_name["stage_III"].data.metrics
    assert any(k.startswith("system/node0/") for k in system)
