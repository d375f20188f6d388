"""Fault drills: inert unless armed, matched on their context, once per marker, and inherited by child processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import faults
from common.faults import Fault, InjectedFault


def test_points_are_inert_unless_armed() -> None:
    assert faults.armed() == []
    faults.point("curate.unit", unit=3)
    assert faults.env_vars() == {}


def test_a_drill_fires_only_for_its_context_and_once_per_marker(tmp_path: Path) -> None:
    marker = tmp_path / "fired"
    with faults.arm(Fault("curate.unit", "raise", when={"unit": 3}, once=str(marker))):
        faults.point("curate.unit", unit=2)
        faults.point("curate.shard", unit=3)
        with pytest.raises(InjectedFault, match="curate.unit"):
            faults.point("curate.unit", unit=3)
        assert marker.is_file()
        faults.point("curate.unit", unit=3)  # the marker remembers: a retried task succeeds
    assert faults.armed() == []


def test_custom_drills_are_left_to_the_caller(tmp_path: Path) -> None:
    with faults.arm(Fault("train.checkpoint_upload", "custom", when={"step": 4})):
        faults.point("train.checkpoint_upload", step=4)  # does nothing itself
        assert faults.matching("train.checkpoint_upload", step=3) is None
        assert faults.matching("train.checkpoint_upload", step=4).action == "custom"


def test_a_killed_child_process_dies_by_sigkill(tmp_path: Path) -> None:
    code = "from common import faults; faults.point('job.start', rank=0); print('survived')"
    with faults.arm(Fault("job.start", "kill", when={"rank": 0})):
        armed_env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], env=armed_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9 and "survived" not in proc.stdout
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "survived" in proc.stdout


def test_bad_drills_are_named() -> None:
    with pytest.raises(ValueError, match="action 'explode'"):
        Fault("curate.unit", "explode")
    os.environ[faults.ENV] = "{not json"
    try:
        with pytest.raises(ValueError, match=faults.ENV):
            faults.armed()
    finally:
        del os.environ[faults.ENV]
