"""The embedded default, end to end on one machine: ``python -m pipelines.demo --config configs/demo.yaml``.

One local Ray instance and one MLflow parent run for the whole pipeline: build the toy world, curate it,
fit the debug VQ (Janus-Pro) and VAE (JanusFlow) on the toy images, and per family mix the stage shards,
train the three stages and evaluate the last one; then print a summary table and where everything went.
Every step runs a job's library entry point with the config its CLI would build (the recipe, then the demo's
overrides), and hands its result to the next step: the fitted tokenizers' folders to training, the stage shards'
folder to training, the last stage's weights to evaluation. Paths are relative to the working directory:
everything lands under ``outputs/``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from common.config import load_config, parse_job_args, save_resolved, to_flat_dict
from common.io import atomic_write_text
from common.ray_session import ray_session
from common.tracking import Tracker, TrackingConfig, build_tracker, pipeline_run, resolve_uri
from data_prep.curation import CurateConfig, CurateResult, curate
from data_prep.mixing import MixConfig, MixResult, mix
from data_prep.toyworld import ToyWorldConfig, build_toyworld
from evaluation.toy_eval import EvalConfig, EvalReport, accuracy_table, artefact_lines, over_seeds, run_evaluation
from model.family import get_family
from training.config import TrainConfig
from training.stages import run_training
from training.tokenizers import FitTokenizersConfig, TokenizerFitResult, run_fit_tokenizers

log = logging.getLogger("pipelines.demo")

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("janus_pro", "janusflow")
T = TypeVar("T")


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
    seeds: list[int] = field(default_factory=list)
    """Training seeds: each family trains and is evaluated once per seed (checkpoints named
    ``{recipe name}-seed{N}``) and the summary shows each metric's mean and spread (max - min) over them.
    Empty = one run with the recipe's own seed and names."""
    ray_num_cpus: int = 0
    """CPUs of the local Ray instance; 0 = all of this machine's."""
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(uri="sqlite:///outputs/mlflow.db"))
    """Where runs are recorded."""

    def __post_init__(self) -> None:
        bad = sorted(set(self.families) - set(FAMILIES))
        if bad or not self.families:
            raise ValueError(f"families: {bad or 'none given'}; choose from {list(FAMILIES)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} names a seed twice")


CONFIG = DemoConfig


def recipe_path(path: str) -> str:
    p = Path(path)
    return str(p if p.is_absolute() or p.exists() else REPO / p)


@dataclass(kw_only=True)
class SeedResult:
    """One training run of a family and its evaluation."""

    finals: dict[str, Path]
    """Training stage -> its final weights folder."""
    evaluation: EvalReport


@dataclass(kw_only=True)
class FamilyResult:
    """What the demo produced for one model family: its stage shards and a training run per seed."""

    mixture: MixResult
    runs: dict[int, SeedResult]
    """Training seed -> its run."""

    def results(self) -> dict[str, dict]:
        """Metric -> result; over several seeds the mean accuracy with its min, max and spread."""
        return over_seeds([r.evaluation for r in self.runs.values()])


@dataclass(kw_only=True)
class DemoResult:
    toyworld: Path
    curated: CurateResult
    tokenizers: TokenizerFitResult
    families: dict[str, FamilyResult]
    timings: dict[str, float]
    """Step name -> seconds."""

    def evaluation_results(self) -> dict[str, dict[str, dict]]:
        """family -> metric -> {n, accuracy, chance, ratio_to_chance} (+ spread etc. over several seeds)."""
        return {family: r.results() for family, r in self.families.items()}


class _Steps:
    """Runs the pipeline's steps in order, timing each one into the parent run."""

    def __init__(self, parent: Tracker) -> None:
        self.parent = parent
        self.timings: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], T]) -> T:
        log.info("demo: %s", name)
        start = time.perf_counter()
        out = fn()
        self.timings[name] = time.perf_counter() - start
        self.parent.log_metrics({f"time_s/{name}": self.timings[name]})
        return out


def job_config(schema: type[T], recipe: str, cfg: DemoConfig, *overrides: str) -> T:
    """A job's config as its CLI would build it: the recipe, the demo's tracking, then the overrides."""
    tracking = [
        f"tracking.uri={resolve_uri(cfg.tracking)}",
        f"tracking.experiment={cfg.tracking.experiment}",
        f"tracking.backend={cfg.tracking.backend}",
    ]
    return load_config(schema, recipe_path(recipe), [*tracking, *overrides])


def build_world(cfg: DemoConfig) -> Path:
    with build_tracker(cfg.tracking, "toyworld") as tracker:
        world = build_toyworld(cfg.toyworld)
        tracker.log_params(to_flat_dict(cfg.toyworld))
        tracker.log_artifact(world / "toyworld.json")
    return world


def fit_tokenizers(cfg: DemoConfig, world: Path) -> TokenizerFitResult:
    """Fit only the tokenizers of the families that train."""
    needed = {get_family(f).tokenizer.name for f in cfg.families}
    enabled = [f"{kind}.enabled={kind in needed}" for kind in ("vq", "vae")]
    out = f"out_dir={Path(cfg.out_dir) / 'tokenizers'}"
    fit_cfg = job_config(
        FitTokenizersConfig, cfg.fit_recipe, cfg, out, f"toyworld_dir={world}", *enabled, *cfg.fit_overrides
    )
    return run_fit_tokenizers(fit_cfg)


def train_and_evaluate(
    cfg: DemoConfig, family: str, world: Path, fitted: TokenizerFitResult, step: _Steps
) -> FamilyResult:
    """Mix the family's stage shards, then per seed train its stages on them with the fitted tokenizer and
    evaluate the last stage."""
    mixture = step(
        f"mix/{family}", lambda: mix(job_config(MixConfig, cfg.mix_recipes[family], cfg, *cfg.mix_overrides))
    )
    tokenizer = get_family(family).tokenizer
    fitted_args = [f"data_root={mixture.out_dir}", f"model.{tokenizer.config_key}={fitted.paths[tokenizer.name]}"]
    if "vision" in fitted.paths:
        fitted_args.append(f"model.vision_path={fitted.paths['vision']}")
    recipe = job_config(TrainConfig, cfg.train_recipes[family], cfg, *fitted_args, *cfg.train_overrides)
    runs = {}
    for seed in cfg.seeds or [recipe.seed]:
        # with seeds given, every run trains (and resumes) under its own name
        per_seed = [f"seed={seed}", f"name={recipe.name}-seed{seed}"] if cfg.seeds else []
        train_cfg = job_config(
            TrainConfig, cfg.train_recipes[family], cfg, *fitted_args, *cfg.train_overrides, *per_seed
        )
        tag = f"{family}/seed{seed}" if cfg.seeds else family
        finals = step(f"train/{tag}", lambda c=train_cfg: run_training(c))
        eval_cfg = job_config(
            EvalConfig,
            cfg.eval_recipe,
            cfg,
            f"checkpoint={finals[train_cfg.stages[-1]]}",
            f"toyworld_dir={world}",
            f"out_dir={Path(cfg.out_dir) / 'eval' / tag}",
            f"family={family}",
            *([f"vae_path={fitted.paths['vae']}"] if get_family(family).needs_vae else []),
            *cfg.eval_overrides,
        )
        report = step(f"evaluate/{tag}", lambda c=eval_cfg: run_evaluation(c))
        runs[seed] = SeedResult(finals=finals, evaluation=report)
    return FamilyResult(mixture=mixture, runs=runs)


def result_metrics(result: DemoResult) -> dict[str, float]:
    """The parent run's metrics: per family and metric the accuracy (the mean over seeds), its ratio to chance
    and spread, every seed's own accuracy, and the prompt-binding gap of each run."""
    out = {
        f"{family}/{name}/{key}": float(r[key])
        for family, metrics in result.evaluation_results().items()
        for name, r in metrics.items()
        for key in ("accuracy", "ratio_to_chance", "spread", "artefact_peak")
        if r.get(key) is not None
    }
    for family, fam in result.families.items():
        for seed, run in fam.runs.items():
            prefix = f"{family}/seed{seed}" if len(fam.runs) > 1 else family
            out.update({f"{prefix}/probe/prompt_binding/{k}": v for k, v in run.evaluation.prompt_binding.items()})
            if len(fam.runs) > 1:
                out.update({f"{prefix}/{n}/accuracy": float(r["accuracy"]) for n, r in run.evaluation.results.items()})
    return out


def run(cfg: DemoConfig) -> DemoResult:
    """The whole pipeline under one Ray instance and one MLflow parent run; each step's result feeds the next."""
    # one local Ray for every job (each job joins a running one)
    with ray_session(cfg.ray_num_cpus), pipeline_run(cfg.tracking, "demo") as parent:
        parent.log_params(to_flat_dict(cfg))
        save_resolved(cfg, cfg.out_dir)
        step = _Steps(parent)
        world = step("toyworld", lambda: build_world(cfg))
        curated = step(
            "curate", lambda: curate(job_config(CurateConfig, cfg.curate_recipe, cfg, *cfg.curate_overrides))
        )
        fitted = step("fit_tokenizers", lambda: fit_tokenizers(cfg, world))
        families = {f: train_and_evaluate(cfg, f, world, fitted, step) for f in cfg.families}
        parent.log_metrics({"time_s/total": sum(step.timings.values())})
        result = DemoResult(toyworld=world, curated=curated, tokenizers=fitted, families=families, timings=step.timings)
        parent.log_metrics(result_metrics(result))
        summary = Path(cfg.out_dir) / "summary.txt"
        atomic_write_text(
            summary,
            "\n".join([accuracy_table(result.evaluation_results()), *artefact_lines(result.evaluation_results())])
            + "\n",
        )
        parent.log_artifact(summary)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(DemoConfig, argv, prog="python -m pipelines.demo", doc=__doc__ or "")
    result = run(cfg)
    print("\ndemo finished:")
    width = max(len(step) for step in [*result.timings, "total"]) + 2
    for step, seconds in result.timings.items():
        print(f"  {step:<{width}} {seconds:8.1f}s")
    print(f"  {'total':<{width}} {sum(result.timings.values()):8.1f}s")
    print("\nevaluation (held-out toy questions; generated images graded by independent judges):")
    print(accuracy_table(result.evaluation_results()))
    for line in artefact_lines(result.evaluation_results()):
        print(line)
    print(f"\noutputs: {Path(cfg.out_dir).resolve()}")
    for family, fam in result.families.items():
        for run_ in fam.runs.values():
            print(f"  {family}: sample grids in {Path(run_.evaluation.out_dir).resolve()}")
    if cfg.tracking.backend == "mlflow":
        uri = resolve_uri(cfg.tracking)
        print(f"MLflow runs: {uri}\n  open the UI with: .venv/bin/mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
