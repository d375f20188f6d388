"""``janus-pipeline <job> --config FILE [key=value ...]``: one entry point for every job.

Each job is also ``python -m pipelines.<job>``. A job module exposes ``CONFIG`` (its config dataclass)
and ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

JOBS: dict[str, str] = {
    "toyworld": "pipelines.toyworld",
    "demo": "pipelines.demo",
    "mix": "pipelines.mix",
    "curate": "pipelines.curate",
    "train": "pipelines.train",
    "fit_tokenizers": "pipelines.fit_tokenizers",
    "evaluate": "pipelines.evaluate",
    "eval": "pipelines.evaluate",  # so configs/eval_*.yaml recipes map to evaluate
    "generate": "pipelines.generate",
}
"""Job name -> module. Add a job here when its module lands."""


def job_module(name: str) -> ModuleType:
    if name not in JOBS:
        raise KeyError(f"unknown job {name!r}; valid: {sorted(JOBS)}")
    return importlib.import_module(JOBS[name])


def recipe_job(path: str | Path) -> str:
    """Which job a recipe under configs/ is for: configs/train/* -> train, configs/data/<job>_* -> <job>."""
    path = Path(path)
    if path.parent.name == "train":
        return "train"
    stem = path.stem
    for job in sorted(JOBS, key=len, reverse=True):
        if stem == job or stem.startswith(f"{job}_"):
            return job
    raise KeyError(f"{path}: no job matches this recipe name; name it <job>_*.yaml with a job in {sorted(JOBS)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: janus-pipeline JOB --config FILE [key=value ...]\njobs: {', '.join(sorted(JOBS))}")
        return 0 if args else 2
    try:
        module = job_module(args[0])
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
