"""Fault drills: named points in production code that a test (or a game day) arms; inert unless armed.

Production code calls ``point("curate.unit", unit=7)`` where a failure is worth rehearsing. Nothing happens
unless a drill armed that point with matching context. Drills travel in one environment variable, so they reach
every process the job starts: Ray workers started after ``arm`` inherit it, and a job that joins a running Ray
passes ``env_vars()`` in its workers' ``runtime_env``. No config of a production job carries a drill.

    with faults.arm(Fault("train.step_end", "kill", when={"stage": "II", "step": 5, "rank": 1}, once=marker)):
        run(cfg)

Actions: ``raise`` (an ``InjectedFault``), ``kill`` (SIGKILL of the calling process, as an OOM kill or a lost
node would), ``kill_group`` (SIGKILL of the process group named by the point's ``pgid``: the whole job), and
``custom`` (the point's caller decides what happens, through ``matching``). ``once`` names a marker file: the
drill fires only while the marker does not exist, and creates it first, so a restarted worker does not fail
again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("common.faults")

ENV = "JANUS_FAULT_DRILLS"
Action = Literal["raise", "kill", "kill_group", "custom"]
ACTIONS = ("raise", "kill", "kill_group", "custom")


class InjectedFault(RuntimeError):
    """The failure a drill asked for (never raised unless a drill is armed)."""


@dataclass(frozen=True)
class Fault:
    point: str
    """The named point, e.g. ``curate.unit``, ``curate.shard``, ``train.step_end``, ``train.checkpoint_upload``."""
    action: Action = "raise"
    when: dict[str, Any] = field(default_factory=dict)
    """Context values the point must report for the drill to fire (all of them)."""
    once: str = ""
    """Marker file; when set the drill fires once (the marker remembers, across processes and restarts)."""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"fault drill at {self.point!r}: action {self.action!r} is not one of {ACTIONS}")

    def matches(self, name: str, ctx: dict[str, Any]) -> bool:
        return name == self.point and all(ctx.get(k) == v for k, v in self.when.items())


def armed() -> list[Fault]:
    raw = os.environ.get(ENV)
    if not raw:
        return []
    try:
        return [Fault(**spec) for spec in json.loads(raw)]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ENV}: not a list of fault drills ({e}): {raw[:200]!r}") from e


def env_vars() -> dict[str, str]:
    """The armed drills as environment variables, for a Ray ``runtime_env`` (empty when none is armed)."""
    raw = os.environ.get(ENV)
    return {ENV: raw} if raw else {}


@contextlib.contextmanager
def arm(*drills: Fault) -> Iterator[None]:
    """Arm these drills (on top of any armed already) in this process and the processes it starts."""
    before = os.environ.get(ENV)
    os.environ[ENV] = json.dumps([asdict(d) for d in [*armed(), *drills]])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def _claim(marker: str) -> bool:
    """True the first time (creates the marker), False once the marker exists."""
    if not marker:
        return True
    path = Path(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"fault drill fired here (pid {os.getpid()})\n")
    return True


def matching(name: str, **ctx: Any) -> Fault | None:
    """The drill armed at this point for this context, claimed (its ``once`` marker written), or None."""
    for drill in armed():
        if drill.matches(name, ctx) and _claim(drill.once):
            log.warning("fault drill: %s at %s %s (pid %d)", drill.action, name, ctx, os.getpid())
            return drill
    return None


def point(name: str, **ctx: Any) -> None:
    """A named point: carries out the drill armed here for this context, if any (``custom`` drills are left to
    callers of ``matching``)."""
    if not os.environ.get(ENV):
        return
    drill = next((d for d in armed() if d.action != "custom" and d.matches(name, ctx)), None)
    if drill is None or not _claim(drill.once):
        return
    log.warning("fault drill: %s at %s %s (pid %d)", drill.action, name, ctx, os.getpid())
    if drill.action == "raise":
        raise InjectedFault(f"fault drill at {name} {ctx}")
    if drill.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if drill.action == "kill_group":
        os.killpg(int(ctx["pgid"]), signal.SIGKILL)
