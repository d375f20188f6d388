"""benchmarks/vq_colour.py runs its seven fits and reports comparable held-out figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
