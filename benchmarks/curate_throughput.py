"""Images/s of the curation job on this machine's cores against a plain single-process loop.

    .venv/bin/python benchmarks/curate_throughput.py [--images 1200] [--cpus 2] [--size 640x480] [--rounds 3]

Both sides read the same image folder (photo-like JPEGs + caption sidecars) and do the same per-sample work:
read, decode, content hash, resize to the short side, perceptual hash, JPEG encode, tar write. The job
(data_prep.curation.run_curation) also does what the loop does not: validation, staging for resume, global
dedup, shard parquet/stats, rejects and manifests. Ray is started the way the job's CLI starts it
(common.ray_session.ray_session) before the clock starts (a cluster is already up); that and a warm-up (Ray
Data's first dataset, a tiny job so that the workers have imported the job's modules) are timed apart.
The machine may be shared: the loop, the loop split over --cpus processes without Ray (what the machine
gives right now) and the job alternate for --rounds; the best wall time of each is reported.

CPU seconds per image show the Ray layer's cost even when other work shares the machine: the loop's own
process time, the split loop's children, and for the job the driver plus every process of the Ray instance
(GCS, raylet, agents, Ray Data's actors, workers), sampled while it runs so that no process is missed. Part
of Ray's cost runs per second, not per image (its services, Ray Data's scheduling loop), so a slowed-down
job shows a higher ratio. Target: job on 2 cores >= 1.6x the loop (wall); its CPU per image close to the loop's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from common.ray_session import ray_session
from common.tracking import TrackingConfig
from data_prep.curated_shards import ShardConfig
from data_prep.curation import CurateConfig, ExecConfig, run_curation
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
        meta = SampleMeta(
            source="loop",
            source_key=path.stem,
            task="caption",
            width=rgb.width,
            height=rgb.height,
            sha256=image_sha256(stored),
            phash=phash_hex(phash64(rgb)),
            extra={"content": chash},
        )
        writer.write(
            encode_sample(Sample(key=make_key("loop", path.stem), meta=meta, image=stored, image_ext=ext, text=text))
        )
    if writer is not None:
        writer.__exit__(None, None, None)
    return len(files)


def process_pool_loop(folder: Path, out: Path, image_cfg: ImageConfig, cpus: int) -> float:
    """The ceiling: the plain loop split over ``cpus`` processes. Returns the CPU seconds its processes used."""
    import resource
    from concurrent.futures import ProcessPoolExecutor

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # children that have exited and been waited for
        return usage.ru_utime + usage.ru_stime

    before = children_cpu()
    with ProcessPoolExecutor(cpus) as pool:
        futures = [pool.submit(plain_loop, folder, out, image_cfg, p, cpus) for p in range(cpus)]
        assert sum(f.result() for f in futures) == len(list(folder.glob("*.jpg")))
    return children_cpu() - before


def run_job(folder: Path, out: Path, image_cfg: ImageConfig, unit_size: int) -> dict:
    src = SourceConfig(name="bench", kind="caption", format="image_folder", path=str(folder), unit_size=unit_size)
    cfg = CurateConfig(
        sources=[src],
        out_dir=str(out),
        image=image_cfg,
        shards=ShardConfig(samples_per_shard=SHARD_SAMPLES),
        exec=ExecConfig(progress=False),
        tracking=TrackingConfig(backend="none"),
    )
    (result,) = run_curation(cfg)
    return result


RAY_SERVICES = ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "Agent", "ray::_")
"""Command-line marks of Ray's own processes (GCS, raylet, agents, Ray Data's stats/autoscaling actors)."""


class TreeCpu:
    """CPU seconds of this process and all its descendants (the Ray instance it started) over a window.

    A thread samples the process tree every ``interval`` seconds, so a process that exits inside the window
    still counts up to its last sample; the sampling thread's own CPU is subtracted. ``groups`` splits the
    total into the driver, the task workers and Ray's services.
    """

    def __init__(self, interval: float = 0.25) -> None:
        import psutil

        self.interval = interval
        self.me = psutil.Process()
        self.start: dict[tuple[int, float], float] = {}
        self.last: dict[tuple[int, float], float] = {}
        self.group: dict[tuple[int, float], str] = {}
        self.own = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> dict[tuple[int, float], float]:
        import psutil

        seen = {}
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                key = (proc.pid, proc.create_time())
                if key not in self.group:
                    cmd = " ".join(proc.cmdline())
                    service = any(mark in cmd for mark in RAY_SERVICES)
                    self.group[key] = "driver" if proc.pid == self.me.pid else "services" if service else "workers"
                seen[key] = t.user + t.system
            except psutil.Error:
                continue
        return seen

    def _run(self) -> None:
        t0 = time.thread_time()
        while not self._stop.wait(self.interval):
            self.last.update(self._sample())
        self.own = time.thread_time() - t0

    def __enter__(self) -> TreeCpu:
        self.start = self._sample()
        self.last = dict(self.start)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._thread is not None
        self._stop.set()
        self._thread.join()
        self.last.update(self._sample())

    @property
    def groups(self) -> dict[str, float]:
        out = {"driver": -self.own, "workers": 0.0, "services": 0.0}
        for key, value in self.last.items():
            out[self.group[key]] += value - self.start.get(key, 0.0)
        return out

    @property
    def seconds(self) -> float:
        return sum(self.groups.values())


def per_image_ms(cpu: list[float], n: int) -> str:
    return f"{1000 * min(cpu) / n:5.2f} ms (median {1000 * float(np.median(cpu)) / n:5.2f})"


def report(
    args: argparse.Namespace, times: dict[str, list[float]], cpu: dict[str, list[float]], startup_s: float, result: dict
) -> None:
    n, short = args.images, 384
    rate = {k: n / min(v) for k, v in times.items()}
    print(
        f"inputs: {n} JPEG {args.size} -> short side {short}, q90; machine: {os.cpu_count()} cores; "
        f"best of {args.rounds} rounds; Ray start-up + warm-up {startup_s:.1f} s not counted"
    )
    print(
        f"single-process loop   : {min(times['loop']):6.2f} s {rate['loop']:7.1f} img/s   CPU/img "
        f"{per_image_ms(cpu['loop'], n)}"
    )
    print(
        f"{args.cpus}-process loop, no Ray: {min(times['pool']):6.2f} s {rate['pool']:7.1f} img/s   CPU/img "
        f"{per_image_ms(cpu['pool'], n)}"
    )
    print(
        f"curation job ({args.cpus} CPUs)  : {min(times['job']):6.2f} s {rate['job']:7.1f} img/s   CPU/img "
        f"{per_image_ms(cpu['job'], n)}  (kept {result['kept']}, rejected {result['rejected']})"
    )
    paired = [j / lp for j, lp in zip(cpu["job"], cpu["loop"], strict=True)]
    print(
        f"wall ratio job/loop   : {rate['job'] / rate['loop']:.2f}x  (target >= 1.6x on 2 cores); "
        f"{args.cpus}-process loop/loop {rate['pool'] / rate['loop']:.2f}x; job reaches "
        f"{rate['job'] / rate['pool']:.0%} of the {args.cpus}-process loop"
    )
    print(
        f"CPU/img ratio job/loop: {min(cpu['job']) / min(cpu['loop']):.2f} (best of each; per round "
        f"{', '.join(f'{r:.2f}' for r in paired)}); {args.cpus}-process loop/loop "
        f"{min(cpu['pool']) / min(cpu['loop']):.2f}"
    )
    print(
        f"projected wall ratio on {args.cpus} idle cores: {args.cpus * min(cpu['loop']) / min(cpu['job']):.2f}x "
        f"(= cores x loop CPU / job CPU)"
    )


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
    unit_size = args.unit_size or max(8, -(-args.images // (12 * args.cpus)))
    tmp = Path(tempfile.mkdtemp(prefix="curate_bench_"))
    times: dict[str, list[float]] = {"loop": [], "pool": [], "job": []}
    cpu: dict[str, list[float]] = {"loop": [], "pool": [], "job": []}
    try:
        make_inputs(tmp / "in", args.images, size)  # type: ignore[arg-type]
        import ray

        # Ray starts workers at nice 15 (they yield to every other process); on a shared machine that would
        # compare a nice-0 loop against deprioritised workers, so both run at the same priority here.
        os.environ.setdefault("RAY_worker_niceness", "0")
        t0 = time.perf_counter()
        with ray_session(args.cpus):
            # Ray Data's system actors (stats, autoscaling coordinator) start with the first dataset of a
            # session: part of bringing the cluster up, not of curating,
            ray.data.DataContext.get_current().enable_progress_bars = False
            ray.data.range(2).map_batches(lambda b: b).take_all()
            # and a small job, so that the workers have imported the job's modules (the loop's are imported)
            make_inputs(tmp / "warm", 4 * args.cpus, size)  # type: ignore[arg-type]
            run_job(tmp / "warm", tmp / "warm_out", image_cfg, 2)
            startup_s = time.perf_counter() - t0
            for r in range(args.rounds):
                for d in ("loop", "pool", "job"):
                    shutil.rmtree(tmp / d, ignore_errors=True)
                t0, c0 = time.perf_counter(), time.process_time()
                assert plain_loop(tmp / "in", tmp / "loop", image_cfg) == args.images
                times["loop"].append(time.perf_counter() - t0)
                cpu["loop"].append(time.process_time() - c0)
                t0 = time.perf_counter()
                cpu["pool"].append(process_pool_loop(tmp / "in", tmp / "pool", image_cfg, args.cpus))
                times["pool"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                with TreeCpu() as tree:
                    result = run_job(tmp / "in", tmp / "job", image_cfg, unit_size)
                times["job"].append(time.perf_counter() - t0)
                cpu["job"].append(tree.seconds)
                assert result["inputs"] == args.images == result["kept"] + result["rejected"], result
                split = ", ".join(f"{k} {v:.2f}" for k, v in tree.groups.items())
                print(
                    f"round {r}: "
                    + ", ".join(f"{k} {times[k][-1]:.2f} s ({cpu[k][-1]:.2f} CPU s)" for k in times)
                    + f" = {split}; load average {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
            with TreeCpu() as idle:
                time.sleep(3.0)
        report(args, times, cpu, startup_s, result)
        print(
            f"the Ray instance alone, idle: {idle.seconds / 3.0:.3f} CPU s per s (in the job's CPU for as long as "
            f"it runs)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
