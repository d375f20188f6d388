"""What a curation run tells people: the summary table, MLflow metrics, grids of kept samples."""

from __future__ import annotations

import io
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from data_prep.schema import IMAGE_EXTS
from data_prep.shards import iter_tar_records

GRID_CELLS = 16
THUMB = 96


def summary_table(results: Sequence[Mapping[str, Any]], wall_s: float) -> str:
    """Per source: inputs, kept, rejected by reason, bytes, images/s (per worker second, and for the job)."""
    head = f"{'source':<20} {'in':>8} {'kept':>8} {'rejected':>9} {'bytes':>12} {'img/s':>8}  rejected by reason"
    lines = [head, "-" * len(head)]
    total_in = total_kept = total_rej = total_bytes = 0
    for r in results:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(r["rejects_by_reason"].items())) or "-"
        rate = r["inputs"] / r["seconds"] if r["seconds"] > 0 else 0.0
        lines.append(
            f"{r['source']:<20} {r['inputs']:>8} {r['kept']:>8} {r['rejected']:>9} {r['bytes']:>12} "
            f"{rate:>8.1f}  {reasons}"
        )
        total_in += r["inputs"]
        total_kept += r["kept"]
        total_rej += r["rejected"]
        total_bytes += r["bytes"]
    job_rate = total_in / wall_s if wall_s > 0 else 0.0
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<20} {total_in:>8} {total_kept:>8} {total_rej:>9} {total_bytes:>12} {job_rate:>8.1f}"
        f"  (job wall {wall_s:.1f}s; per-source img/s are per worker-second)"
    )
    return "\n".join(lines)


def source_metrics(results: Sequence[Mapping[str, Any]], wall_s: float) -> dict[str, float]:
    out: dict[str, float] = {"wall_s": wall_s}
    total = 0
    for r in results:
        s = r["source"]
        out.update({f"{s}.inputs": r["inputs"], f"{s}.kept": r["kept"], f"{s}.rejected": r["rejected"]})
        out[f"{s}.bytes"] = r["bytes"]
        out[f"{s}.images_per_worker_s"] = r["inputs"] / r["seconds"] if r["seconds"] > 0 else 0.0
        for reason, n in r["rejects_by_reason"].items():
            out[f"{s}.rejected.{reason}"] = n
        total += r["inputs"]
    out["images_per_s"] = total / wall_s if wall_s > 0 else 0.0
    return out


def grid_image(shards: Sequence[Path], seed: int, cells: int = GRID_CELLS) -> Image.Image | None:
    """A 4x4 grid of kept samples of a source (chosen by seed from its first shard); None without images."""
    images = []
    for shard in shards[:1]:
        for rec in iter_tar_records(shard):
            data = next((rec[e] for e in IMAGE_EXTS if e in rec), None)
            if data is not None:
                images.append(data)
    if not images:
        return None
    picked = sorted(random.Random(seed).sample(range(len(images)), min(cells, len(images))))
    side = int(cells**0.5)
    grid = Image.new("RGB", (side * THUMB, side * THUMB), (255, 255, 255))
    for n, i in enumerate(picked):
        im = Image.open(io.BytesIO(images[i])).convert("RGB")
        im.thumbnail((THUMB, THUMB))
        grid.paste(im, ((n % side) * THUMB, (n // side) * THUMB))
    return grid
