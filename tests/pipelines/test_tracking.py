"""Tracker backends against a real MLflow store (sqlite file) and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

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

from pipelines.tracking import (
    PARENT_ENV,
    JsonlTracker,
    TrackingConfig,
    build_tracker,
    pipeline_run,
    resolve_uri,
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


def test_sqlite_store_parent_children_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    cfg = TrackingConfig(uri=uri)
    parent = _exercise(cfg, tmp_path)
    _check(uri, parent)
    assert (tmp_path / "store" / "mlartifacts").is_dir(), "artifacts belong beside the sqlite file"
    lines = [json.loads(x) for x in (tmp_path / "curate.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines][:3] == ["params", "metrics", "metrics"] and lines[-1]["kind"] == "close"


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
    finally:
        os.killpg(server.pid, 15)  # the process group this test started, nothing else
        server.wait(timeout=30)
        log.close()
