"""The shipped cluster specs start every Ray node with token authentication and carry no token themselves
(tests/pipelines/test_cluster.py shows what the setting does on a live cluster)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "ray_cluster.yaml"
KUBERAY = ROOT / "deploy" / "kuberay-rayjob.yaml"


def test_every_launcher_node_starts_with_token_auth() -> None:
    spec = yaml.safe_load(LAUNCHER.read_text())
    starts = [
        c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in spec[key] if "ray start" in c
    ]
    assert len(starts) == 2
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd and "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in cmd, cmd
    head = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard`'s SSH tunnel only
    # the token travels from the launching machine's home, never from the repository
    assert spec["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_kuberay_job_uses_token_auth_from_a_secret() -> None:
    spec = yaml.safe_load(KUBERAY.read_text())["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": "janus-ray-auth"}


def test_no_token_in_the_specs() -> None:
    for path in (LAUNCHER, KUBERAY):
        text = path.read_text()
        assert not re.search(r"[0-9a-fA-F]{32,}", text), path.name
        assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*\S", text), path.name
