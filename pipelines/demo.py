"""The embedded default, end to end on one machine: ``python -m pipelines.demo --config configs/demo.yaml``.

One local Ray instance and one MLflow parent run for the whole pipeline: build the toy world, curate it,
fit the debug VQ (Janus-Pro) and VAE (JanusFlow) on the toy images, and per family mix the stage shards,
train the three stages and evaluate the last one; then print a summary table and where everything went.
Every step is the job a user would run by hand (its ``main`` with the recipe and the demo's overrides), so
the demo exercises the real CLIs. Paths are relative to the working directory: everything lands under
``outputs/``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.config import load_config, parse_job_args, save_resolved, to_flat_dict
from common.ray_session import ray_session
from common.tracking import TrackingConfig, build_tracker, pipeline_run, resolve_uri
from data_prep.toyworld import ToyWorldConfig, build_toyworld
from model.family import get_family

log = logging.getLogger("pipelines.demo")

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
    fit_recipe: str = "configs/data/fit_tokenizers_toy.yaml"
    """Tokenizer fitting recipe: the VQ is fitted when janus_pro trains, the VAE when janusflow does."""
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
    eval_recipe: str = "configs/eval_toy.yaml"
    """Evaluation recipe (checkpoint, VAE and output folder are set per family by the demo)."""
    curate_overrides: list[str] = field(default_factory=list)
    """Extra key=value overrides for the curation job."""
    mix_overrides: list[str] = field(default_factory=list)
    """Extra key=value overrides for the mix jobs."""
    fit_overrides: list[str] = field(default_factory=list)
    """Extra key=value overrides for the tokenizer fitting job (e.g. fewer steps)."""
    train_overrides: list[str] = field(default_factory=list)
    """Extra key=value overrides for the training jobs (e.g. fewer steps)."""
    eval_overrides: list[str] = field(default_factory=list)
    """Extra key=value overrides for the evaluation jobs (e.g. fewer questions)."""
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


def tokenizer_dir(cfg: DemoConfig) -> Path:
    return Path(cfg.out_dir) / "tokenizers"


def eval_dir(cfg: DemoConfig, family: str) -> Path:
    return Path(cfg.out_dir) / "eval" / family


def family_train_args(cfg: DemoConfig, family: str) -> list[str]:
    """The training job's overrides: the demo's, after the fitted tokenizer of the family."""
    tokenizer = get_family(family).tokenizer
    fitted = f"model.{tokenizer.config_key}={tokenizer_dir(cfg) / tokenizer.name}"
    return [*_tracking_overrides(cfg), fitted, *cfg.train_overrides]


def final_checkpoint(cfg: DemoConfig, family: str) -> Path:
    """Where the family's training job publishes the last stage's weights."""
    from training.config import TrainConfig
    from training.stages import stage_dir

    train_cfg = load_config(TrainConfig, recipe_path(cfg.train_recipes[family]), family_train_args(cfg, family))
    return stage_dir(train_cfg, train_cfg.stages[-1]) / "final"


def demo_steps(cfg: DemoConfig) -> list[tuple[str, Callable[[], object]]]:
    """The pipeline as (name, thunk) pairs, in order."""
    from pipelines import curate, evaluate, fit_tokenizers, mix, train

    track = _tracking_overrides(cfg)

    def toyworld() -> None:
        with build_tracker(cfg.tracking, "toyworld") as tracker:
            world = build_toyworld(cfg.toyworld)
            tracker.log_params(to_flat_dict(cfg.toyworld))
            tracker.log_artifact(world / "toyworld.json")

    needed = {get_family(f).tokenizer.name for f in cfg.families}
    fit_args = [
        *track,
        f"out_dir={tokenizer_dir(cfg)}",
        f"toyworld_dir={cfg.toyworld.out_dir}",
        *(f"{kind}.enabled={kind in needed}" for kind in ("vq", "vae")),  # only the trained families' tokenizers
        *cfg.fit_overrides,
    ]
    steps: list[tuple[str, Callable[[], object]]] = [
        ("toyworld", toyworld),
        ("curate", lambda: _run_job(curate.main, cfg.curate_recipe, [*track, *cfg.curate_overrides])),
        ("fit_tokenizers", lambda: _run_job(fit_tokenizers.main, cfg.fit_recipe, fit_args)),
    ]
    mix_args = [*track, *cfg.mix_overrides]
    for family in cfg.families:
        eval_args = [
            *track,
            f"checkpoint={final_checkpoint(cfg, family)}",
            f"toyworld_dir={cfg.toyworld.out_dir}",
            f"out_dir={eval_dir(cfg, family)}",
            f"family={family}",
            *([f"vae_path={tokenizer_dir(cfg) / 'vae'}"] if get_family(family).needs_vae else []),
            *cfg.eval_overrides,
        ]
        train_args = family_train_args(cfg, family)
        steps += [
            (f"mix/{family}", lambda f=family: _run_job(mix.main, cfg.mix_recipes[f], mix_args)),
            (f"train/{family}", lambda f=family, a=train_args: _run_job(train.main, cfg.train_recipes[f], a)),
            (f"evaluate/{family}", lambda a=eval_args: _run_job(evaluate.main, cfg.eval_recipe, a)),
        ]
    return steps


def evaluation_results(cfg: DemoConfig) -> dict[str, dict[str, dict]]:
    """family -> metric -> {n, accuracy, chance, ratio_to_chance} from each family's eval.json."""
    out = {}
    for family in cfg.families:
        report = eval_dir(cfg, family) / "eval.json"
        if report.is_file():
            out[family] = json.loads(report.read_text())["results"]
    return out


def summary_table(results: dict[str, dict[str, dict]]) -> str:
    """One row per (family, metric): accuracy against chance."""
    rows = [(f, name, r) for f, metrics in results.items() for name, r in metrics.items()]
    if not rows:
        return "(no evaluation results)"
    width = max(len(name) for _, name, _ in rows) + 2
    lines = [f"{'family':<10} {'metric':<{width}} {'n':>5} {'accuracy':>9} {'chance':>7} {'x chance':>9}"]
    for family, name, r in rows:
        chance = f"{r['chance']:.3f}" if r.get("chance") is not None else "-"
        ratio = f"{r['ratio_to_chance']:.2f}" if r.get("ratio_to_chance") is not None else "-"
        lines.append(f"{family:<10} {name:<{width}} {r['n']:>5} {r['accuracy']:>9.3f} {chance:>7} {ratio:>9}")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig) -> dict[str, float]:
    timings: dict[str, float] = {}
    # one local Ray for every job (each job joins a running one)
    with ray_session(cfg.ray_num_cpus), pipeline_run(cfg.tracking, "demo") as parent:
        parent.log_params(to_flat_dict(cfg))
        save_resolved(cfg, cfg.out_dir)
        for name, step in demo_steps(cfg):
            start = time.perf_counter()
            log.info("demo: %s", name)
            step()
            timings[name] = time.perf_counter() - start
            parent.log_metrics({f"time_s/{name}": timings[name]})
        parent.log_metrics({"time_s/total": sum(timings.values())})
        results = evaluation_results(cfg)
        parent.log_metrics(
            {
                f"{family}/{name}/{key}": float(r[key])
                for family, metrics in results.items()
                for name, r in metrics.items()
                for key in ("accuracy", "ratio_to_chance")
                if r.get(key) is not None
            }
        )
        summary = Path(cfg.out_dir) / "summary.txt"
        summary.write_text(summary_table(results) + "\n")
        parent.log_artifact(summary)
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(DemoConfig, argv, prog="python -m pipelines.demo", doc=__doc__ or "")
    timings = run_demo(cfg)
    print("\ndemo finished:")
    for step, seconds in timings.items():
        print(f"  {step:<20} {seconds:8.1f}s")
    print(f"  {'total':<20} {sum(timings.values()):8.1f}s")
    print("\nevaluation (held-out toy questions; generated images graded by independent judges):")
    print(summary_table(evaluation_results(cfg)))
    print(f"\noutputs: {Path(cfg.out_dir).resolve()}")
    for family in cfg.families:
        print(f"  {family}: sample grids in {eval_dir(cfg, family).resolve()}")
    if cfg.tracking.backend == "mlflow":
        uri = resolve_uri(cfg.tracking)
        print(f"MLflow runs: {uri}\n  open the UI with: .venv/bin/mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
