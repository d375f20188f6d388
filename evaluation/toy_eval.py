"""The toy world's evaluation of a checkpoint: held-out questions and judged generations.

- Understanding: held-out questions of the toy world's eval splits (digit identity, shape colour, chart and
  document questions), greedy answers, exact normalised match; accuracy per question type, its chance level
  and the ratio to chance, and ``understanding/all``: the mean over question types of accuracy and of chance.
- Generation, graded by independent judges (``evaluation.judges``): images for "a handwritten digit K" graded
  by a classifier trained on real held-out digits (its own accuracy on unseen real digits is reported too),
  and images for "a {colour} {shape} in the center" graded by their dominant colour.

``evaluate_checkpoint`` writes ``{out_dir}/eval.json``, ``digits_grid.png`` (a row per class) and
``shapes_grid.png`` (a row per colour); ``run_evaluation`` also logs all of it to the MLflow child run
``evaluate``. The job is ``pipelines.evaluate``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.config import save_resolved, to_flat_dict
from common.io import atomic_write_json
from common.lineage import find_stage_model
from common.tables import text_table
from common.tracking import TrackingConfig, build_tracker
from data_prep.schema import Sample, SampleMeta
from data_prep.toy_render import COLORS, SHAPES
from evaluation.judges import (
    ARTEFACT_LOCAL,
    ARTEFACT_MAX,
    ARTEFACT_Z,
    artefact_peak,
    build_digit_judge,
    judge_colour,
    load_questions,
    normalise_answer,
    read_digits,
)
from model.build import ModelConfig, build_collate, build_task
from model.family import get_family
from model.flavors import FAMILIES
from model.inference import LoadedModel, answer, generate_images, image_grid, load_for_inference

EVAL_FILE = "eval.json"
logger = logging.getLogger("evaluation.toy_eval")


@dataclass(kw_only=True)
class EvalConfig:
    checkpoint: str = "outputs/checkpoints/debug_janus_pro-stage_III/final"
    """A training stage's final/ folder (model.safetensors + stage_done.json) or an export directory."""
    family: str | None = None
    """Expected family (janus_pro / janusflow); None = whatever the checkpoint holds."""
    flavor: str | None = None
    """Expected flavor; None = whatever the checkpoint holds."""
    vae_path: str | None = None
    """JanusFlow: diffusers VAE that decodes the latents (the fitted one); None = found beside the checkpoint or
    recorded in its stage's inputs.json; none found is an error (a random VAE would grade noise)."""
    toyworld_dir: str = "outputs/toyworld"
    """Toy world root; only its eval/ splits are asked (the digit judge trains on digits/eval)."""
    num_samples: int = 100
    """Understanding: at most this many questions per question type."""
    digits_per_class: int = 4
    """Generation: images per digit class per seed."""
    shapes_per_prompt: int = 1
    """Generation: images per (colour, shape) prompt per seed."""
    cfg_weight: dict[str, float] = field(default_factory=dict)
    """Classifier-free guidance weight per family (e.g. ``{janusflow: 5.0}``); a family not named samples with
    its paper weight (Janus-Pro 5, JanusFlow 2)."""
    temperature: float = 1.0
    """Janus-Pro's image-token sampling temperature (the paper's: 1); JanusFlow ignores it."""
    binding_samples: int = 50
    """Prompt-binding probe: real eval digits whose generation loss is measured with their own prompt and with
    another digit's (0 = no probe)."""
    binding_t: float = 0.05
    """JanusFlow's probe: the flow time of every sample (small t = mostly noise, where the prompt matters)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Sampling seeds; every generation prompt is sampled once per seed."""
    batch_size: int = 16
    """Prompts or questions per forward batch."""
    max_new_tokens: int = 12
    """Longest answer in tokens (toy answers are a word or a number)."""
    threads: int = 2
    """torch intra-op threads (CPU)."""
    out_dir: str = "outputs/eval"
    """Writes eval.json and the sample grids here."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Where the run is recorded."""

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size", "max_new_tokens", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EvalConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.binding_t < 1.0:
            raise ValueError(f"EvalConfig.binding_t must be in (0, 1), got {self.binding_t}")
        for name in ("digits_per_class", "shapes_per_prompt", "binding_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"EvalConfig.{name} must be >= 0, got {getattr(self, name)}")
        for family, weight in self.cfg_weight.items():
            if family not in FAMILIES or weight < 1.0:
                raise ValueError(
                    f"EvalConfig.cfg_weight[{family!r}] = {weight}: family must be one of {FAMILIES}, weight >= 1"
                )
        if self.temperature <= 0:
            raise ValueError(f"EvalConfig.temperature must be > 0, got {self.temperature}")
        if not self.seeds:
            raise ValueError("EvalConfig.seeds must name at least one seed")


def _check_expected(cfg: EvalConfig, lm: LoadedModel) -> None:
    if cfg.family is not None and cfg.family != lm.family:
        raise ValueError(f"EvalConfig.family {cfg.family!r} but {cfg.checkpoint} holds {lm.family!r}")
    if cfg.flavor is not None and cfg.flavor != lm.flavor.name:
        raise ValueError(f"EvalConfig.flavor {cfg.flavor!r} but {cfg.checkpoint} holds {lm.flavor.name!r}")


def _summary(correct: list[bool], chance: float | None) -> dict[str, float | None]:
    acc = sum(correct) / len(correct)
    return {"n": len(correct), "accuracy": acc, "chance": chance, "ratio_to_chance": acc / chance if chance else None}


def evaluate_understanding(cfg: EvalConfig, lm: LoadedModel) -> tuple[dict[str, dict], list[dict]]:
    """Per question type: n, accuracy, chance, ratio; plus every (question, expected, answer) for the record."""
    questions = load_questions(cfg.toyworld_dir, cfg.num_samples)
    answers: list[str] = []
    for i in range(0, len(questions), cfg.batch_size):
        chunk = questions[i : i + cfg.batch_size]
        answers += answer(lm, [(q.image, q.question) for q in chunk], cfg.max_new_tokens)
    by_kind: dict[str, list[bool]] = defaultdict(list)
    chances: dict[str, list[float]] = defaultdict(list)
    records = []
    for q, got in zip(questions, answers, strict=True):
        ok = normalise_answer(got) == normalise_answer(q.answer)
        by_kind[q.kind].append(ok)
        if q.chance is not None:
            chances[q.kind].append(q.chance)
        records.append({"kind": q.kind, "question": q.question, "expected": q.answer, "answer": got, "correct": ok})
    graded = [
        (ok, q.chance)
        for q, ok in zip(questions, (r["correct"] for r in records), strict=True)
        if q.kind.startswith("chart_doc/") and q.chance is not None
    ]
    if graded:  # every chart/document question with a known chance (a document's total: its likeliest value's)
        by_kind["chart_doc"] = [ok for ok, _ in graded]
        chances["chart_doc"] = [c for _, c in graded]
    results = {}
    for kind, oks in sorted(by_kind.items()):
        cs = chances.get(kind)
        results[kind] = _summary(oks, sum(cs) / len(cs) if cs and len(cs) == len(oks) else None)
    top = [r for kind, r in results.items() if "/" not in kind and r["chance"] is not None]
    if top:  # every question type weighs the same, whatever its count
        acc, chance = (sum(r[k] for r in top) / len(top) for k in ("accuracy", "chance"))
        results["all"] = {
            "n": sum(r["n"] for r in top),
            "accuracy": acc,
            "chance": chance,
            "ratio_to_chance": acc / chance,
        }
    return results, records


PROBE_MAX_LEN = 512
"""Packed row length of the probe's batches: a digit prompt and its image tokens fit many times over."""

PROBE_TASK_SETTINGS = {"repa_weight": 0.0, "compute_metrics": True}
"""Task settings of the probe where the task has them: the generation loss alone, per task."""


@torch.no_grad()
def prompt_binding(cfg: EvalConfig, lm: LoadedModel) -> dict[str, float]:
    """The generation loss of real held-out digits with their own prompt and with another digit's (the same
    images, noise and flow times): a model that uses the prompt has a clearly lower loss with the right one.
    An unconditioned model shows no gap whatever its loss; an undertrained one a small gap at a high loss."""
    digits = read_digits(Path(cfg.toyworld_dir), "eval")[: cfg.binding_samples]
    model_cfg = ModelConfig(flavor=lm.flavor.name, family=lm.family, max_len=PROBE_MAX_LEN)
    task = build_task(lm.model, lm.flavor, model_cfg, vae=lm.vae)
    settings = {**PROBE_TASK_SETTINGS, "t_mu": math.log(cfg.binding_t / (1 - cfg.binding_t)), "t_sigma": 1e-6}
    task.cfg = dataclasses.replace(task.cfg, **{k: v for k, v in settings.items() if hasattr(task.cfg, k)})
    task.eval()
    collate = build_collate(lm.flavor, model_cfg, lm.tokenizer, seed=0, train=False)

    def loss(label_of: Callable[[int], int]) -> float:
        total = count = 0.0
        for i in range(0, len(digits), cfg.batch_size):
            samples = [
                Sample(f"probe{j}", SampleMeta("probe", f"probe{j}", "t2i"), png, "png",
                       text=f"a handwritten digit {label_of(label)}")
                for j, (png, label) in enumerate(digits[i : i + cfg.batch_size], start=i)
            ]  # fmt: skip
            torch.manual_seed(i)  # the same noise and times for both prompts
            _, metrics = task(collate(samples))
            s, c = (float(v) for v in metrics["loss/t2i"])
            total, count = total + s, count + c
        return total / count

    right, swapped = loss(lambda k: k), loss(lambda k: (k + 5) % 10)
    return {"n": float(len(digits)), "right": right, "swapped": swapped, "gap": swapped - right}


def _sampling(cfg: EvalConfig, lm: LoadedModel) -> dict[str, float | None]:
    """The family's guidance weight and sampling temperature (where its sampler has one)."""
    return {
        "cfg_weight": cfg.cfg_weight.get(lm.family),
        "temperature": cfg.temperature if get_family(lm.family).samples_with_temperature else 1.0,
    }


def pixel_tensor(images: list) -> torch.Tensor:
    """PIL images -> [N, 3, H, W] in [-1, 1]."""
    return (
        torch.stack([torch.from_numpy(np.asarray(i.convert("RGB"), dtype=np.float32)) for i in images]).permute(
            0, 3, 1, 2
        )
        / 127.5
        - 1
    )


def generated_artefact(toyworld: Path, images: list) -> float:
    """:func:`artefact_peak` of generated digits against every real held-out digit (``digits/eval``, all
    classes, about as balanced as the prompts): a spot the tokenizer or the generator paints at one place in
    every image stands out from its surroundings (``ARTEFACT_LOCAL``); sampling noise (``ARTEFACT_Z``) and
    digits that differ from the real ones all over do not. The many real digits keep the reference's
    noise low, so a few dozen generated ones are enough to see a spot in every image."""
    real = [Image.open(io.BytesIO(png)).convert("RGB") for png, _ in read_digits(toyworld, "eval")]
    reference = pixel_tensor([r if r.size == images[0].size else r.resize(images[0].size) for r in real])
    return artefact_peak(reference, pixel_tensor(images), z_min=ARTEFACT_Z, local=ARTEFACT_LOCAL)


def evaluate_digits(cfg: EvalConfig, lm: LoadedModel, out: Path) -> dict[str, float | None]:
    """Generated digits graded by the real-digit judge and checked for a fixed-position artefact against real
    digits; the grid has a row per class (first seed)."""
    judge, judge_acc, judge_n = build_digit_judge(Path(cfg.toyworld_dir))
    prompts = [f"a handwritten digit {k}" for k in range(10) for _ in range(cfg.digits_per_class)]
    labels = [k for k in range(10) for _ in range(cfg.digits_per_class)]
    correct: list[bool] = []
    generated: list = []
    sampling = _sampling(cfg, lm)
    for s, seed in enumerate(cfg.seeds):
        images = generate_images(lm, prompts, seed=seed, batch_size=cfg.batch_size, **sampling)
        correct += [p == y for p, y in zip(judge.predict(images), labels, strict=True)]
        generated += images
        if s == 0:
            image_grid(images, cols=cfg.digits_per_class).save(out / "digits_grid.png", format="PNG")
    artefact = generated_artefact(Path(cfg.toyworld_dir), generated)
    if artefact > ARTEFACT_MAX:
        logger.warning(
            "generated digits carry a fixed-position artefact: %.3f > %s (digits_grid.png shows it)",
            artefact,
            ARTEFACT_MAX,
        )
    return {
        **_summary(correct, 0.1),
        "judge_accuracy_real_heldout": judge_acc,
        "judge_train_size": judge_n,
        "artefact_peak": artefact,
    }


def evaluate_shapes(cfg: EvalConfig, lm: LoadedModel, out: Path) -> dict[str, float | None]:
    """Generated shapes graded by their dominant colour; the grid has a row per colour (first seed)."""
    combos = [(c, s) for c in COLORS for s in SHAPES for _ in range(cfg.shapes_per_prompt)]
    prompts = [f"a {c} {s} in the center" for c, s in combos]
    correct: list[bool] = []
    sampling = _sampling(cfg, lm)
    for i, seed in enumerate(cfg.seeds):
        images = generate_images(lm, prompts, seed=seed, batch_size=cfg.batch_size, **sampling)
        correct += [judge_colour(img) == c for img, (c, _) in zip(images, combos, strict=True)]
        if i == 0:
            image_grid(images, cols=len(SHAPES) * cfg.shapes_per_prompt).save(out / "shapes_grid.png", format="PNG")
    return _summary(correct, 1 / len(COLORS))


def result_metrics(results: dict[str, dict]) -> dict[str, float]:
    out = {}
    for name, r in results.items():
        for key in ("accuracy", "ratio_to_chance", "judge_accuracy_real_heldout", "artefact_peak"):
            if r.get(key) is not None:
                out[f"{name}/{key}"] = float(r[key])
    return out


def _logged_model(cfg: EvalConfig) -> str | None:
    """The MLflow logged model of the evaluated stage (its ``final/`` or ``export/`` folder's stage)."""
    if cfg.tracking.backend != "mlflow":
        return None
    return find_stage_model(cfg.tracking, Path(cfg.checkpoint).resolve().parent)


@dataclass(kw_only=True)
class EvalReport:
    """What one evaluation found (also written as ``{out_dir}/eval.json``)."""

    checkpoint: str
    family: str
    flavor: str
    results: dict[str, dict]
    """Metric name (``understanding/<kind>``, ``generation/digits``, ...) -> n, accuracy, chance, ratio."""
    answers: list[dict]
    """Every question asked: kind, question, expected, answer, correct."""
    seconds: float
    out_dir: str
    prompt_binding: dict[str, float] = field(default_factory=dict)
    """Generation loss of held-out digits with the right / a swapped prompt (``prompt_binding``)."""
    model_id: str | None = None
    """The MLflow logged model of the evaluated stage, when there is one (it carries these metrics too)."""

    def table(self) -> str:
        lines = [accuracy_table({self.family: self.results}), *artefact_lines({self.family: self.results})]
        if self.prompt_binding:
            p = self.prompt_binding
            lines.append(
                f"prompt binding ({int(p['n'])} digits): generation loss {p['right']:.4f} with the right "
                f"prompt, {p['swapped']:.4f} with a swapped one (gap {p['gap']:+.4f})"
            )
        return "\n".join(lines)


def evaluate_checkpoint(cfg: EvalConfig) -> EvalReport:
    """Ask the checkpoint every question and grade its images; writes eval.json and the grids to out_dir."""
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    out = Path(cfg.out_dir)
    save_resolved(cfg, out)
    start = time.perf_counter()
    lm = load_for_inference(cfg.checkpoint, cfg.vae_path, require_vae=True)  # a random VAE grades noise
    _check_expected(cfg, lm)
    und, records = evaluate_understanding(cfg, lm)
    results = {f"understanding/{k}": v for k, v in und.items()}
    if cfg.digits_per_class:
        results["generation/digits"] = evaluate_digits(cfg, lm, out)
    if cfg.shapes_per_prompt:
        results["generation/shapes_colour"] = evaluate_shapes(cfg, lm, out)
    binding = prompt_binding(cfg, lm) if cfg.binding_samples else {}
    report = EvalReport(
        prompt_binding=binding,
        checkpoint=cfg.checkpoint,
        family=lm.family,
        flavor=lm.flavor.name,
        results=results,
        answers=records,
        seconds=time.perf_counter() - start,
        out_dir=str(out),
    )
    atomic_write_json(out / EVAL_FILE, {k: v for k, v in asdict(report).items() if k not in ("out_dir", "model_id")})
    return report


def run_evaluation(cfg: EvalConfig) -> EvalReport:
    """The evaluate job: evaluate, then record params, metrics and files in the MLflow child run ``evaluate``
    (and the metrics on the stage's logged model)."""
    report = evaluate_checkpoint(cfg)
    out = Path(cfg.out_dir)
    with build_tracker(cfg.tracking, "evaluate", jsonl_path=out / "metrics.jsonl") as tracker:
        tracker.log_params(to_flat_dict(cfg))
        tracker.log_metrics(result_metrics(report.results))
        tracker.log_metrics({f"probe/prompt_binding/{k}": v for k, v in report.prompt_binding.items()})
        report.model_id = _logged_model(cfg)
        if report.model_id:  # the stage's logged model carries its evaluation too
            tracker.log_model_metrics(report.model_id, result_metrics(report.results))
        for name in (EVAL_FILE, "config.resolved.yaml", "digits_grid.png", "shapes_grid.png"):
            if (out / name).is_file():
                tracker.log_artifact(out / name)
    return report


def over_seeds(reports: list[EvalReport]) -> dict[str, dict]:
    """Metric -> mean accuracy over the reports (one per training seed), its min, max and spread (max - min),
    summed n, chance and the mean's ratio to chance; with one report its results as they are."""
    if len(reports) == 1:
        return reports[0].results
    out = {}
    for name in reports[0].results:
        runs = [r.results[name] for r in reports if name in r.results]
        accs = [r["accuracy"] for r in runs]
        mean, chance = sum(accs) / len(accs), runs[0].get("chance")
        out[name] = {
            "n": sum(r["n"] for r in runs),
            "accuracy": mean,
            "accuracy_min": min(accs),
            "accuracy_max": max(accs),
            "spread": max(accs) - min(accs),
            "seeds": len(runs),
            "chance": chance,
            "ratio_to_chance": mean / chance if chance else None,
        }
        artefacts = [r["artefact_peak"] for r in runs if r.get("artefact_peak") is not None]
        if artefacts:  # the worst seed's
            out[name]["artefact_peak"] = max(artefacts)
    return out


def artefact_lines(results: dict[str, dict[str, dict]]) -> list[str]:
    """Per family, the generated digits' fixed-position artefact (:func:`generated_artefact`) against its limit."""
    lines = []
    for family, metrics in results.items():
        artefact = metrics.get("generation/digits", {}).get("artefact_peak")
        if artefact is not None:
            verdict = "over the limit" if artefact > ARTEFACT_MAX else "none"
            limit = f"limit {ARTEFACT_MAX}"
            lines.append(f"{family}: fixed-position artefact in generated digits {artefact:.3f} ({verdict}; {limit})")
    return lines


def accuracy_table(results: dict[str, dict[str, dict]]) -> str:
    """One row per (family, metric): n, accuracy (mean +- spread over seeds, where there are several), chance
    and the ratio to chance."""
    rows = [
        [family, name, str(r["n"]), f"{r['accuracy']:.3f}" + (f" +-{r['spread']:.3f}" if "spread" in r else ""),
         _maybe(r.get("chance"), ".3f"), _maybe(r.get("ratio_to_chance"), ".2f")]
        for family, metrics in results.items()
        for name, r in metrics.items()
    ]  # fmt: skip
    if not rows:
        return "(no evaluation results)"
    return text_table(["family", "metric", "n", "accuracy", "chance", "x chance"], rows, align="llrrrr")


def _maybe(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)
