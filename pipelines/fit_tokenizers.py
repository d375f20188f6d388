"""Fit the debug flavor's generation tokenizers on toy images: ``python -m pipelines.fit_tokenizers --config ...``.

Fits the Janus-Pro VQ and/or the JanusFlow VAE (``training.tokenizers``) and writes ``{out_dir}/vq/``,
``{out_dir}/vae/``, ``fit_tokenizers.json`` and reconstruction grids. Training picks them up with
``model.vq_path={out_dir}/vq`` and ``model.vae_path={out_dir}/vae``. Logged as the MLflow child run
``fit_tokenizers``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from common.config import parse_job_args
from training.tokenizers import FitTokenizersConfig, TokenizerFitResult, run_fit_tokenizers

log = logging.getLogger("pipelines.fit_tokenizers")

CONFIG = FitTokenizersConfig


def run(cfg: FitTokenizersConfig) -> TokenizerFitResult:
    """Fit, save and record the enabled tokenizers; where they went and their figures."""
    return run_fit_tokenizers(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(FitTokenizersConfig, argv, prog="python -m pipelines.fit_tokenizers", doc=__doc__ or "")
    result = run(cfg)
    for kind, path in result.paths.items():
        log.info("%s -> %s", kind, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
