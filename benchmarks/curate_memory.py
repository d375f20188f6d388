"""Curation's peak memory against corpus size: the same job on 10k and 100k small samples.

    .venv/bin/python benchmarks/curate_memory.py [--sizes 10000 100000] [--cpus 2] [--interval 0.2]

Each size runs in a fresh process with its own local Ray instance (so nothing is shared between sizes). A
sampler thread reads, every ``--interval`` seconds, the memory of that process and of every process under it
(Ray's GCS, raylet, agents and workers): RSS summed (counts shared pages once per process, so an upper bound)
and PSS summed (shared pages split between their users: the machine's real cost). The corpus is a parquet
source of 16x16 PNGs with captions in row groups of 1000 (one Ray task each). Reported per size: Ray idle
(after start-up, before the job), the peak during the job, the driver's own peak, and the peaks' ratio.
Target: peak memory does not grow with the corpus (ratio ~1).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS_PER_GROUP = 1000


def make_corpus(folder: Path, n: int) -> Path:
    """n distinct 16x16 PNGs (smooth colour blobs) with two-word-plus captions, one parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.parquet"
    writer = None
    for start in range(0, n, ROWS_PER_GROUP):
        stop = min(n, start + ROWS_PER_GROUP)
        images = []
        for _ in range(start, stop):
            small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(small).resize((16, 16), Image.Resampling.BICUBIC).save(buf, format="PNG")
            images.append(buf.getvalue())
        table = pa.table(
            {
                "key": [f"s{i}" for i in range(start, stop)],
                "image": images,
                "caption": [f"a tiny picture number {i}" for i in range(start, stop)],
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=ROWS_PER_GROUP)
    assert writer is not None
    writer.close()
    return path


class TreeSampler(threading.Thread):
    """Peak summed RSS / PSS of this process and all its descendants, and this process's own peak RSS."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.root = psutil.Process()
        self.peak_rss = self.peak_pss = self.peak_driver = 0
        self.samples = 0
        self._done = threading.Event()

    def read(self) -> tuple[int, int, int]:
        rss = pss = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        return rss, pss, self.root.memory_info().rss

    def run(self) -> None:
        while not self._done.is_set():
            rss, pss, driver = self.read()
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_driver = max(self.peak_driver, driver)
            self.samples += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def child(n: int, cpus: int, interval: float) -> dict:
    """One size in this process: corpus, Ray start, idle reading, the job under the sampler."""
    import ray

    from common.tracking import TrackingConfig
    from data_prep.curated_shards import ShardConfig
    from data_prep.curation import CurateConfig, ExecConfig, run_curation
    from data_prep.filters import FilterConfig
    from data_prep.sources import SourceConfig

    with tempfile.TemporaryDirectory(prefix="curate-mem-") as tmp:
        src = make_corpus(Path(tmp) / "src", n)
        cfg = CurateConfig(
            sources=[
                SourceConfig(
                    name="tiny", kind="caption", format="parquet", path=str(src), filters=FilterConfig(min_side=8)
                )
            ],
            out_dir=str(Path(tmp) / "out"),
            shards=ShardConfig(samples_per_shard=ROWS_PER_GROUP),
            exec=ExecConfig(num_cpus=cpus, progress=False),
            tracking=TrackingConfig(backend="none"),
        )
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            time.sleep(3)  # let Ray's processes settle
            idle_rss, idle_pss, idle_driver = TreeSampler(interval).read()
            sampler = TreeSampler(interval)
            sampler.start()
            start = time.perf_counter()
            (result,) = run_curation(cfg)
            wall = time.perf_counter() - start
            sampler.stop()
        finally:
            ray.shutdown()
    return {
        "samples": n,
        "kept": result["kept"],
        "rejected": result["rejected"],
        "wall_s": wall,
        "idle_rss": idle_rss,
        "idle_pss": idle_pss,
        "idle_driver": idle_driver,
        "peak_rss": sampler.peak_rss,
        "peak_pss": sampler.peak_pss,
        "peak_driver": sampler.peak_driver,
        "readings": sampler.samples,
    }


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def report(rows: list[dict]) -> str:
    head = (
        f"{'samples':>8} {'kept':>8} {'wall s':>7} | {'idle PSS':>9} {'peak PSS':>9} {'peak RSS':>9} "
        f"{'driver peak':>11} | MiB, process tree"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['samples']:>8,} {r['kept']:>8,} {r['wall_s']:>7.1f} | {mib(r['idle_pss']):>9} "
            f"{mib(r['peak_pss']):>9} {mib(r['peak_rss']):>9} {mib(r['peak_driver']):>11} |"
        )
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        growth = b["samples"] / a["samples"]
        lines.append(
            f"{growth:.0f}x the samples: peak PSS x{b['peak_pss'] / a['peak_pss']:.2f}, peak RSS "
            f"x{b['peak_rss'] / a['peak_rss']:.2f}, driver peak x{b['peak_driver'] / a['peak_driver']:.2f}; "
            f"above idle: PSS {mib(a['peak_pss'] - a['idle_pss'])} -> {mib(b['peak_pss'] - b['idle_pss'])} MiB"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory readings")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cpus, args.interval)))
        return
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--cpus", str(args.cpus), "--interval", str(args.interval)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{n:,} samples done in {rows[-1]['wall_s']:.1f} s", file=sys.stderr)
    print(report(rows))


if __name__ == "__main__":
    main()
