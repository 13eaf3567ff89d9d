"""The scoring job on the same images held three ways on an S3 server: WebDataset tars, Parquet files with
the image bytes inside, and loose image files under a prefix, in one run on one local Ray cluster.

    python benchmarks/inputs.py [--images 2000] [--shards 8] [--size 512] [--cpus 2] [--delay-ms 0]

Workload (``workload.py``, as the other benchmarks): ``--images`` JPEGs of ``--size`` x ``--size`` px in
``--shards`` tars, and the tiny memorability model, whose cost per image is below decoding's. The same
images are then stored on the moto S3 server on loopback, in a process of its own, as:

    tars      the tars as they are
    parquet   one Parquet file per tar, the images in a ``datasets`` Image column, a ``key`` column,
              row groups of 100 (what ``datasets`` writes for images)
    files     one JPEG object per image under a prefix, ``--shards`` virtual shards (``files_per_shard``)

Each kind is scored into its own prefix on the same store (``run_score``, the job's defaults but one torch
thread and no CPU reserved for the model actor when there is no GPU, as ``stages.py`` does). Each kind is
scored twice, in the order tars, Parquet, files, files, Parquet, tars, and the better of its two runs
counts, so neither the workers' warm-up nor other work on the machine favours one kind. ``--delay-ms`` puts
the tests' ``StoreProxy`` in front of moto, adding that latency to every request (a distant store), which
loose files pay once per image.

Throughput is end to end: the images over the whole run, start-up included (listing, recording a files
input's grouping, starting the model actor). With 2,000 images on 2 cores the run is short, so the
sustained rate (the second half of the images, ``workload.rates``) is mostly the backlog decoded during
start-up, scored in a burst; it is printed for each run, with a warning, but the ratios are of end-to-end
rates, which start-up dilutes alike for every kind. Each line also gives the CPU seconds the store process
(moto, on this machine's cores) spent: a loose-file input costs it one request per image. The last two
lines are the ratios of end-to-end throughputs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import commits
from workload import commit_timeline, describe_rates, rates, workload_model, write_workload

BUCKET = "bench"
ROW_GROUP = 100


def store_inputs(tars: list[str], fs, root: Path) -> dict[str, tuple[list[str], dict]]:
    """The tars' images on the store as each kind: kind -> (``input`` of the score config, its other settings)."""
    from perceptclip.inputs.shards import read_shard
    from support.inputs import write_image_parquet

    per_shard = 0
    for url in tars:
        samples = read_shard(url)
        name = Path(url).name.removesuffix(".tar")
        fs.put_file(url, f"{BUCKET}/tars/{name}.tar")
        local = write_image_parquet(root / f"{name}.parquet", [s["jpg"] for s in samples],
                                    {"key": [s["__key__"] for s in samples]}, row_group_size=ROW_GROUP)
        fs.put_file(local, f"{BUCKET}/parquet/{name}.parquet")
        fs.pipe({f"{BUCKET}/files/{s['__key__']}.jpg": s["jpg"] for s in samples})     # many puts in flight
        per_shard = max(per_shard, len(samples))        # the keys sort as the tars hold them: the same shards
    return {"tars": ([f"s3://{BUCKET}/tars/"], {}),
            "parquet": ([f"s3://{BUCKET}/parquet/"], {"input_kind": "parquet"}),
            "files": ([f"s3://{BUCKET}/files/"], {"input_kind": "files", "files_per_shard": per_shard})}


def score(kind: str, inputs: tuple[list[str], dict], model: str, storage, run: int, store_pid: int) -> dict:
    """One scoring run of ``kind`` on the connected Ray cluster, into a prefix of its own."""
    import ray

    from perceptclip.scoring.config import ScoreConfig
    from perceptclip.scoring.job import run_score

    urls, settings = inputs
    cpu_only = {} if ray.cluster_resources().get("GPU", 0) else {"cpus_per_actor": 0, "torch_threads": 1}
    cfg = ScoreConfig(input=urls, output=f"s3://{BUCKET}/scores/{kind}-{run}", models=[model], storage=storage,
                      **cpu_only, **settings)
    import psutil

    timeline, progress = commit_timeline()
    store_cpu = sum(psutil.Process(store_pid).cpu_times()[:2])
    started = time.perf_counter()
    result = run_score(cfg, progress=progress).to_dict()
    total = time.perf_counter() - started
    store_cpu = sum(psutil.Process(store_pid).cpu_times()[:2]) - store_cpu
    assert result["shards"]["failed"] == 0 and result["samples"]["error"] == 0, result
    return {"kind": kind, "images": result["samples"]["total"], "total_s": total, "startup_s": result["startup_s"],
            "store_cpu_s": store_cpu, "rates": rates(timeline, result["startup_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8, help="tars, Parquet files and virtual shards each")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added to every store request (0: moto directly)")
    args = parser.parse_args()

    import ray
    import s3fs

    from perceptclip.core.storage import StorageConfig

    store = subprocess.Popen([sys.executable, commits.__file__, "--serve", "--delay-ms", str(args.delay_ms)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        moto, proxy = store.stdout.readline().split()
        endpoint = proxy if args.delay_ms else moto
        fs = s3fs.S3FileSystem(endpoint_url=moto, key="testing", secret="testing-secret")
        fs.mkdir(BUCKET)
        storage = StorageConfig(endpoint_url=endpoint, region="us-east-1", key="testing", secret="testing-secret")
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            model = workload_model("tiny", root)
            kinds = store_inputs(write_workload(root / "tars", args.images, args.shards, args.size), fs, root)
            print(f"workload: {args.images} JPEGs of {args.size}x{args.size} px, {args.shards} shards of each kind, "
                  f"tiny memorability model (32 px input), {args.cpus} CPUs; store: moto on loopback"
                  f"{f' behind a proxy adding {args.delay_ms:g} ms to every request' if args.delay_ms else ''}",
                  flush=True)
            ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
            try:
                runs = [score(kind, kinds[kind], model, storage, run, store.pid)
                        for run, kind in enumerate(("tars", "parquet", "files", "files", "parquet", "tars"))]
            finally:
                ray.shutdown()
    finally:
        store.stdin.close()
        store.wait(timeout=60)
    if not all(r["rates"] for r in runs):
        raise SystemExit("too few shards to measure a sustained throughput: use --shards 4 or more")
    for r in runs:
        print(f"{r['kind']:8s} {r['images']} images in {r['total_s']:.1f} s = {r['images'] / r['total_s']:.0f} "
              f"images/s end to end; start-up {r['startup_s']:.1f} s; store CPU {r['store_cpu_s']:.1f} s; "
              f"{describe_rates(r['rates'])}", flush=True)
    best = {kind: max(r["images"] / r["total_s"] for r in runs if r["kind"] == kind) for kind in kinds}
    print(f"parquet/tar throughput ratio: {best['parquet'] / best['tars']:.2f}")
    print(f"files/tar throughput ratio: {best['files'] / best['tars']:.2f}")


if __name__ == "__main__":
    main()
