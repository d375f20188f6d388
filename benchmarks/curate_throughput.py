"""Images/s of the curation job on this machine's cores against a plain single-process loop.

    .venv/bin/python benchmarks/curate_throughput.py [--images 1200] [--cpus 2] [--size 640x480] [--rounds 2]

Both sides read the same image folder (photo-like JPEGs + caption sidecars) and do the same per-sample work:
read, decode, content hash, resize to the short side, perceptual hash, JPEG encode, tar write. The job
(pipelines.curate.run_curation) also does what the loop does not: staging for resume, global dedup, shard
parquet/stats, rejects and manifests. Ray is started before the clock starts (a cluster is already up); its
start-up time (and Ray Data's first-dataset warm-up) is printed apart. The machine may be shared: loop and job
alternate for --rounds and the best time of each is reported, with the load average seen.
Target: job on 2 cores >= 1.6x the loop.
"""

from __future__ import annotations

import argparse
import os
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


def plain_loop(folder: Path, out: Path, image_cfg: ImageConfig, part: int = 0, parts: int = 1) -> int:
    """The same per-sample work in one process, no Ray, no staging (over part ``part`` of ``parts``)."""
    files = sorted(folder.glob("*.jpg"))
    files = files[part * len(files) // parts : (part + 1) * len(files) // parts]
    writer = None
    for i, path in enumerate(files):
        if i % SHARD_SAMPLES == 0:
            if writer is not None:
                writer.__exit__(None, None, None)
            writer = TarShardWriter(out / shard_name(f"loop{part}", i // SHARD_SAMPLES)).__enter__()
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


def process_pool_loop(folder: Path, out: Path, image_cfg: ImageConfig, cpus: int) -> int:
    """The ceiling: the plain loop split over ``cpus`` processes (what this machine gives right now)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(cpus) as pool:
        futures = [pool.submit(plain_loop, folder, out, image_cfg, p, cpus) for p in range(cpus)]
        return sum(f.result() for f in futures)


def run_job(folder: Path, out: Path, image_cfg: ImageConfig, unit_size: int) -> dict:
    src = SourceConfig(name="bench", kind="caption", format="image_folder", path=str(folder), unit_size=unit_size)
    cfg = CurateConfig(sources=[src], out_dir=str(out), image=image_cfg,
                       shards=ShardConfig(samples_per_shard=SHARD_SAMPLES),
                       exec=ExecConfig(progress=False), tracking=TrackingConfig(backend="none"))
    (result,) = run_curation(cfg)
    return result


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and every live descendant (Ray's raylet, GCS, workers)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--rounds", type=int, default=3, help="alternate loop and job; report the best of each")
    parser.add_argument("--unit-size", type=int, default=0, help="images per Ray task; 0: images / (12 x cpus)")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    image_cfg = ImageConfig(short_side=384, quality=90)
    tmp = Path(tempfile.mkdtemp(prefix="curate_bench_"))
    try:
        make_inputs(tmp / "in", args.images, size)  # type: ignore[arg-type]
        import ray

        # Ray starts workers at nice 15 (they yield to every other process); on a shared machine that would
        # compare a nice-0 loop against deprioritised workers, so both run at the same priority here.
        os.environ.setdefault("RAY_worker_niceness", "0")
        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        # Ray Data's system actors (stats, autoscaling coordinator) start with the first dataset of a session:
        # part of bringing the cluster up, not of curating
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray.data.range(2).map_batches(lambda b: b).take_all()
        startup_s = time.perf_counter() - t0
        loop_times: list[float] = []
        job_times: list[float] = []
        loop_cpu: list[float] = []
        pool_times: list[float] = []
        job_cpu: list[float] = []
        for r in range(args.rounds):
            for d in ("loop", "pool", "job"):
                shutil.rmtree(tmp / d, ignore_errors=True)
            t0, c0 = time.perf_counter(), time.process_time()
            n_loop = plain_loop(tmp / "in", tmp / "loop", image_cfg)
            loop_times.append(time.perf_counter() - t0)
            loop_cpu.append(time.process_time() - c0)
            t0 = time.perf_counter()
            process_pool_loop(tmp / "in", tmp / "pool", image_cfg, args.cpus)
            pool_times.append(time.perf_counter() - t0)
            t0, c0 = time.perf_counter(), tree_cpu_seconds()
            unit_size = args.unit_size or max(8, -(-args.images // (12 * args.cpus)))
            result = run_job(tmp / "in", tmp / "job", image_cfg, unit_size)
            job_times.append(time.perf_counter() - t0)
            job_cpu.append(tree_cpu_seconds() - c0)
            assert result["inputs"] == n_loop == args.images, result
            print(f"round {r}: loop {loop_times[-1]:.2f} s ({loop_cpu[-1]:.2f} CPU s), {args.cpus}-process loop "
                  f"{pool_times[-1]:.2f} s, job {job_times[-1]:.2f} s ({job_cpu[-1]:.2f} CPU s, all Ray processes), "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
        ray.shutdown()
        loop_rate, job_rate = args.images / min(loop_times), args.images / min(job_times)
        print(f"inputs: {args.images} JPEG {args.size} -> short side {image_cfg.short_side}, q{image_cfg.quality}; "
              f"machine: {os.cpu_count()} cores")
        print(f"single-process loop : {min(loop_times):7.2f} s  {loop_rate:8.1f} img/s")
        print(f"curation job ({args.cpus} CPU): {min(job_times):7.2f} s  {job_rate:8.1f} img/s  "
              f"(kept {result['kept']}, rejected {result['rejected']}; "
              f"Ray + Ray Data start-up {startup_s:.1f} s not counted)")
        print(f"ratio job/loop      : {job_rate / loop_rate:.2f}x  (target >= 1.6x on 2 cores)")
        pool_rate = args.images / min(pool_times)
        print(f"{args.cpus}-process loop (no Ray; what the machine gives now): {pool_rate:8.1f} img/s = "
              f"{pool_rate / loop_rate:.2f}x the loop; the job reaches {job_rate / pool_rate:.0%} of it")
        overhead = min(job_cpu) / min(loop_cpu) - 1
        print(f"CPU per image       : loop {1000 * min(loop_cpu) / args.images:.2f} ms, job "
              f"{1000 * min(job_cpu) / args.images:.2f} ms (Ray layer + staging: {100 * overhead:+.0f}%)")
        print(f"projected ratio on {args.cpus} idle cores: {args.cpus / (1 + overhead):.2f}x "
              f"(= cores x loop CPU / job CPU; the measured ratio depends on what else the machine runs)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
