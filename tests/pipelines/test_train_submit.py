"""`ray job submit` of the training job to a Ray cluster this test starts (`ray start --head`) on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.schema import encode_sample
from data_prep.shards import write_tar
from tests.model.toy import ALL_TASKS, make_sample

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, f"port {port} never opened\n{log.read_text()[-3000:]}"
            time.sleep(1)


def _stop(head: subprocess.Popen, temp_dir: Path) -> None:
    """End what this test started: SIGTERM to `ray start --block` (its handler stops the Ray processes it
    started), SIGKILL to its session if it does not exit, then any of its processes left over (found by the
    unique temp dir in their command line), never anything else.

    The head has 5 s to stop gracefully: it outlived a 20 s wait every time (whether SIGTERM went to it alone or
    to its whole session), and waiting for it cost a CI run 20 s for nothing the test checks."""
    import psutil

    try:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # the session this test started for it, nothing else
        head.wait(timeout=10)
    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(temp_dir) in cmd and p.pid != os.getpid():
            mine.append(p)
    for p in mine:
        p.kill()
    psutil.wait_procs(mine, timeout=30)


@pytest.fixture
def ray_head(tmp_path: Path):
    """A one-node cluster started with `ray start --head --block` in its own session."""
    temp_dir = Path("/tmp") / f"rayt-{os.getpid()}-{time.time_ns() % 10**6}"  # socket paths must stay short
    port, dash = _free_port(), _free_port()
    log = tmp_path / "head.log"
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        "--num-cpus=2",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]
    # Token authentication, with a token made for this cluster alone; the submitting client gets the same.
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    with open(log, "wb") as out:
        head = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for_port(dash, head, log)
        yield f"http://127.0.0.1:{dash}", head, env
    finally:
        _stop(head, temp_dir)


def test_ray_job_submit_runs_training(ray_head, tmp_path: Path) -> None:
    address, head, env = ray_head
    data = tmp_path / "stages"
    samples = [make_sample(ALL_TASKS[i % len(ALL_TASKS)], i) for i in range(16)]
    write_tar(data / "stage_I" / "stage_I-000000.tar", [encode_sample(s) for s in samples])
    ckpt, db = tmp_path / "ckpt", tmp_path / "mlflow.db"
    entry = [
        sys.executable,
        "-m",
        "pipelines.train",
        "--config",
        "configs/train/debug_janus_pro.yaml",
        f"data_root={data}",
        "stages=[I]",
        "stage.I.shards=stage_I",
        "stage.I.steps=2",
        "stage.I.global_batch=4",
        "stage.I.warmup_steps=0",
        f"checkpoint.dir={ckpt}",
        "scaling.cpus_per_worker=0.5",
        "name=submitted",
        f"tracking.uri=sqlite:///{db}",
    ]
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--", *entry]
    deadline = time.time() + 120
    while True:  # the node's dashboard agent comes up a little after the head's HTTP port
        done = subprocess.run(submit, capture_output=True, text=True, timeout=600, env=env)
        if "No available agent" not in done.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in done.stdout.lower(), done.stdout[-2000:]
    assert (ckpt / "submitted-stage_I" / "final" / "stage_done.json").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("janus-pipeline").experiment_id])
    assert {r.info.run_name for r in runs} == {"train-submitted", "stage_I"}
    assert head.poll() is None
