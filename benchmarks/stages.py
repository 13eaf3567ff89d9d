"""Where the time goes: each stage of the scoring job timed on its own, then the whole job end to end.

    python benchmarks/stages.py                                  # tiny model, 1,600 JPEGs of 512 px, CPU
    python benchmarks/stages.py --model perceptclip-iqa --images 100000 --shards 200 --cpus 16 --skip-stages   # GPU machine
    python benchmarks/stages.py --no-write                      # the same, writing nothing anywhere
    python benchmarks/stages.py --images 64 --shards 1 --skip-stages   # start-up cost for one small shard

Stages (one process, the job's own functions, every image of the workload):

    read        perceptclip.inputs.shards.read_shard: a whole tar into memory
    decode      perceptclip.model.preprocess.decode_image: bytes -> RGB image
    preprocess  perceptclip.model.preprocess.preprocess: image -> uint8 crops
    model       perceptclip.scoring.actor.score_block: every model on the crops (device synchronised: scores come back)
    write       perceptclip.output.commit.ScoreWriter: Parquet + marker per shard (skipped with --no-write)

Each line gives the stage's seconds, milliseconds per image and images/s on one core (or one device).

Then (not with --skip-stages) what the read tasks send to the model actors, per image, for each decode
mode and preprocessing (``decode: cpu`` with one 224 px crop, as memorability and emotion take, and
with iqa's five crops of 224; ``decode: device``, the encoded bytes): the job's own block functions on
the workload's images (at most 256), each block turned into the Arrow table that Ray Data stores
(``batch_to_block``), its bytes divided by its rows; and the read task's CPU time per image for that
block, one core.

Then the job end to end on a local Ray cluster with ``--cpus`` CPUs (``run_score``; with --no-write the
same Ray Data pipeline, ``score_dataset``, consumed and discarded): start-up (from ``ray.init`` to the
first committed shard, or the first scored block with --no-write), total images/s, and the sustained
images/s: the second half of the images over the time they took (``workload.rates`` says why).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from workload import commit_timeline, describe_rates, rates, workload_model, write_workload

STAGES = ("read", "decode", "preprocess", "model", "write")
# What a read task can send to the model actors: (decode mode, what it holds, preprocessing)
TRANSFERS = (("cpu", "one 224 px crop (memorability, emotion)", dict(kind="resize_center_crop", size=224)),
             ("cpu", "iqa: 5 crops of 224 px", dict(kind="multi_crop", size=224, crops=5)),
             ("device", "the encoded image (any task)", None))


@contextmanager
def timed(totals: dict, stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        totals[stage] += time.perf_counter() - start


def stage_times(urls: list[str], model: str, batch_size: int, write_to: Path | None) -> tuple[int, dict]:
    """Seconds per stage over every image of ``urls``, running the job's own stage functions in order."""
    import perceptclip.model.reference as score
    import perceptclip.scoring.decode as decode
    from perceptclip.inputs.shards import read_shard
    from perceptclip.model.scorer import Scorer
    from perceptclip.output.commit import ScoreWriter
    from perceptclip.scoring.actor import score_block

    totals: dict[str, float] = defaultdict(float)
    decode_image, preprocess = decode.decode_image, decode.preprocess

    def timed_decode(*args, **kwargs):
        with timed(totals, "decode"):
            return decode_image(*args, **kwargs)

    def timed_preprocess(*args, **kwargs):
        with timed(totals, "preprocess"):
            return preprocess(*args, **kwargs)

    spec = score.ModelSpec.resolve(model)
    scorers = [Scorer.load(spec.ref, name=spec.name)]
    preprocessing, crops_index = score.distinct_preprocessing([spec])
    writer = ScoreWriter(str(write_to), {}, [spec], "bench", overwrite=True) if write_to else None
    # decode_samples looks these names up in its module: wrapping them there times exactly its calls
    decode.decode_image, decode.preprocess = timed_decode, timed_preprocess
    images = 0
    try:
        for url in urls:
            with timed(totals, "read"):
                samples = read_shard(url)
            images += len(samples)
            for start in range(0, len(samples), batch_size):
                block = decode.decode_samples(url, samples[start:start + batch_size], start, preprocessing)
                with timed(totals, "model"):
                    table = score_block(block, scorers, crops_index)
                if writer:
                    with timed(totals, "write"):
                        writer.add(table)
            if writer:
                with timed(totals, "write"):
                    writer.add(score_block(decode.shard_row(url, len(samples), None, preprocessing),
                                                 scorers, crops_index))
    finally:
        decode.decode_image, decode.preprocess = decode_image, preprocess
    return images, dict(totals)


def block_bytes(urls: list[str], block_rows: int, limit: int = 256) -> tuple[int, int, list[dict]]:
    """Per ``TRANSFERS`` entry: the bytes per image of the blocks a read task sends (``bytes``: the whole
    Arrow table as Ray Data stores it; ``payload``: its crops or encoded-image column alone) and the
    read task's milliseconds per image for them (decode, crop, table: ``ms``). Over the first ``limit`` images."""
    from ray.data.block import BlockAccessor

    from perceptclip.inputs.shards import read_shard
    from perceptclip.model.preprocess import PreprocessConfig
    from perceptclip.scoring.decode import decode_samples, encoded_samples

    samples: list[tuple[str, list[dict]]] = []
    count = 0
    for url in urls:
        if count >= limit:
            break
        part = read_shard(url)[:limit - count]
        samples.append((url, part))
        count += len(part)
    jpeg = sum(len(s["jpg"]) for _, part in samples for s in part)
    results = []
    for decode, holds, preprocessing in TRANSFERS:
        pre = [PreprocessConfig(**preprocessing)] if preprocessing else None

        def block(url: str, rows: list[dict], start: int, pre=pre):
            batch = decode_samples(url, rows, start, pre) if pre else encoded_samples(url, rows, start)
            return BlockAccessor.batch_to_block(batch)      # the table the task puts in the object store

        block(samples[0][0], samples[0][1][:block_rows], 0)     # warm-up, untimed
        total = payload = 0
        started = time.perf_counter()
        for url, part in samples:
            for start in range(0, len(part), block_rows):
                table = block(url, part[start:start + block_rows], start)
                total += BlockAccessor.for_block(table).size_bytes()
                payload += table.column("crops_0" if pre else "data").nbytes
        seconds = time.perf_counter() - started
        results.append({"decode": decode, "holds": holds, "bytes": total / count, "payload": payload / count,
                        "ms": 1000 * seconds / count})
    return count, jpeg // count, results


def end_to_end(urls: list[str], model: str, cpus: int | None, batch_size: int, write_to: Path | None,
               decode: str) -> dict:
    import ray

    from perceptclip.core.schema import SHARD_ROW
    from perceptclip.model.reference import ModelSpec
    from perceptclip.scoring.config import ScoreConfig
    from perceptclip.scoring.job import run_score, score_dataset

    started = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    cluster_s = time.perf_counter() - started
    gpus = ray.cluster_resources().get("GPU", 0)
    # Without GPUs the model actor shares the cores with decoding: it reserves none, so every core can
    # run a decode task, and it uses one torch thread. With GPUs: the job's defaults.
    cpu_only = {} if gpus else {"cpus_per_actor": 0, "torch_threads": 1}
    cfg = ScoreConfig(input=urls, output=str(write_to or "unused"), models=[model], batch_size=batch_size,
                      block_rows=batch_size, decode=decode, **cpu_only)
    try:
        if write_to:
            timeline, progress = commit_timeline()
            result = run_score(cfg, progress=progress).to_dict()
            assert result["shards"]["failed"] == 0 and result["samples"]["error"] == 0, result
            images, startup_s = result["samples"]["total"], result["startup_s"]
        else:
            ds = score_dataset(cfg, urls, [ModelSpec.resolve(model)], {})
            images, timeline = 0, []
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                scored = sum(1 for s in block["status"].to_pylist() if s != SHARD_ROW)
                if scored:
                    images += scored
                    timeline.append((time.perf_counter(), images))
            startup_s = timeline[0][0] - started - cluster_s
    finally:
        ray.shutdown()
    total = time.perf_counter() - started
    return {"images": images, "total_s": total, "cluster_s": cluster_s, "startup_s": cluster_s + startup_s,
            "rates": rates(timeline, startup_s), "gpus": gpus}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (generated), a model directory/URI or a built-in name")
    parser.add_argument("--images", type=int, default=1600)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-write", action="store_true", help="write no Parquet and no markers")
    parser.add_argument("--skip-stages", action="store_true", help="only the end-to-end run")
    parser.add_argument("--decode", choices=("cpu", "device"), default="cpu",
                        help="the end-to-end run's decode option (the stage times are the CPU path's)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = workload_model(args.model, root)
        urls = write_workload(root / "shards", args.images, args.shards, args.size)
        print(f"workload: {args.images} JPEGs of {args.size}x{args.size} px in {args.shards} shards; model {args.model}; "
              f"{'no writes' if args.no_write else 'Parquet written to a local folder'}", flush=True)
        if not args.skip_stages:
            images, totals = stage_times(urls, model, args.batch_size, None if args.no_write else root / "stages")
            print(f"{'stage':11s} {'seconds':>8s} {'ms/image':>9s} {'images/s':>9s}")
            for stage in STAGES:
                if stage in totals:
                    s = totals[stage]
                    print(f"{stage:11s} {s:8.2f} {1000 * s / images:9.3f} {images / s:9.0f}")
            print(f"{'all':11s} {sum(totals.values()):8.2f} {1000 * sum(totals.values()) / images:9.3f} "
                  f"{images / sum(totals.values()):9.0f}", flush=True)
            count, jpeg, transfers = block_bytes(urls, args.batch_size)
            print(f"\nsent by the read tasks to the model actors, per image ({count} images, blocks of "
                  f"{args.batch_size} rows; the JPEGs average {jpeg:,} bytes):")
            print(f"{'decode':7s} {'holding':41s} {'bytes/image':>12s} {'of which image':>15s} "
                  f"{'read task ms/image':>19s}")
            for t in transfers:
                print(f"{t['decode']:7s} {t['holds']:41s} {t['bytes']:12,.0f} {t['payload']:15,.0f} {t['ms']:19.2f}")
            print(flush=True)
        r = end_to_end(urls, model, args.cpus, args.batch_size, None if args.no_write else root / "scores",
                       args.decode)
    print(f"end to end: {r['images']} images in {r['total_s']:.1f} s = {r['images'] / r['total_s']:.0f} images/s; "
          f"start-up {r['startup_s']:.1f} s (Ray cluster {r['cluster_s']:.1f} s); GPUs {r['gpus']:g}; "
          f"decode {args.decode}; {describe_rates(r['rates'])}")


if __name__ == "__main__":
    main()
