"""benchmarks/gpu_step.py keeps working on the CPU (the debug flavor), with the imports a GPU machine has."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = """
import runpy, sys
sys.argv = ["gpu_step.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu_step.py", run_name="__main__")
missing = {"ray", "mlflow", "omegaconf", "webdataset", "pyarrow"} & set(sys.modules)
assert not missing, f"the GPU benchmark imported {sorted(missing)}"
"""


def test_gpu_step_benchmark_runs_on_cpu_with_the_gpu_machine_imports(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    args = ["--flavors", "debug", "--settings", "shipped,compile+ac,recipe-batch", "--steps", "2", "--warmup", "1"]
    args += ["--compile-backend", "eager", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", RUN, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["setting"] for r in rows] == ["shipped", "compile+ac", "recipe-batch"]
    assert rows[1]["compile"] and rows[1]["ac"] and not rows[0]["compile"]
    assert {r["precision"] for r in rows} == {"float32"}  # auto: fp32 on the CPU
    assert [r["micro"] for r in rows] == [24, 24, 4]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["tflops_per_s"] > 0 and r["step_time_s"] > 0
        assert r["mfu"] is None  # no peak is known for a CPU
        assert 0 < r["loss"] < 10
    assert rows[0]["rows"] > 1 and rows[0]["tokens_per_step"] > 512  # packed rows of 512, several per batch
    assert "MFU" in proc.stdout and "debug" in proc.stdout
