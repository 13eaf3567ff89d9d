"""Peak memory of the scoring job against its input size: the same job on few shards and on ten times
as many, each on a fresh local Ray cluster, with the memory of the driver and of every process it
started (the Ray cluster: its workers, the model actor, raylet and GCS) sampled throughout.

    python benchmarks/memory.py                       # 4 shards against 40 shards of 100 JPEGs of 384 px
    python benchmarks/memory.py --small 4 --large 40 --images-per-shard 100 --size 384 --cpus 2

Memory is PSS (proportional set size): shared pages, such as Ray's object store, are split among the
processes that map them, so the sum over processes counts each page once. Printed per run: the peak of
the driver alone and the peak of the sum over the driver and its processes; last, the ratios large/small.
The job's memory should not grow with the input: the ratios should stay near 1 (target <= 1.25).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from workload import workload_model, write_workload


def pss(proc) -> int:
    import psutil

    try:
        return proc.memory_full_info().pss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0


def run_once(urls: list[str], model: str, out: Path, cpus: int, interval: float) -> dict:
    """One scoring run in this process, sampled from a thread: peak PSS of the driver and of the tree."""
    import psutil
    import ray

    from perceptclip.scoring.config import ScoreConfig
    from perceptclip.scoring.job import run_score

    me = psutil.Process()
    peaks = {"driver": 0, "total": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            driver = pss(me)
            total = driver + sum(pss(p) for p in me.children(recursive=True))
            peaks["driver"], peaks["total"] = max(peaks["driver"], driver), max(peaks["total"], total)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    try:
        cfg = ScoreConfig(input=urls, output=str(out), models=[model], cpus_per_actor=0, torch_threads=1)
        result = run_score(cfg, progress=lambda line: None).to_dict()
    finally:
        done.set()
        sampler.join()
        ray.shutdown()
    assert result["shards"]["failed"] == 0 and result["samples"]["error"] == 0, result
    return {"images": result["samples"]["total"], "shards": len(urls), **peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=4, help="shards in the small run")
    parser.add_argument("--large", type=int, default=40, help="shards in the large run")
    parser.add_argument("--images-per-shard", type=int, default=100)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)   # internal: one run, JSON out
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one is not None:
        root = Path(args.root)
        urls = sorted(str(p) for p in (root / "shards").glob("*.tar"))[:args.one]
        out = root / f"scores-{args.one}"
        print(json.dumps(run_once(urls, str(root / "model"), out, args.cpus, args.interval)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        workload_model("tiny", root)
        write_workload(root / "shards", args.large * args.images_per_shard, args.large, args.size)
        print(f"workload: shards of {args.images_per_shard} JPEGs of {args.size}x{args.size} px, tiny model, "
              f"{args.cpus} CPUs", flush=True)
        results = {}
        for count in (args.small, args.large):
            # each run in a fresh process: no memory left over from the other run counts towards it
            cmd = [sys.executable, __file__, "--one", str(count), "--root", str(root), "--cpus", str(args.cpus),
                   "--interval", str(args.interval)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"}).stdout.strip().splitlines()[-1]
            results[count] = r = json.loads(line)
            print(f"{r['shards']:4d} shards, {r['images']:6d} images: peak driver {r['driver'] / 2**20:7.0f} MiB, "
                  f"peak driver + Ray processes {r['total'] / 2**20:7.0f} MiB", flush=True)
    small, large = results[args.small], results[args.large]
    print(f"ratio {args.large}/{args.small} shards: driver {large['driver'] / small['driver']:.2f}, "
          f"driver + Ray processes {large['total'] / small['total']:.2f}")


if __name__ == "__main__":
    main()
