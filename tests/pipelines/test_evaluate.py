"""Evaluation end to end on a random-weight debug checkpoint; the judges on real and drawn images."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from common.tracking import TrackingConfig
from data_prep import toy_render
from evaluation.judges import (
    ARTEFACT_MAX,
    ARTEFACT_Z,
    _chart_chance,
    artefact_peak,
    build_digit_judge,
    judge_colour,
    load_questions,
    normalise_answer,
    read_digits,
    total_chance,
)
from evaluation.toy_eval import (
    EvalConfig,
    EvalReport,
    accuracy_table,
    artefact_lines,
    generated_artefact,
    over_seeds,
    pixel_tensor,
    prompt_binding,
    run_evaluation,
)
from model.inference import load_for_inference
from tests.cpu_math import fast_cpu_math  # noqa: F401 - autouse, module scope
from tests.pipelines.eval_fixtures import make_checkpoint, small_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_world(tmp_path_factory.mktemp("eval") / "toyworld")


def test_digit_judge_classifies_unseen_real_digits(world: Path) -> None:
    judge, acc, n_train = build_digit_judge(world)
    print(f"digit judge: trained on {n_train} real eval-split digits, accuracy {acc:.3f} on unseen real digits")
    assert n_train == 180 and acc > 0.8  # chance is 0.1
    blank = Image.new("RGB", (64, 64))
    assert len(judge.predict([blank, blank])) == 2


def test_colour_judge_names_the_drawn_colour() -> None:
    rng = np.random.default_rng(1)
    hits = []
    for _ in range(30):
        img, facts = toy_render.render_shapes(rng, 64, 3)
        hits.append(judge_colour(img) == facts["color"])
    assert all(hits)
    assert judge_colour(Image.new("RGB", (64, 64), (255, 255, 255))) == "none"
    assert judge_colour(Image.new("RGB", (64, 64), (30, 60, 220))) == "blue"
    assert judge_colour(Image.new("RGB", (64, 64), (90, 90, 90))) == "none"  # grey ink has no hue


def test_colour_judge_reads_blurred_and_faded_shapes_as_their_colour() -> None:
    """A tokenizer that keeps a shape's colour but blurs its edges (8x8-patch means: the debug VQ's code grid)
    or a faint generated shape is judged by its hue, not by the paler mix of colour and white its pixels are;
    a black smudge on a red shape does not change its colour."""
    rng = np.random.default_rng(2)
    for _ in range(30):
        img, facts = toy_render.render_shapes(rng, 64, 3)
        blurred = img.resize((8, 8), Image.Resampling.BOX).resize((64, 64), Image.Resampling.BILINEAR)
        faded = Image.blend(img, Image.new("RGB", img.size, (255, 255, 255)), 0.6)
        assert judge_colour(blurred) == judge_colour(faded) == facts["color"], facts
    red = Image.new("RGB", (64, 64), (255, 255, 255))
    red.paste((220, 30, 30), (10, 10, 40, 40))
    red.paste((0, 0, 0), (20, 20, 60, 30))  # more black pixels than red ones outside the square
    assert judge_colour(red) == "red"


def test_questions_come_from_eval_splits_only(world: Path) -> None:
    qs = load_questions(world, max_per_kind=1000)
    kinds = {q.kind for q in qs}
    assert {"digit", "shape_colour", "shape_kind", "shape_count"} <= kinds
    assert any(k.startswith("chart_doc/") for k in kinds)
    digits = [q for q in qs if q.kind == "digit"]
    assert len(digits) == 180 and all(q.answer in "0123456789" and q.chance == 0.1 for q in digits)
    assert len([q for q in qs if q.kind == "shape_colour"]) == 12
    assert len(load_questions(world, max_per_kind=3)) <= 3 * len(kinds)
    assert normalise_answer("  Red. ") == "red" and normalise_answer("7") == "7"


def test_a_documents_total_is_graded_against_its_likeliest_value() -> None:
    """The total's chance is what always answering the likeliest total scores (exact enumeration of the
    renderer's item counts and amounts), not one over the possible totals; every drawn question has a chance."""
    counts: dict[int, float] = {}
    lo, hi = toy_render.DOC_AMOUNTS
    items = range(toy_render.DOC_ITEMS[0], toy_render.DOC_ITEMS[1] + 1)
    for n in items:
        for amounts in itertools.product(range(lo, hi + 1), repeat=n):
            counts[sum(amounts)] = counts.get(sum(amounts), 0.0) + 1 / ((hi - lo + 1) ** n * len(items))
    assert sum(counts.values()) == pytest.approx(1.0)
    assert total_chance() == pytest.approx(max(counts.values()))
    assert 1.5 / len(counts) < total_chance() < 0.05  # about 0.039: above one over the ~55 totals
    rng = np.random.default_rng(0)
    for _ in range(20):
        _, meta = toy_render.render_document(rng, 64)
        chances = {question: _chart_chance(question, meta) for question, _ in meta["qas"]}
        assert chances["What is the total?"] == total_chance() and None not in chances.values()


def test_evaluate_end_to_end_random_checkpoint(world: Path, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "janus_pro")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = EvalConfig(
        checkpoint=str(ckpt),
        family="janus_pro",
        flavor="debug",
        toyworld_dir=str(world),
        num_samples=6,
        digits_per_class=1,
        shapes_per_prompt=1,
        seeds=[0],
        max_new_tokens=4,
        binding_samples=8,
        out_dir=str(tmp_path / "eval"),
        tracking=TrackingConfig(uri=uri, experiment="test-eval"),
    )
    report = run_evaluation(cfg)
    out = tmp_path / "eval"
    saved = json.loads((out / "eval.json").read_text())
    results = saved["results"]
    assert saved["family"] == "janus_pro" and results == json.loads(json.dumps(report.results))
    assert "understanding/digit" in report.table() and "janus_pro" in report.table()
    # The probe scores the same images, noise and times under both prompts: a random model cannot tell them apart.
    binding = report.prompt_binding
    assert binding["n"] == 8 and binding["right"] > 1.0 and abs(binding["gap"]) < 1e-3 * binding["right"]
    assert saved["prompt_binding"] == pytest.approx(binding) and "prompt binding (8 digits)" in report.table()
    assert results["understanding/digit"]["n"] == 6 and results["understanding/digit"]["chance"] == pytest.approx(0.1)
    assert results["understanding/shape_colour"]["chance"] == pytest.approx(1 / 6)
    top = [
        r
        for k, r in results.items()
        if k.startswith("understanding/") and k.count("/") == 1 and k != "understanding/all"
    ]
    assert {"understanding/digit", "understanding/chart_doc"} <= set(results)
    overall = results["understanding/all"]  # the mean over question types, each weighing the same
    assert overall["accuracy"] == pytest.approx(sum(r["accuracy"] for r in top) / len(top))
    assert overall["chance"] == pytest.approx(sum(r["chance"] for r in top) / len(top))
    assert overall["n"] == sum(r["n"] for r in top)
    digits = results["generation/digits"]
    assert digits["n"] == 10 and 0.0 <= digits["accuracy"] <= 1.0 and digits["judge_accuracy_real_heldout"] > 0.8
    assert results["generation/shapes_colour"]["n"] == 18
    assert Image.open(out / "digits_grid.png").size[1] > 10 * 64  # a row per class
    assert Image.open(out / "shapes_grid.png").size[1] > 6 * 64  # a row per colour
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("test-eval")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "evaluate"
    assert "generation/digits/judge_accuracy_real_heldout" in run.data.metrics
    assert run.data.metrics["probe/prompt_binding/right"] == pytest.approx(binding["right"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.json", "digits_grid.png", "shapes_grid.png"} <= logged


def test_evaluate_rejects_wrong_family(world: Path, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "janus_pro")
    cfg = EvalConfig(checkpoint=str(ckpt), family="janusflow", toyworld_dir=str(world), out_dir=str(tmp_path / "e"))
    with pytest.raises(ValueError, match="family"):
        run_evaluation(cfg)


@pytest.mark.parametrize("weights", [{"janus": 5.0}, {"janusflow": 0.5}])
def test_eval_config_rejects_bad_cfg_weight(weights: dict) -> None:
    with pytest.raises(ValueError, match="cfg_weight"):
        EvalConfig(cfg_weight=weights)


def test_eval_config_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        EvalConfig(temperature=0.0)


def test_janusflow_prompt_binding_scores_both_prompts_at_one_flow_time(world: Path, tmp_path: Path) -> None:
    lm = load_for_inference(make_checkpoint(tmp_path / "ckpt", "janusflow"))
    cfg = EvalConfig(toyworld_dir=str(world), binding_samples=4, binding_t=0.05)
    binding = prompt_binding(cfg, lm)
    assert binding["n"] == 4 and binding["right"] > 0.1 and abs(binding["gap"]) < 1e-3 * binding["right"]
    later = prompt_binding(EvalConfig(toyworld_dir=str(world), binding_samples=4, binding_t=0.9), lm)
    assert abs(later["right"] - binding["right"]) > 1e-3  # the flow time is the one asked for


def _report(accuracies: dict[str, float]) -> EvalReport:
    results = {
        name: {"n": 10, "accuracy": acc, "chance": 0.1, "ratio_to_chance": acc / 0.1}
        for name, acc in accuracies.items()
    }
    return EvalReport(checkpoint="c", family="janus_pro", flavor="debug", results=results, answers=[], seconds=1.0,
                      out_dir="o")  # fmt: skip


def test_results_over_seeds_give_mean_and_spread() -> None:
    reports = [_report({"generation/digits": a, "understanding/digit": b}) for a, b in ((0.4, 0.8), (0.6, 0.7))]
    assert over_seeds(reports[:1]) == reports[0].results  # one seed: its results as they are
    digits = over_seeds(reports)["generation/digits"]
    assert digits["accuracy"] == pytest.approx(0.5) and digits["spread"] == pytest.approx(0.2)
    assert (digits["accuracy_min"], digits["accuracy_max"], digits["n"], digits["seeds"]) == (0.4, 0.6, 20, 2)
    assert digits["ratio_to_chance"] == pytest.approx(5.0)
    table = accuracy_table({"janus_pro": over_seeds(reports)})
    assert "0.500 +-0.200" in table and "0.750 +-0.100" in table
    for report, artefact in zip(reports, (0.01, 0.09), strict=True):
        report.results["generation/digits"]["artefact_peak"] = artefact
    assert over_seeds(reports)["generation/digits"]["artefact_peak"] == 0.09  # the worst seed's
    assert artefact_lines({"janus_pro": over_seeds(reports)}) == [
        f"janus_pro: fixed-position artefact in generated digits 0.090 (over the limit; limit {ARTEFACT_MAX})"
    ]
    assert "artefact in generated digits 0.010 (none;" in reports[0].table()


def _digit_images(world: Path, split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    taken: dict[int, int] = {}
    images, labels = [], []
    for png, label in read_digits(world, split):
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            images.append(Image.open(io.BytesIO(png)).convert("RGB"))
            labels.append(label)
    return images, labels


def test_generated_artefact_tells_a_fixed_spot_from_sampling_noise_and_other_digits(world: Path) -> None:
    """Real digits the check has not seen stand in for a faithful generator (40 images, as the demo's 4 per
    class): no artefact, with per-image noise neither, nor when every digit is drawn bolder (a generator whose
    digits differ all over, as the toy JanusFlow's do); the same digits with a dot at the bottom centre of each,
    as the old debug VQ painted, are flagged."""
    images, _ = _digit_images(world, "train", per_class=4)
    assert len(images) == 40
    clean = generated_artefact(world, images)
    rng = np.random.default_rng(0)
    noisy = [
        Image.fromarray(
            np.clip(np.asarray(i, dtype=np.float64) + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
        )
        for i in images
    ]
    noisy_peak = generated_artefact(world, noisy)
    bold = [Image.fromarray(np.clip(np.asarray(i, dtype=np.float64) * 1.6, 0, 255).astype(np.uint8)) for i in images]
    bold_peak = generated_artefact(world, bold)
    spotted = []
    for img in images:
        arr = np.asarray(img).copy()
        arr[56:60, 30:34] = 255  # a white dot at the bottom centre
        spotted.append(Image.fromarray(arr))
    spotted_peak = generated_artefact(world, spotted)
    print(f"generated-digit artefact: clean {clean:.3f}, noisy {noisy_peak:.3f}, bold {bold_peak:.3f}, "
          f"spotted {spotted_peak:.3f}")  # fmt: skip
    assert max(clean, noisy_peak, bold_peak) < ARTEFACT_MAX
    assert spotted_peak > ARTEFACT_MAX
    # the image-wide measure of the tokenizer fit reads the clean digits' sampling noise alone as an artefact
    reference = pixel_tensor(_digit_images(world, "eval", per_class=100)[0])
    assert artefact_peak(reference, pixel_tensor(images)) > ARTEFACT_MAX
    # and without the neighbourhood, bolder digits everywhere read as one
    assert artefact_peak(reference, pixel_tensor(bold), z_min=ARTEFACT_Z) > ARTEFACT_MAX
    with pytest.raises(ValueError, match="odd number"):
        artefact_peak(reference, pixel_tensor(images), local=8)
    with pytest.raises(ValueError, match="differ in size"):
        artefact_peak(reference, pixel_tensor(images)[:, :, :32, :32])
