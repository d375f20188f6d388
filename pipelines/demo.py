"""The embedded default, end to end on one machine: ``python -m pipelines.demo --config configs/demo.yaml``.

Runs under one MLflow parent run: build the toy world, then every later stage of the pipeline that exists
(curation, mixing, training, evaluation), and prints where everything went.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.toyworld import ToyWorldConfig, build_toyworld
from pipelines.config import parse_job_args, save_resolved, to_flat_dict
from pipelines.tracking import TrackingConfig, build_tracker, pipeline_run, resolve_uri


@dataclass(kw_only=True)
class DemoConfig:
    out_dir: str = "outputs/demo"
    """Root of every output of the demo (each step writes a subfolder)."""
    toyworld: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    """Toy-world sizes and seed; its out_dir is replaced by {out_dir}/toyworld."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Where runs are recorded."""


CONFIG = DemoConfig


def run_demo(cfg: DemoConfig) -> dict[str, float]:
    out = Path(cfg.out_dir)
    timings: dict[str, float] = {}
    with pipeline_run(cfg.tracking, "demo") as parent:
        parent.log_params(to_flat_dict(cfg))
        save_resolved(cfg, out)
        start = time.perf_counter()
        cfg.toyworld.out_dir = str(out / "toyworld")
        with build_tracker(cfg.tracking, "toyworld") as tracker:
            world = build_toyworld(cfg.toyworld)
            tracker.log_params(to_flat_dict(cfg.toyworld))
            tracker.log_artifact(world / "toyworld.json")
        timings["toyworld"] = time.perf_counter() - start
        parent.log_metrics({f"time_s/{k}": v for k, v in timings.items()})
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(DemoConfig, argv, prog="python -m pipelines.demo", doc=__doc__ or "")
    timings = run_demo(cfg)
    print("\ndemo finished:")
    for step, seconds in timings.items():
        print(f"  {step:<12} {seconds:7.1f}s  -> {Path(cfg.out_dir) / step}")
    uri = resolve_uri(cfg.tracking)
    print(f"outputs: {Path(cfg.out_dir).resolve()}")
    if cfg.tracking.backend == "mlflow":
        print(f"MLflow runs: {uri}\n  open the UI with: .venv/bin/mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
