"""A curation job killed with SIGKILL part-way, run again, resumes and ends with the bytes of a clean run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.config import load_config
from data_prep.curation import CurateConfig, run_curation
from tests.data_prep.curate_fixtures import pattern, ray_local  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, out: Path) -> Path:
    src = tmp_path / "src"
    if not src.exists():
        src.mkdir()
        for i in range(240):
            pattern(1000 + i, (480, 400)).save(src / f"{i:06d}.jpg", quality=90)
            (src / f"{i:06d}.txt").write_text(f"a smooth picture number {i}")
    cfg = {
        "out_dir": str(out),
        "sources": [
            {"name": "pics", "kind": "synthetic_aesthetic", "format": "image_folder", "path": str(src), "unit_size": 8}
        ],
        "shards": {"samples_per_shard": 50},
        "exec": {"num_cpus": 1, "progress": False, "keep_work": True},
        "tracking": {"backend": "none"},
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.slow
@pytest.mark.ray
def test_sigkill_then_resume_gives_clean_bytes(tmp_path, ray_local):  # noqa: F811
    killed_out = tmp_path / "killed"
    cfg_path = _config(tmp_path, killed_out)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.curate", "--config", str(cfg_path)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    work = killed_out / "_work" / "pics"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and len(list(work.glob("unit-*.parquet"))) < 3:
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the job's driver and the Ray instance it started
        proc.wait()
    staged = {p: p.stat().st_mtime_ns for p in work.glob("unit-*.parquet")}
    assert 3 <= len(staged) < 30 and not (killed_out / "pics" / "manifest.json").exists()

    run_curation(load_config(CurateConfig, cfg_path))  # resume on the test's Ray instance
    assert all(p.stat().st_mtime_ns == t for p, t in staged.items())  # staged units were not redone
    clean_out = tmp_path / "clean"
    run_curation(load_config(CurateConfig, _config(tmp_path, clean_out)))
    files = sorted(p.relative_to(clean_out / "pics") for p in (clean_out / "pics").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(killed_out / "pics") for p in (killed_out / "pics").rglob("*") if p.is_file())
    assert all((clean_out / "pics" / f).read_bytes() == (killed_out / "pics" / f).read_bytes() for f in files)
    assert json.loads((clean_out / "pics" / "manifest.json").read_text())["kept"] == 240
