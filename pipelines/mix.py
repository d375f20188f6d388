"""Stage mixtures: ``python -m pipelines.mix --config configs/data/mix_<recipe>.yaml [key=value ...]``.

Reads curated sources (their manifests and tars) and writes, per training stage of the recipe,
``{out_dir}/{recipe}/{stage}/{stage}-{000000..N}.tar`` at the recipe's exact group ratios, plus the stage's
``manifest.json`` (target and realised ratios for the whole set and the worst shard, repeat factors, seed,
source manifest hashes). Optionally precomputes VQ ids / VAE latents for the generation samples. Prints the
realised-vs-target table and records it in the MLflow run "mix". The work is data_prep.mixing.mix; this module
is the config, ``run(cfg)`` and ``main(argv)``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from common.config import parse_job_args
from data_prep.manifests import StageManifest
from data_prep.mixing import MixConfig, MixResult, mix

log = logging.getLogger("pipelines.mix")


CONFIG = MixConfig
"""The job's config schema (pipelines.__main__ and the recipe tests look for it)."""


def ratio_table(manifests: dict[str, StageManifest]) -> str:
    """Realised vs target ratios per stage and group: whole set and worst shard."""
    lines = [f"{'stage':<14}{'group':<15}{'target':>9}{'realised':>10}{'count':>9}{'worst shard dev':>17}"]
    for stage, m in manifests.items():
        for g, info in m.groups.items():
            lines.append(
                f"{stage:<14}{g:<15}{info['target_ratio']:>9.4f}{info['realised_ratio']:>10.4f}"
                f"{info['count']:>9d}{info['worst_shard_deviation']:>17.3f}"
            )
        for p, ph in enumerate(m.phases if len(m.phases) > 1 else []):
            pairs = ", ".join(f"{g} {ph['realised_ratios'][g]:.4f}/{t:.4f}" for g, t in ph["target_ratios"].items())
            lines.append(f"{'':<14}phase {p} [{ph['start']}, {ph['end']}): realised/target {pairs}")
    return "\n".join(lines)


def run(cfg: MixConfig) -> MixResult:
    """Write the chosen stages and record the run "mix" (data_prep.mixing.mix)."""
    return mix(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(MixConfig, argv, prog="python -m pipelines.mix", doc=__doc__ or "")
    result = run(cfg)
    log.info("recipe %s: stage shards in %s", cfg.recipe, Path(cfg.out_dir) / cfg.recipe)
    print(ratio_table(result.manifests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
