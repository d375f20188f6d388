"""benchmarks/toy_answerable.py draws the toy world's charts and documents and probes every question type."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = {
    "What is the title of the chart?", "Which bar is highest?", "Which bar is lowest?", "How many bars are there?",
    "Is the line going up or down?", "Which slice is largest?", "How many slices are there?",
    "What is the title of the document?", "What is the total?", "How many items are listed?",
}  # fmt: skip


def test_draw_matches_the_toy_world_and_is_seeded() -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.toy_answerable import draw, question_sets

    first, again = draw(40, 3, 128), draw(40, 3, 128)
    assert [png for png, _ in first] == [png for png, _ in again]
    sets = question_sets(first)
    assert set(sets) <= QUESTIONS and len(sets) >= 6
    for pairs in sets.values():
        assert all(0 <= i < 40 and isinstance(a, str) and a for i, a in pairs)


def test_toy_answerable_reports_every_question_type_against_chance(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    args = ["--train", "160", "--eval", "80", "--epochs", "1", "--sizes", "32", "--vision", "random"]
    args += ["--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "benchmarks/toy_answerable.py", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["chart_size"] == 128 and report["sizes"] == [32]
    assert {r["question"] for r in report["rows"]} == QUESTIONS
    for r in report["rows"]:
        assert r["train"] > 0 and r["eval"] > 0 and r["answers"] >= 2
        assert 0.0 < r["chance"] <= 1.0
        assert 0.0 <= r["acc@32"] <= 1.0 and 0.0 <= r["acc_vision_linear"] <= 1.0
    # the random tower's patch tokens at 64 px, read linearly: the bar count is there even untrained
    assert next(r for r in report["rows"] if r["question"] == "How many bars are there?")["acc_vision_linear"] > 0.5
    assert "probe @32 px" in proc.stdout and "linear @ vision tokens" in proc.stdout
