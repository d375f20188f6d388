"""Tracker backends against a real MLflow store (sqlite file) and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from common.tracking import (
    PARENT_ENV,
    JsonlTracker,
    TrackingConfig,
    build_tracker,
    pipeline_run,
    resolve_uri,
    system_metrics,
)


def _runs(uri: str) -> dict[str, object]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("janus-pipeline")
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def _exercise(cfg: TrackingConfig, tmp_path: Path) -> str:
    with pipeline_run(cfg, "pipeline") as parent:
        assert os.environ[PARENT_ENV] == parent.run_id
        with build_tracker(cfg, "curate", jsonl_path=tmp_path / "curate.jsonl") as child:
            child.log_params({"seed": 0, "sources": "digits,shapes"})
            child.log_metrics({"kept": 10, "rejected/corrupt": 2}, step=0)
            child.log_metrics({"kept": 12, "nan": float("nan")}, step=1)
            child.log_dict({"a": 1}, "reports/summary.json")
            child.log_image(Image.new("RGB", (4, 4)), "grids/kept.png")
        # A restarted stage with the same run key continues its run instead of duplicating it.
        first = build_tracker(cfg, "stage_I", run_key="demo/stage_I")
        first.log_metrics({"loss": 2.0}, step=1)
        first.close("FAILED")
        again = build_tracker(cfg, "stage_I", run_key="demo/stage_I")
        again.log_metrics({"loss": 1.0}, step=2)
        again.close()
        assert first.run_id == again.run_id
    assert PARENT_ENV not in os.environ
    return parent.run_id


def _check(uri: str, parent_id: str) -> None:
    runs = _runs(uri)
    assert set(runs) == {"pipeline", "curate", "stage_I"}
    curate, stage = runs["curate"], runs["stage_I"]
    assert curate.data.tags["mlflow.parentRunId"] == parent_id == stage.data.tags["mlflow.parentRunId"]
    assert curate.data.params == {"seed": "0", "sources": "digits,shapes"}
    assert curate.data.metrics["kept"] == 12 and "nan" not in curate.data.metrics
    client = MlflowClient(uri)
    history = client.get_metric_history(stage.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
    assert stage.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(curate.info.run_id, "reports")}
    arts |= {a.path for a in client.list_artifacts(curate.info.run_id, "grids")}
    assert arts == {"reports/summary.json", "grids/kept.png"}


def _manifest(path: Path, **fields: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields, sort_keys=True))
    return path


def _exercise_lineage(cfg: TrackingConfig, tmp_path: Path) -> str:
    """curate -> mix -> a training stage that logs a model -> the registry, as the jobs record them."""
    from common.lineage import curated_dataset, register_model, source_dataset, stage_dataset
    from model.build import build_model
    from model.export import export_janus_pro
    from model.flavors import get_flavor
    from model.inference import save_mlflow_model
    from model.tokenizer import build_debug_tokenizer

    curated = _manifest(tmp_path / "curated" / "digits" / "manifest.json", source="digits", inputs=5, kept=4)
    stage = _manifest(tmp_path / "stages" / "toy" / "stage3" / "manifest.json", recipe="toy", samples=4)
    with pipeline_run(cfg, "lineage"):
        with build_tracker(cfg, "curate") as curate:
            curate.log_datasets(
                [source_dataset("digits", {"path": str(tmp_path), "kind": "x"}, [("a.png", 3)])], "source"
            )
            curate.log_datasets([curated_dataset(curated)], "output")
        with build_tracker(cfg, "mix") as mix:
            mix.log_datasets([curated_dataset(curated)], "input")
            mix.log_datasets([stage_dataset(stage)], "output")
        with build_tracker(cfg, "stage_III") as train, system_metrics(cfg, train.run_id, "node0"):
            train.log_datasets([stage_dataset(stage)], "training")
            export = export_janus_pro(
                build_model(get_flavor("debug"), "janus_pro"), build_debug_tokenizer(), tmp_path / "export"
            )
            model_id = train.log_model(
                save_mlflow_model(export, tmp_path / "mlmodel"), "toy-stage_III", tags={"janus.stage": "III"}
            )
            time.sleep(1.5)  # a few system metric samples
        with build_tracker(cfg, "evaluate") as evaluate:
            evaluate.log_model_metrics(model_id, {"generation/digits/accuracy": 0.5})
    return register_model(cfg, "toy", model_id, {"janus.recipe": "toy"})


def _check_lineage(uri: str, registered: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Walk from the registered model back to the raw source through MLflow's API alone; load and sample it."""
    import mlflow

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("janus-pipeline").experiment_id
    version = client.get_model_version("toy", registered.rsplit("/", 1)[-1])
    assert version.tags["janus.recipe"] == "toy"
    model = client.get_logged_model(version.model_id or version.source.removeprefix("models:/"))
    assert model.metrics[0].key == "generation/digits/accuracy" and model.metrics[0].value == 0.5

    def datasets(run_id: str, context: str) -> list:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        return [d.dataset for d in inputs if {t.key: t.value for t in d.tags}.get("mlflow.data.context") == context]

    def writer(dataset) -> str:
        """The run that logged ``dataset`` as its output (the search matches runs that logged the digest at all)."""
        found = client.search_runs([exp], f"dataset.digest = '{dataset.digest}'")
        ids = [r.info.run_id for r in found if dataset.digest in {d.digest for d in datasets(r.info.run_id, "output")}]
        assert len(ids) == 1, dataset.name
        return ids[0]

    (trained_on,) = datasets(model.source_run_id, "training")
    assert trained_on.name == "stages/toy/stage3"
    mix_run = writer(trained_on)
    (curated,) = datasets(mix_run, "input")
    (source,) = datasets(writer(curated), "source")
    assert (curated.name, source.name) == ("curated/digits", "source/digits")
    system = client.get_run(model.source_run_id).data.metrics
    assert "system/node0/cpu_utilization_percentage" in system
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: uri)
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(registered)
    out = loaded.predict(
        {"prompt": ["a red square", ""], "question": ["", "What is it?"]}, params={"max_new_tokens": 3}
    )
    image = Image.open(io.BytesIO(base64.b64decode(out["image"][0])))
    assert image.size == (64, 64) and isinstance(out["answer"][1], str) and not isinstance(out["image"][1], str)


def test_sqlite_store_parent_children_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    cfg = TrackingConfig(uri=uri)
    parent = _exercise(cfg, tmp_path)
    _check(uri, parent)
    assert (tmp_path / "store" / "mlartifacts").is_dir(), "artifacts belong beside the sqlite file"
    lines = [json.loads(x) for x in (tmp_path / "curate.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines][:3] == ["params", "metrics", "metrics"] and lines[-1]["kind"] == "close"


def test_lineage_models_registry_and_system_metrics_in_a_sqlite_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    registered = _exercise_lineage(TrackingConfig(uri=uri, system_metrics_interval_s=0.2), tmp_path)
    _check_lineage(uri, registered, monkeypatch)


def test_uri_resolution_and_other_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(TrackingConfig()) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_uri(TrackingConfig()) == "http://127.0.0.1:1"
    assert resolve_uri(TrackingConfig(uri="sqlite:///x.db")) == "sqlite:///x.db"
    with pytest.raises(ValueError, match="tracking.backend"):
        TrackingConfig(backend="wandb")
    quiet = build_tracker(TrackingConfig(backend="none"), "x", jsonl_path=tmp_path / "n.jsonl")
    quiet.log_metrics({"a": 1.0})
    quiet.close()
    assert not (tmp_path / "n.jsonl").exists()
    # Ranks other than 0 never talk to MLflow (the URI above is unreachable) but keep their JSONL.
    worker = build_tracker(TrackingConfig(), "x", rank=1, jsonl_path=tmp_path / "r1.jsonl")
    assert isinstance(worker, JsonlTracker)
    worker.log_metrics({"loss": 1.0}, step=3)
    worker.close()
    assert '"step": 3' in (tmp_path / "r1.jsonl").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_mlflow_server_on_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
        "--workers",
        "1",
    ]
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        parent = _exercise(TrackingConfig(), tmp_path)
        _check(uri, parent)
        registered = _exercise_lineage(TrackingConfig(system_metrics_interval_s=0.2), tmp_path)
        _check_lineage(uri, registered, monkeypatch)
    finally:
        os.killpg(server.pid, 15)  # the process group this test started, nothing else
        server.wait(timeout=30)
        log.close()
