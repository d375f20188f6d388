"""The embedded default, end to end on one machine: ``python -m pipelines.demo --config configs/demo.yaml``.

One local Ray instance and one MLflow parent run for the whole pipeline: build the toy world, curate it,
mix the stage shards, train the three stages, and print where everything went. Every step is the job a
user would run by hand (its ``main`` with the recipe and the demo's overrides), so the demo exercises the
real CLIs. Paths are relative to the working directory: everything lands under ``outputs/``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.toyworld import ToyWorldConfig, build_toyworld
from pipelines.config import parse_job_args, save_resolved, to_flat_dict
from pipelines.tracking import TrackingConfig, build_tracker, pipeline_run, resolve_uri

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("janus_pro", "janusflow")


@dataclass(kw_only=True)
class DemoConfig:
    out_dir: str = "outputs"
    """Root of every output (the recipes' own paths are under outputs/ too)."""
    families: list[str] = field(default_factory=lambda: ["janus_pro"])
    """Which model families to train: janus_pro, janusflow or both."""
    toyworld: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    """Toy-world sizes and seed (written to outputs/toyworld)."""
    curate_recipe: str = "configs/data/curate_toyworld.yaml"
    """Curation recipe (relative paths are looked up in the repository)."""
    mix_recipes: dict[str, str] = field(
        default_factory=lambda: {
            "janus_pro": "configs/data/mix_toy_janus_pro.yaml",
            "janusflow": "configs/data/mix_toy_janusflow.yaml",
        }
    )
    """Stage mixture recipe per family."""
    train_recipes: dict[str, str] = field(
        default_factory=lambda: {
            "janus_pro": "configs/train/debug_janus_pro.yaml",
            "janusflow": "configs/train/debug_janusflow.yaml",
        }
    )
    """Training recipe per family."""
    curate_overrides: list[str] = field(default_factory=list)
    """Extra key=value overrides for the curation job."""
    mix_overrides: list[str] = field(default_factory=list)
    """Extra key=value overrides for the mix jobs."""
    train_overrides: list[str] = field(default_factory=list)
    """Extra key=value overrides for the training jobs (e.g. fewer steps)."""
    ray_num_cpus: int = 0
    """CPUs of the local Ray instance; 0 = all of this machine's."""
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(uri="sqlite:///outputs/mlflow.db"))
    """Where runs are recorded."""

    def __post_init__(self) -> None:
        bad = sorted(set(self.families) - set(FAMILIES))
        if bad or not self.families:
            raise ValueError(f"families: {bad or 'none given'}; choose from {list(FAMILIES)}")


CONFIG = DemoConfig


def recipe_path(path: str) -> str:
    p = Path(path)
    return str(p if p.is_absolute() or p.exists() else REPO / p)


def _tracking_overrides(cfg: DemoConfig) -> list[str]:
    return [
        f"tracking.uri={resolve_uri(cfg.tracking)}",
        f"tracking.experiment={cfg.tracking.experiment}",
        f"tracking.backend={cfg.tracking.backend}",
    ]


def _run_job(main: Callable[[Sequence[str]], int], recipe: str, overrides: list[str]) -> None:
    status = main(["--config", recipe_path(recipe), *overrides])
    if status:
        raise RuntimeError(f"{main.__module__} exited with status {status}")


def demo_steps(cfg: DemoConfig) -> list[tuple[str, Callable[[], object]]]:
    """The pipeline as (name, thunk) pairs, in order."""
    from pipelines import curate, mix, train

    track = _tracking_overrides(cfg)

    def toyworld() -> None:
        with build_tracker(cfg.tracking, "toyworld") as tracker:
            world = build_toyworld(cfg.toyworld)
            tracker.log_params(to_flat_dict(cfg.toyworld))
            tracker.log_artifact(world / "toyworld.json")

    steps: list[tuple[str, Callable[[], object]]] = [
        ("toyworld", toyworld),
        ("curate", lambda: _run_job(curate.main, cfg.curate_recipe, [*track, *cfg.curate_overrides])),
    ]
    mix_args = [*track, *cfg.mix_overrides]
    train_args = [*track, *cfg.train_overrides]
    for family in cfg.families:
        steps.append((f"mix/{family}", lambda f=family: _run_job(mix.main, cfg.mix_recipes[f], mix_args)))
        steps.append((f"train/{family}", lambda f=family: _run_job(train.main, cfg.train_recipes[f], train_args)))
    return steps


def run_demo(cfg: DemoConfig) -> dict[str, float]:
    import ray

    timings: dict[str, float] = {}
    started = not ray.is_initialized()
    if started:  # one local instance for every job (each job joins a running one)
        ray.init(num_cpus=cfg.ray_num_cpus or None, include_dashboard=False, log_to_driver=False)
    try:
        with pipeline_run(cfg.tracking, "demo") as parent:
            parent.log_params(to_flat_dict(cfg))
            save_resolved(cfg, cfg.out_dir)
            for name, step in demo_steps(cfg):
                start = time.perf_counter()
                print(f"\n=== demo: {name} ===", flush=True)
                step()
                timings[name] = time.perf_counter() - start
                parent.log_metrics({f"time_s/{name}": timings[name]})
            parent.log_metrics({"time_s/total": sum(timings.values())})
    finally:
        if started:
            ray.shutdown()
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(DemoConfig, argv, prog="python -m pipelines.demo", doc=__doc__ or "")
    timings = run_demo(cfg)
    print("\ndemo finished:")
    for step, seconds in timings.items():
        print(f"  {step:<18} {seconds:8.1f}s")
    print(f"  {'total':<18} {sum(timings.values()):8.1f}s")
    print(f"outputs: {Path(cfg.out_dir).resolve()}")
    if cfg.tracking.backend == "mlflow":
        uri = resolve_uri(cfg.tracking)
        print(f"MLflow runs: {uri}\n  open the UI with: .venv/bin/mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
