"""Injected faults and what must survive them.

- a full disk (ENOSPC, from the kernel: the shard's temporary file is a link to /dev/full) while a curation job
  writes shards: a clear error naming the shard, no manifest vouching for the folder, no half shard under a
  final name, and the rerun completes with every input accounted for;
- the whole training job SIGKILLed (driver process group) in the middle of a checkpoint save: the rerun resumes
  from the last complete checkpoint, never from the half-written one (slow).

A Ray worker killed during curation is in test_bad_inputs.py; a training worker killed and restarted is
tests/pipelines/test_train.py::test_killed_worker_resumes_with_identical_losses.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from common import faults
from common.faults import Fault
from common.tracking import TrackingConfig
from data_prep.curated_shards import DRILL_SHARD, ShardConfig
from data_prep.curation import CurateConfig, ExecConfig, run_curation
from data_prep.schema import encode_sample
from data_prep.shards import write_tar
from data_prep.sources import SourceConfig
from model.weights import DONE_FILE
from tests.data_prep.curate_fixtures import ray_local, write_jsonl  # noqa: F401
from training.checkpoint import checkpoint_step, latest_complete_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _curate_cfg(src: Path, out: Path, per_shard: int) -> CurateConfig:
    return CurateConfig(
        sources=[SourceConfig(name="docs", kind="text", format="jsonl", path=str(src), unit_size=4)],
        out_dir=str(out),
        shards=ShardConfig(samples_per_shard=per_shard),
        exec=ExecConfig(progress=False),
        tracking=TrackingConfig(backend="none"),
    )


def _complete_shards_are_whole(folder: Path) -> None:
    """Every tar under its final name is whole: the bytes its stats (written last) describe."""
    for stats_path in folder.glob("*_stats.json"):
        stats = json.loads(stats_path.read_text())
        tar = folder / stats["shard"]
        assert hashlib.sha256(tar.read_bytes()).hexdigest() == stats["sha256"], tar.name


@pytest.mark.ray
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to make the kernel say ENOSPC")
def test_full_disk_while_writing_shards(tmp_path: Path, ray_local) -> None:  # noqa: F811
    src = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": f"document {i} has words"} for i in range(12)])
    out = tmp_path / "out"
    folder = out / "docs"
    run_curation(_curate_cfg(src, out, per_shard=4))  # an earlier, complete run: 3 shards and a manifest
    assert (folder / "manifest.json").is_file()

    (folder / "docs-000002.tar.tmp").symlink_to("/dev/full")  # the disk is full when shard 2 is written
    with pytest.raises(Exception, match=r"No space left on device.*docs-000002\.tar") as info:
        run_curation(_curate_cfg(src, out, per_shard=3))  # a rerun that rewrites every shard (4 of them)
    assert "Errno 28" in str(info.value)
    assert not (folder / "manifest.json").exists(), "the old manifest must not vouch for half-replaced shards"
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name], "no temporary file is left behind"
    _complete_shards_are_whole(folder)

    (result,) = run_curation(_curate_cfg(src, out, per_shard=3))  # space is back: the rerun completes
    assert (result["inputs"], result["kept"], result["rejected"]) == (12, 12, 0)
    assert [s["name"] for s in result["shards"]] == [f"docs-{i:06d}.tar" for i in range(4)]
    assert sorted(p.name for p in folder.glob("*.tar")) == [s["name"] for s in result["shards"]]
    _complete_shards_are_whole(folder)


def test_rewrite_killed_before_its_stats_leaves_no_stale_stats(tmp_path: Path, ray_local) -> None:  # noqa: F811
    """A rerun that dies after replacing a shard's tar but before its stats: the earlier run's stats of that
    shard must not stay behind, vouching for bytes that are no longer there."""
    src = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": f"document {i} has words"} for i in range(12)])
    out = tmp_path / "out"
    folder = out / "docs"
    run_curation(_curate_cfg(src, out, per_shard=4))  # an earlier, complete run: 3 shards with their stats
    assert (folder / "docs-000000_stats.json").is_file()
    drill = Fault(DRILL_SHARD, "raise", when={"source": "docs", "index": 0})
    with faults.arm(drill), pytest.raises(Exception, match="fault drill at curate.shard"):
        run_curation(_curate_cfg(src, out, per_shard=3))  # shard 0's new tar is in place, its stats are not
    assert (folder / "docs-000000.tar").is_file()
    assert not (folder / "docs-000000_stats.json").exists()
    _complete_shards_are_whole(folder)


# --- the whole training job killed during a checkpoint save (slow) ---


def _stage_data(root: Path) -> Path:
    from tests.model.toy import ALL_TASKS, make_sample

    samples = [make_sample(ALL_TASKS[i % len(ALL_TASKS)], i) for i in range(48)]
    for s in range(4):
        chunk = samples[s * 12 : (s + 1) * 12]
        write_tar(root / "stage_I" / f"stage_I-{s:06d}.tar", [encode_sample(x) for x in chunk])
    return root


def _train(tmp: Path, data: Path, timeout: float) -> int:
    """``python -m pipelines.train`` in its own session, on its own Ray instance (inheriting the armed fault
    drills); returns its exit status."""
    args = [
        f"data_root={data}",
        f"checkpoint.dir={tmp / 'ckpt'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "name=killed",
        "stages=[I]",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5",
        "scaling.max_failures=0",
        "checkpoint.every_steps=2",
        "checkpoint.keep=3",
        "stage.I.steps=6",
        "stage.I.global_batch=12",
        "stage.I.lr=0.001",
        "export=false",
        "preview.prompts=[a red circle]",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp / "train.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.train", *args], cwd=REPO, env=env, start_new_session=True, stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        return proc.wait(timeout=timeout)
    finally:
        log.close()
        _kill_session(proc.pid)


def _kill_session(sid: int) -> None:
    """Whatever the job started and left running (Ray workers have their own process groups, our session)."""
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.send_signal(signal.SIGKILL)
        except (ProcessLookupError, psutil.Error, PermissionError):
            continue


def _losses(stage_dir: Path) -> list[tuple[int, float]]:
    out = []
    for line in (stage_dir / "logs" / "rank0.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "metrics" and "loss" in rec["metrics"]:
            out.append((rec["step"], rec["metrics"]["loss"]))
    return out


@pytest.mark.slow
def test_job_killed_during_checkpoint_save_resumes_from_last_complete(tmp_path: Path) -> None:
    data = _stage_data(tmp_path / "data")
    stage_dir = tmp_path / "ckpt" / "killed-stage_I"
    marker = tmp_path / "fault_job_killed_during_save_step4"
    # custom: the runner kills the driver's process group once the other rank's files and half of rank 1's are up
    drill = Fault("train.checkpoint_upload", "custom", when={"stage": "I", "rank": 1, "step": 4}, once=str(marker))
    with faults.arm(drill):
        status = _train(tmp_path, data, timeout=420)
    assert status == -signal.SIGKILL, (tmp_path / "train.log").read_text()[-3000:]
    assert marker.is_file(), "the drill did not fire"
    # in storage: step 2 whole; step 4's folder holds rank 0's files and half of rank 1's shard. Ray may not
    # have registered step 2 yet (its controller polls): the rerun must find it on its own.
    ckpts = [p for p in stage_dir.glob("checkpoint_*") if p.is_dir()]
    states = {json.loads((p / "trainer_state.json").read_text())["step"]: p for p in ckpts}
    assert set(states) == {2, 4}
    half = states[4]
    assert (half / "__1_0.distcp").stat().st_size < (states[2] / "__1_0.distcp").stat().st_size
    assert (checkpoint_step(states[2]), checkpoint_step(half)) == (2, None)
    assert latest_complete_checkpoint(stage_dir) == states[2]
    assert not (stage_dir / "final").exists()

    with faults.arm(drill):  # the same command again: the drill has fired once, its marker says so
        status = _train(tmp_path, data, timeout=420)
    assert status == 0, (tmp_path / "train.log").read_text()[-3000:]
    steps = [s for s, _ in _losses(stage_dir)]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6], "resumed from step 2, the last complete checkpoint"
    losses: dict[int, list[float]] = {}
    for step, loss in _losses(stage_dir):
        losses.setdefault(step, []).append(loss)
    for step in (3, 4):  # the steps redone after the resume see the same weights, data and RNG
        assert losses[step][1] == pytest.approx(losses[step][0], rel=1e-6)
    assert json.loads((stage_dir / "final" / DONE_FILE).read_text())["steps"] == 6


def test_latest_complete_checkpoint_skips_partial_folders(tmp_path: Path) -> None:
    import shutil

    import torch
    from torch import nn

    from training.checkpoint import TrainState, save_checkpoint

    model = nn.Linear(64, 64)
    optim = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
    save_checkpoint(tmp_path / "checkpoint_a", model, optim, sched, TrainState(step=2))
    save_checkpoint(tmp_path / "checkpoint_b", model, optim, sched, TrainState(step=4))
    shutil.copytree(tmp_path / "checkpoint_b", tmp_path / "checkpoint_c")
    shard = tmp_path / "checkpoint_b" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # cut off mid-upload
    (tmp_path / "checkpoint_c" / "rng_rank0.json").unlink()  # a rank's files never arrived
    assert [checkpoint_step(tmp_path / n) for n in ("checkpoint_a", "checkpoint_b", "checkpoint_c")] == [2, None, None]
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint_a"
