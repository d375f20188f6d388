"""What the fitted debug tokenizers keep of the toy images, measured on held-out images, and what the fit costs.

    .venv/bin/python benchmarks/tokenizer_fidelity.py --toyworld /tmp/tw --out /tmp/fid [key=value ...]

Runs the fit_tokenizers job (configs/data/fit_tokenizers_toy.yaml plus the overrides; step metrics go to
{out}/metrics.jsonl) on an existing toy world, then writes beside the tokenizers, per kind:
``heldout_{kind}_{source}.png`` (16 held-out images above their reconstructions) and ``bias_{kind}_{source}.png``
(the per-position |mean reconstruction - mean original| map, scaled so 0.25 intensity is white: a fixed spot
shows as a bright dot). Prints the job's held-out figures (shape colours kept, PSNR, artefact peak) and the fit
seconds as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from common.config import load_config, setup_logging
from model.fit_tokenizers import image_tensor
from model.flavors import get_flavor
from model.inference import image_grid, to_pil
from model.janus_pro import load_vq
from model.janusflow_task import load_vae
from training.tokenizers import (
    FitTokenizersConfig,
    collect_heldout,
    position_bias,
    roundtrip,
    run_fit_tokenizers,
)

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "data" / "fit_tokenizers_toy.yaml"


def _pictures(cfg: FitTokenizersConfig, kinds: list[str]) -> None:
    out, flavor = Path(cfg.out_dir), get_flavor(cfg.flavor)
    heldout = collect_heldout(cfg)
    for kind in kinds:
        module = load_vq(out / kind) if kind == "vq" else load_vae(out / kind)
        size = flavor.vq.image_size if kind == "vq" else flavor.flow.image_size
        for source, imgs in heldout.items():
            x = image_tensor(imgs, size)
            recon = roundtrip(kind, module, x)
            grid = image_grid([to_pil(p) for p in torch.cat([x[:16], recon[:16]])], cols=16)
            grid.save(out / f"heldout_{kind}_{source}.png")
            bias = (position_bias(x, recon) * 4).clamp(0, 1) * 2 - 1
            to_pil(bias.expand(3, -1, -1)).resize((256, 256)).save(out / f"bias_{kind}_{source}.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toyworld", required=True, help="an existing toy world (python -m pipelines.toyworld)")
    parser.add_argument("--out", required=True, help="where the tokenizers, grids and bias maps go")
    parser.add_argument("overrides", nargs="*", help="fit_tokenizers key=value overrides")
    args = parser.parse_args()
    setup_logging("INFO")
    # the SigLIP pre-fit is no tokenizer (nothing to reconstruct): off unless an override turns it on
    base = [f"toyworld_dir={args.toyworld}", f"out_dir={args.out}", "tracking.backend=jsonl", "vision.enabled=false"]
    cfg = load_config(FitTokenizersConfig, RECIPE, [*base, *args.overrides])
    result = run_fit_tokenizers(cfg)
    _pictures(cfg, [kind for kind in result.paths if kind in ("vq", "vae")])
    keep = ("seconds", "psnr_after", "heldout", "kept", "artefact", "codes_used")
    print(json.dumps({k: round(v, 4) for k, v in result.metrics.items() if any(w in k for w in keep)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
