"""Live training progress on the driver's console, and the end-of-stage summary.

The driver is blocked in ``TorchTrainer.fit()`` while the workers train; rank 0 writes every logged step
to its JSONL log (``{stage}/logs/rank0.jsonl``, on the storage every node shares). :class:`StageProgress`
follows that file from a thread and shows a line per log step (step/total, loss, tokens/s, MFU where known,
data wait, ETA) through the job's logging, or one bar redrawn in place when stdout is a terminal. The same
lines reach ``ray job logs`` for a submitted job, since the job's driver logs them.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(stage: str, step: int, total: int, metrics: dict[str, float], eta_s: float | None) -> str:
    parts = [f"stage {stage}", f"step {step}/{total}", f"loss {metrics.get('loss', float('nan')):.4f}"]
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    if "mfu" in metrics:
        parts.append(f"MFU {metrics['mfu']:.1%}")
    if "data_wait_s" in metrics:
        parts.append(f"data wait {metrics['data_wait_s']:.3f}s")
    parts.append(f"ETA {_duration(eta_s)}" if eta_s is not None else "ETA -")
    return "  ".join(parts)


def read_metrics(path: Path, offset: int = 0) -> tuple[list[tuple[int, dict[str, float]]], int]:
    """(step, metrics) of the complete metric lines after ``offset``, and the offset after them."""
    if not path.is_file():
        return [], offset
    with path.open("rb") as fh:
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
    rows = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "metrics" and "loss" in record.get("metrics", {}):
            rows.append((int(record.get("step") or 0), record["metrics"]))
    return rows, offset + end


class StageProgress:
    """Show a stage's progress while the block runs (see the module docstring)."""

    def __init__(
        self,
        log: Path,
        stage: str,
        total_steps: int,
        stream: TextIO | None = None,
        poll_s: float = 1.0,
        emit: Callable[[str], None] | None = None,
    ):
        self.log, self.stage, self.total, self.poll_s = Path(log), stage, total_steps, poll_s
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.emit = emit or logging.getLogger("training.progress").info
        """Where a line goes when the stream is no terminal (the job's log)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"progress-{stage}")
        self._offset = 0
        self._start: tuple[int, float] | None = None
        self.shown = 0

    def __enter__(self) -> StageProgress:
        self._offset = self.log.stat().st_size if self.log.is_file() else 0  # earlier attempts are history
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        rows, self._offset = read_metrics(self.log, self._offset)
        for step, metrics in rows:
            now = time.monotonic()
            if self._start is None:
                self._start = (step, now)
            done, elapsed = step - self._start[0], now - self._start[1]
            eta = (self.total - step) * elapsed / done if done > 0 and elapsed > 0 else None
            line = progress_line(self.stage, step, self.total, metrics, eta)
            if self.tty:
                width = 24
                filled = int(width * min(1.0, step / max(1, self.total)))
                self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {line}\x1b[K")
                self.stream.flush()
            else:
                self.emit(line)
            self.shown += 1


def stage_summary(log: Path, stage: str, since: int = 0) -> str:
    """A table of the stage: first and last value of each loss, mean throughput over the logged steps."""
    rows, _ = read_metrics(Path(log), since)
    if not rows:
        return f"stage {stage}: no metrics logged"
    first, last = rows[0][1], rows[-1][1]
    losses = sorted(k for k in last if k == "loss" or k.startswith("loss/"))
    lines = [f"stage {stage}: steps {rows[0][0]}..{rows[-1][0]}", f"  {'metric':<22}{'first':>12}{'last':>12}"]
    lines += [f"  {k:<22}{first.get(k, float('nan')):>12.4f}{last[k]:>12.4f}" for k in losses]
    for key, fmt in (("tokens_per_s", ",.0f"), ("step_time_s", ".3f"), ("data_wait_s", ".4f"), ("mfu", ".1%")):
        values = [m[key] for _, m in rows if key in m]
        if values:
            lines.append(f"  {'mean ' + key:<22}{format(sum(values) / len(values), fmt):>24}")
    return "\n".join(lines)
