"""benchmarks/vq_colour.py runs its fits and reports comparable held-out figures, per seed and over seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.pipelines.eval_fixtures import small_world

ROOT = Path(__file__).resolve().parents[2]


def test_vq_colour_benchmark_compares_the_seven_fits(tmp_path: Path) -> None:
    world = small_world(tmp_path / "toyworld")
    out = tmp_path / "vq_colour.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/vq_colour.py", "--toyworld", str(world), "--steps", "3", "--max-images", "24",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    fits = ["vq", "vq_no_codebook", "kl_8x", "kl_8x_vq_widths", "vq_no_out_norm", "vq_grid16", "plain_8x"]
    assert report["steps"] == 3 and list(report["fits"]) == fits
    for figures in report["fits"].values():
        assert 0.0 <= figures["shape_colour_kept"] <= 1.0
        assert 0.0 < figures["psnr/digits"] < 60.0 and 0.0 < figures["psnr/shapes"] < 60.0
        assert figures["seconds_per_step"] > 0
    assert "colours kept" in proc.stdout


def test_vq_colour_sweeps_seeds_and_steps_from_a_bundle_in_worker_processes(tmp_path: Path) -> None:
    """The GPU-machine path: a bundle (no toy world, webdataset or Ray needed there), fits x steps x seeds run
    by worker processes, each fit's figures and the mean and range over seeds reported."""
    world = small_world(tmp_path / "toyworld")
    bundle, out = tmp_path / "toy.pt", tmp_path / "sweep.json"
    script = [sys.executable, "benchmarks/vq_colour.py"]
    export = [*script, "--toyworld", str(world), "--max-images", "12", "--export-bundle", str(bundle)]
    proc = subprocess.run(export, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = [*script, "--bundle", str(bundle), "--fits", "vq_torch_init_no_out_norm,plain_8x", "--steps", "1,2",
             "--seeds", "0,1", "--workers", "2", "--threads", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(sweep, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["steps"] == [1, 2] and report["seeds"] == [0, 1] and report["failed"] == []
    keys = ["vq_torch_init_no_out_norm@1", "vq_torch_init_no_out_norm@2", "plain_8x@1", "plain_8x@2"]
    assert list(report["fits"]) == keys
    assert len(report["runs"]) == 8 and {r["seed"] for r in report["runs"]} == {0, 1}
    for name, figures in report["fits"].items():
        kept = [r["shape_colour_kept"] for r in report["runs"] if name.startswith(r["fit"] + "@")
                and name.endswith(f"@{r['steps']}")]  # fmt: skip
        assert len(kept) == 2
        assert figures["shape_colour_kept"] == pytest.approx(sum(kept) / 2)
        assert figures["shape_colour_kept_min"] == min(kept) and figures["shape_colour_kept_max"] == max(kept)
    assert "seed 1:" in proc.stdout and "colours kept" in proc.stdout
    bad = tmp_path / "bad.pt"
    torch.save({"images": []}, bad)
    proc = subprocess.run([*script, "--bundle", str(bad)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and f"{bad}: not a --export-bundle file" in proc.stderr
