"""Images/s of the curation job on this machine's cores against a plain single-process loop.

    .venv/bin/python benchmarks/curate_throughput.py [--images 800] [--cpus 2] [--size 640x480]

Both sides read the same image folder (photo-like JPEGs + caption sidecars) and do the same per-sample work:
read, decode, content hash, resize to the short side, perceptual hash, JPEG encode, tar write. The job
(pipelines.curate.run_curation) also does what the loop does not: staging for resume, global dedup, shard
parquet/stats, rejects and manifests. Ray is started before the clock starts (a cluster is already up); its
start-up time is printed apart. Target: job on 2 cores >= 1.6x the loop.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from data_prep.imaging import (
    ImageConfig,
    content_hash,
    decode_image,
    normalise_image,
    phash64,
    phash_hex,
)
from data_prep.schema import Sample, SampleMeta, encode_sample, image_sha256, make_key
from data_prep.shards import TarShardWriter, shard_name
from data_prep.sources import SourceConfig
from data_prep.writer import ShardConfig
from pipelines.curate import CurateConfig, ExecConfig, run_curation
from pipelines.tracking import TrackingConfig

SHARD_SAMPLES = 200


def make_inputs(folder: Path, n: int, size: tuple[int, int]) -> None:
    """Distinct photo-like pictures: smooth random fields plus fine noise, saved as JPEG q90."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3), dtype=np.int16)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
        (folder / f"{i:06d}.txt").write_text(f"a photo-like picture number {i} with smooth colours")


def plain_loop(folder: Path, out: Path, image_cfg: ImageConfig) -> int:
    """The same per-sample work in one process, no Ray, no staging."""
    files = sorted(folder.glob("*.jpg"))
    writer = None
    for i, path in enumerate(files):
        if i % SHARD_SAMPLES == 0:
            if writer is not None:
                writer.__exit__(None, None, None)
            writer = TarShardWriter(out / shard_name("loop", i // SHARD_SAMPLES)).__enter__()
        data = path.read_bytes()
        text = path.with_suffix(".txt").read_text()
        decoded = decode_image(data, image_cfg.max_pixels)
        chash = content_hash(decoded.rgb)
        rgb, stored, ext = normalise_image(decoded, data, image_cfg)
        meta = SampleMeta(source="loop", source_key=path.stem, task="caption", width=rgb.width, height=rgb.height,
                          sha256=image_sha256(stored), phash=phash_hex(phash64(rgb)), extra={"content": chash})
        writer.write(encode_sample(Sample(key=make_key("loop", path.stem), meta=meta, image=stored,
                                          image_ext=ext, text=text)))
    if writer is not None:
        writer.__exit__(None, None, None)
    return len(files)


def run_job(folder: Path, out: Path, image_cfg: ImageConfig, n: int) -> dict:
    src = SourceConfig(name="bench", kind="caption", format="image_folder", path=str(folder),
                       unit_size=max(8, n // 32))
    cfg = CurateConfig(sources=[src], out_dir=str(out), image=image_cfg,
                       shards=ShardConfig(samples_per_shard=SHARD_SAMPLES),
                       exec=ExecConfig(progress=False), tracking=TrackingConfig(backend="none"))
    (result,) = run_curation(cfg)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--size", default="640x480")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    image_cfg = ImageConfig(short_side=384, quality=90)
    tmp = Path(tempfile.mkdtemp(prefix="curate_bench_"))
    try:
        make_inputs(tmp / "in", args.images, size)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        n_loop = plain_loop(tmp / "in", tmp / "loop", image_cfg)
        loop_s = time.perf_counter() - t0

        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        startup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = run_job(tmp / "in", tmp / "job", image_cfg, args.images)
        job_s = time.perf_counter() - t0
        ray.shutdown()
        assert result["inputs"] == n_loop == args.images, result
        loop_rate, job_rate = n_loop / loop_s, result["inputs"] / job_s
        print(f"inputs: {args.images} JPEG {args.size} -> short side {image_cfg.short_side}, q{image_cfg.quality}")
        print(f"single-process loop : {loop_s:7.2f} s  {loop_rate:8.1f} img/s")
        print(f"curation job ({args.cpus} CPU): {job_s:7.2f} s  {job_rate:8.1f} img/s  "
              f"(kept {result['kept']}, rejected {result['rejected']}; Ray start-up {startup_s:.1f} s not counted)")
        print(f"ratio job/loop      : {job_rate / loop_rate:.2f}x  (target >= 1.6x on 2 cores)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
