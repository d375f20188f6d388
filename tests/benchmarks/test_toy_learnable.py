"""benchmarks/toy_learnable.py trains the debug model on chosen toy questions alone and grades them held out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import toy_render

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def test_a_forced_chart_kind_draws_that_kind_and_a_bad_one_is_named() -> None:
    rng = np.random.default_rng(0)
    assert {toy_render.render_chart(rng, 64, kind="pie")[1]["doc_type"] for _ in range(5)} == {"pie_chart"}
    with pytest.raises(ValueError, match="'donut'"):
        toy_render.render_chart(rng, 64, kind="donut")


def test_questions_pick_the_kinds_that_ask_them() -> None:
    from benchmarks.toy_learnable import draw, kinds_asking

    assert kinds_asking(["Which bar is highest?", "Which bar is lowest?"], 128) == ["bar"]
    assert kinds_asking(["Which slice is largest?", "What is the total?"], 128) == ["pie", "document"]
    images = draw(6, 0, ["bar", "pie"], ["Which bar is highest?", "Which slice is largest?"], 64)
    assert [facts["doc_type"] for _, facts, _ in images] == ["bar_chart", "pie_chart"] * 3
    for _, facts, qas in images:
        question = "Which bar is highest?" if facts["doc_type"] == "bar_chart" else "Which slice is largest?"
        assert list(qas) == [question] and qas[question] in facts["data"]["labels"]


def test_trains_and_grades_against_the_evaluations_chance(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    script = [sys.executable, "benchmarks/toy_learnable.py"]
    args = ["--train", "12", "--eval", "6", "--steps", "2", "--eval-every", "1", "--batch", "4", "--json", str(out)]
    proc = subprocess.run([*script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["family"] == "janus_pro" and report["kinds"] == ["bar", "pie"] and report["chart_size"] == 128
    assert [r["examples"] for r in report["rows"]] == [4, 8]
    for row in report["rows"]:
        graded = row["questions"]
        assert list(graded) == ["Which bar is highest?", "Which bar is lowest?", "Which slice is largest?"]
        for question, g in graded.items():
            assert g["n"] == 3 and 0.0 <= g["accuracy"] <= 1.0 and 0.0 < g["top_share"] <= 1.0, question
            assert g["ratio"] == pytest.approx(g["accuracy"] / g["chance"])
        assert 1 / 5 <= graded["Which bar is highest?"]["chance"] <= 1 / 3  # one over 3-5 bars
        assert 1 / 4 <= graded["Which slice is largest?"]["chance"] <= 1 / 2  # one over 2-4 slices
    assert "trained on these questions alone" in proc.stdout
    bad = subprocess.run([*script, "--questions", "Which bar?"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "['Which bar?'] are not toy chart/document questions" in bad.stderr
    few = subprocess.run([*script, "--eval", "1"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert few.returncode != 0 and "--eval 1: the questions come from 2 image kinds" in few.stderr
