"""A real two-node Ray cluster on this machine, secured as ray_cluster.yaml secures one (token
authentication), listening on 127.0.0.1 only.

- Job submission without the token is refused (HTTP 401 / the `ray job submit` CLI fails), a wrong token is
  refused (403), with the token a job runs.
- The curation and mix jobs, started from a directory where every path is relative, run tasks on both nodes
  (the second node's processes work in another directory, so a relative path that only the driver can resolve
  would land elsewhere) and write the same bytes as a single-node run.

The test stops what it started by the PIDs it started (SIGTERM to `ray start --block` and to the node
launcher, whose handlers stop their own Ray processes; SIGKILL to their sessions if they do not exit).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from data_prep.toyworld import SplitSizes, ToyWorldConfig, build_toyworld

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
STORE = 150 * 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, token: str | None = None, body: dict | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@dataclass
class Cluster:
    gcs: str
    dashboard: str
    token: str
    env: dict[str, str]
    """Environment of a client that holds the token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH)."""
    plain_env: dict[str, str]
    """Environment of a client without any token (HOME without ~/.ray/auth_token)."""
    pids: list[int]
    """The processes the fixture started: `ray start --head --block` and the second node's launcher."""

    def alive_nodes(self) -> list[dict]:
        status, text = http(f"{self.dashboard}/api/v0/nodes?limit=100", self.token)
        assert status == 200, text
        return [n for n in json.loads(text)["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def finished_tasks(self) -> list[dict]:
        status, text = http(f"{self.dashboard}/api/v0/tasks?limit=10000&detail=1", self.token)
        assert status == 200, text
        return [t for t in json.loads(text)["data"]["result"]["result"] if t["state"] == "FINISHED"]


def _ray_ports() -> list[str]:
    flags = [
        "--node-manager-port",
        "--object-manager-port",
        "--metrics-export-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--ray-client-server-port",
    ]
    return [x for f in flags for x in (f, str(free_port()))] + ["--min-worker-port", "0", "--max-worker-port", "0"]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started for it, nothing else
            proc.wait(timeout=30)


def _wait(what: str, ok, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs, strict=True):
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a Ray process exited ({p.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if ok():
                return
        except (OSError, AssertionError):  # not listening yet (URLError is an OSError), or not ready
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not ready after {timeout} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    temp = Path(tempfile.mkdtemp(prefix="rayc"))  # short: Ray's unix socket paths must stay under 108 bytes
    token = secrets.token_hex(32)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    plain_home = root / "plain_home"
    plain_home.mkdir()
    env = {
        **base,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        # keeps `ray start` on 127.0.0.1 (on Linux it otherwise takes the machine's address)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # nothing to drain when the test stops it
        "DASHBOARD_METRIC_PORT": str(free_port()),
        "AUTOSCALER_METRIC_PORT": str(free_port()),
    }
    gcs, dash = free_port(), free_port()
    head_dir, node_dir = root / "head", root / "node2"
    head_dir.mkdir()
    node_dir.mkdir()
    head_cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--temp-dir",
        str(temp),
        "--num-cpus",
        "1",
        "--object-store-memory",
        str(STORE),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--disable-usage-stats",
        *_ray_ports(),
    ]
    spec = {
        "gcs": f"127.0.0.1:{gcs}",
        "num_cpus": 1,
        "resources": {"second_node": 1},
        "object_store_memory": STORE,
        "temp_dir": str(temp),
        "agent_port": free_port(),
        "metrics_port": free_port(),
        "runtime_env_port": free_port(),
    }
    logs = [root / "head.log", root / "node2.log"]
    procs: list[subprocess.Popen] = []
    plain_env = {**base, "HOME": str(plain_home)}
    info = Cluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", token, env, plain_env, [])
    try:
        with open(logs[0], "w") as log:
            procs.append(
                subprocess.Popen(
                    head_cmd, cwd=head_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        _wait("head", lambda: http(f"{info.dashboard}/api/version")[0] in (200, 401), procs, logs[:1])
        for attempt in (1, 2):  # Ray gives a joining node a fixed 30 s to register; a loaded 2-core CI can miss it
            with open(logs[1], "w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(Path(__file__).with_name("ray_node.py")), json.dumps(spec)],
                        cwd=node_dir,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            try:
                _wait("second node", lambda: len(info.alive_nodes()) == 2, procs, logs)
                break
            except RuntimeError:
                if attempt == 2 or "timed out during startup" not in logs[1].read_text():
                    raise
                _stop(procs.pop())  # it exited; started again on fresh ports
                spec.update(agent_port=free_port(), metrics_port=free_port(), runtime_env_port=free_port())
        info.pids.extend(p.pid for p in procs)
        yield info
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(temp, ignore_errors=True)


def test_listens_on_loopback_only(cluster: Cluster) -> None:
    import psutil

    nodes = cluster.alive_nodes()
    assert {n["node_ip"] for n in nodes} == {"127.0.0.1"} and len(nodes) == 2
    ours = set(cluster.pids)
    for pid in cluster.pids:  # every Ray process of the cluster descends from the two the fixture started
        ours |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
    listening = [c for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in ours]
    assert listening, "no listening socket found for the cluster's processes"
    assert {c.laddr.ip.removeprefix("::ffff:") for c in listening} == {"127.0.0.1"}


def test_job_submission_needs_the_token(cluster: Cluster, tmp_path: Path) -> None:
    job = {"entrypoint": f"{sys.executable} -c \"print('should never run')\""}
    assert http(f"{cluster.dashboard}/api/jobs/", body=job)[0] == 401
    assert http(f"{cluster.dashboard}/api/jobs/", "0" * 64, body=job)[0] == 403
    cli = [RAY, "job", "submit", "--address", cluster.dashboard, "--"]
    refused = subprocess.run(
        [*cli, sys.executable, "-c", "print('should never run')"],
        env=cluster.plain_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()
    # as README shows a user: the token in ~/.ray/auth_token (where `ray get-auth-token --generate` puts it)
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(cluster.token)
    user_env = {**cluster.plain_env, "HOME": str(home), "RAY_AUTH_MODE": "token"}
    accepted = subprocess.run(
        [*cli, sys.executable, "-c", "print('ran with the token')"],
        env=user_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "ran with the token" in accepted.stdout
    status, text = http(f"{cluster.dashboard}/api/jobs/", cluster.token)
    assert status == 200
    entrypoints = [j["entrypoint"] for j in json.loads(text)]
    assert len(entrypoints) == 1 and "ran with the token" in entrypoints[0]


def _job(module: str, args: list[str], cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, f"{module} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "_logs" not in p.parts and p.name != "config.resolved.yaml"
    }


def test_curate_and_mix_run_on_both_nodes_from_relative_paths(cluster: Cluster, tmp_path: Path) -> None:
    build_toyworld(
        ToyWorldConfig(
            out_dir=str(tmp_path / "toyworld"),
            digits_max=40,
            shapes=SplitSizes(train=16, eval=4),
            charts_docs=SplitSizes(train=8, eval=4),
            photos=SplitSizes(train=8, eval=4),
            text=SplitSizes(train=12, eval=4),
        ),
        log=lambda _: None,
    )
    recipe = (REPO / "configs" / "data" / "curate_toyworld.yaml").read_text().replace("outputs/toyworld", "toyworld")
    (tmp_path / "curate.yaml").write_text(recipe)
    on_cluster = {**cluster.env, "RAY_ADDRESS": cluster.gcs}
    common = ["--config", "curate.yaml", "exec.progress=false", "tracking.backend=none", "shards.samples_per_shard=8"]
    _job("pipelines.curate", [*common, "out_dir=curated"], tmp_path, on_cluster)
    mix = [
        "--config",
        str(REPO / "configs" / "data" / "mix_toy_janusflow.yaml"),
        "curated_dir=curated",
        "tracking.backend=none",
        "stages.stage1.steps=30",
        "only=[stage1]",
        "samples_per_shard=320",
    ]
    _job("pipelines.mix", [*mix, "out_dir=stages", "write_workers=2"], tmp_path, on_cluster)

    nodes = {n["node_id"] for n in cluster.alive_nodes()}
    tasks = cluster.finished_tasks()
    for name in ("run_units_batch", "write_shards_batch", "write_shard_range"):
        ran_on = {t["node_id"] for t in tasks if name in t["name"]}
        assert ran_on == nodes, f"{name} tasks ran on {len(ran_on)} of the 2 nodes"

    # the same commands on one node (a local Ray of the job's own; mix without Ray) write the same bytes
    _job("pipelines.curate", [*common, "out_dir=curated_local", "exec.num_cpus=2"], tmp_path, cluster.plain_env)
    _job("pipelines.mix", [*mix, "out_dir=stages_local"], tmp_path, cluster.plain_env)
    curated, local = _files(tmp_path / "curated"), _files(tmp_path / "curated_local")
    assert curated == local and any(name.endswith(".tar") for name in curated)
    assert _files(tmp_path / "stages") == _files(tmp_path / "stages_local")
