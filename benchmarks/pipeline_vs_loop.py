"""The scoring pipeline (Ray Data on a local cluster) against a plain single-process loop, on the same
shards and the same tiny model, in one run.

    python benchmarks/pipeline_vs_loop.py [--images 12800] [--shards 64] [--size 512] [--cpus 2]

Workload: ``--images`` JPEGs of ``--size`` x ``--size`` pixels in ``--shards`` WebDataset shards, and
a tiny memorability model (32 px input) that costs less per image than decoding does, so the work is
CPU decoding, which the pipeline has to spread over every core while the loop uses one.

The loop is what a user would write: read each tar, decode, preprocess, batch, score. Both are timed
from a cold start (the loop from loading the model; the pipeline from ``ray.init``). Reported: total
time, start-up (the loop: until its first batch is scored; the pipeline: until its first shard is
committed), and the sustained throughput: the second half of the images over the time they took.

Why the second half: while the model actor starts (imports, model load: most of the pipeline's
start-up), the decode tasks already run and queue decoded blocks, which the actor then scores in a
burst. Counting from the first committed shard would credit that backlog to the steady state. The
second half starts after it is drained as long as the run is long enough: the script warns when the
images that could have been decoded before the first commit (that time at the measured rate) exceed
half the workload. The rates of the third and fourth quarter are printed too.

The loop runs before and after the pipeline; its better run is the reference. The last line is the
ratio of sustained throughputs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from workload import commit_timeline, describe_rates, rates, workload_model, write_workload


def plain_loop(urls: list[str], model: str, batch_size: int, model_batch: int | None = None) -> dict:
    """Read each tar, decode, preprocess, batch, score: one process, as a user would write it."""
    started = time.perf_counter()
    from perceptclip.inputs.shards import read_shard
    from perceptclip.model.preprocess import ImageError, decode_image
    from perceptclip.model.scorer import Scorer

    scorer = Scorer.load(model, batch=model_batch)
    scores, timeline = [], []

    def flush(batch):
        scores.extend(scorer.score(batch)[:, 0].tolist())
        timeline.append((time.perf_counter(), len(scores)))

    for url in urls:
        batch = []
        for sample in read_shard(url):
            try:
                batch.append(scorer.preprocess(decode_image(sample["jpg"])))
            except ImageError:
                continue
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    total = time.perf_counter() - started
    return {"images": len(scores), "total_s": total, "startup_s": timeline[0][0] - started, "rates": rates(timeline)}


def pipeline(urls: list[str], model: str, out: Path, cpus: int, batch_size: int,
             model_batch: int | None = None) -> dict:
    import ray

    from perceptclip.scoring.config import ScoreConfig
    from perceptclip.scoring.job import run_score

    started = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    cluster_s = time.perf_counter() - started
    # On a machine without GPUs the model actor shares the cores with decoding: it reserves none, so
    # every core can run a decode task, and it uses one torch thread.
    cfg = ScoreConfig(input=urls, output=str(out), models=[model], batch_size=batch_size,
                      cpus_per_actor=0, torch_threads=1, model_batch=model_batch)
    timeline, committed = commit_timeline()
    summary = run_score(cfg, progress=committed)
    total = time.perf_counter() - started
    ray.shutdown()
    result = summary.to_dict()
    assert result["shards"]["failed"] == 0 and result["samples"]["error"] == 0, result
    return {"images": result["samples"]["total"], "total_s": total, "cluster_start_s": cluster_s,
            "startup_s": cluster_s + result["startup_s"],
            "rates": rates(timeline, result["startup_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12800)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model-batch", type=int, default=None,
                        help="crops per model call (default: the canonical size; 0: unpadded, as before)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = workload_model("tiny", root)
        urls = write_workload(root / "shards", args.images, args.shards, args.size)
        print(f"workload: {args.images} JPEGs of {args.size}x{args.size} px in {args.shards} shards, "
              f"tiny memorability model (32 px input), {args.cpus} CPUs, model calls: "
              f"{'canonical' if args.model_batch is None else args.model_batch or 'unpadded'}", flush=True)
        # The loop runs before and after the pipeline and its better run counts: other work on the
        # machine slows whichever happens to overlap it, and this way it never favours the pipeline.
        before = plain_loop(urls, model, args.batch_size, args.model_batch)
        pipe = pipeline(urls, model, root / "scores", args.cpus, args.batch_size, args.model_batch)
        after = plain_loop(urls, model, args.batch_size, args.model_batch)
        if not all(r["rates"] for r in (before, pipe, after)):
            raise SystemExit("too few shards to measure a sustained throughput: use --shards 8 or more")
        loop = max(before, after, key=lambda r: r["rates"]["sustained_images_per_s"])
    for name, r in (("loop", before), ("pipeline", pipe), ("loop", after)):
        extra = f" (Ray cluster start {r['cluster_start_s']:.1f} s)" if "cluster_start_s" in r else ""
        print(f"{name:9s} {r['images']} images in {r['total_s']:.1f} s = {r['images'] / r['total_s']:.0f} images/s "
              f"end to end; start-up {r['startup_s']:.1f} s{extra}; {describe_rates(r['rates'])}")
    print(f"end-to-end ratio (start-up included): {loop['total_s'] / pipe['total_s']:.2f}")
    ratio = pipe["rates"]["sustained_images_per_s"] / loop["rates"]["sustained_images_per_s"]
    print(f"pipeline/loop throughput ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
