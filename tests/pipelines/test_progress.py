"""The driver's live progress lines and end-of-stage summary, from a rank-0 metrics log being written."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

from training.progress import StageProgress, progress_line, stage_summary


def _write(log: Path, step: int, loss: float, partial: bool = False) -> None:
    record = {"time": time.time(), "kind": "metrics", "step": step}
    record["metrics"] = {"loss": loss, "loss/t2i": loss + 1, "tokens_per_s": 1000.0 * step, "data_wait_s": 0.01}
    line = json.dumps(record) + "\n"
    with log.open("a") as fh:
        fh.write(line[:10] if partial else line)


def test_progress_follows_the_log_while_training_writes_it(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "rank0.jsonl"
    log.parent.mkdir()
    _write(log, 7, 9.0)  # an earlier attempt's line: history, not shown
    start = log.stat().st_size
    lines: list[str] = []

    def train() -> None:
        for step in range(1, 5):
            time.sleep(0.05)
            _write(log, step, 5.0 - step)
        with log.open("a") as fh:  # a non-metric line and a params line are skipped
            fh.write(json.dumps({"kind": "params", "params": {}}) + "\n")

    with StageProgress(log, "II", total_steps=4, stream=io.StringIO(), poll_s=0.02, emit=lines.append):
        worker = threading.Thread(target=train)
        worker.start()
        worker.join()
    assert [ln.split("  ")[1] for ln in lines] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    assert lines[-1].startswith("stage II") and "loss 1.0000" in lines[-1] and "4,000 tok/s" in lines[-1]
    assert "ETA 0m00s" in lines[-1] and "ETA -" in lines[0]
    table = stage_summary(log, "II", since=start).splitlines()
    assert table[0] == "stage II: steps 1..4"
    assert table[2].split() == ["loss", "4.0000", "1.0000"] and table[3].split() == ["loss/t2i", "5.0000", "2.0000"]
    assert table[4].split() == ["mean", "tokens_per_s", "2,500"]


def test_a_terminal_gets_one_bar_redrawn_in_place(tmp_path: Path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    log = tmp_path / "rank0.jsonl"
    log.touch()
    out = Terminal()
    with StageProgress(log, "I", total_steps=2, stream=out, poll_s=0.01) as progress:
        _write(log, 1, 2.0)
        _write(log, 2, 1.0, partial=True)  # still being written: waits for its newline
        time.sleep(0.1)
        assert progress.shown == 1
    text = out.getvalue()
    assert text.count("\r") == 1 and text.endswith("\n") and "[############............]" in text


def test_progress_line_and_summary_show_what_is_known() -> None:
    line = progress_line("III", 10, 40, {"loss": 0.5, "mfu": 0.412}, eta_s=3725)
    assert line == "stage III  step 10/40  loss 0.5000  MFU 41.2%  ETA 1h02m"
    assert stage_summary(Path("/nonexistent"), "I") == "stage I: no metrics logged"
