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
second half starts after it is drained as long as the run is long enough; the rates of the third and
the fourth quarter are printed to show it, with a warning when they differ by more than 25%.

The loop runs before and after the pipeline; its better run is the reference. The last line is the
ratio of sustained throughputs.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from workload import workload_model, write_workload


def rates(timeline: list[tuple[float, int]]) -> dict:
    """Images/s over the second half of the images, the third quarter and the fourth, from a timeline of
    (time, images done so far)."""
    total = timeline[-1][1]

    def rate(start: float, end: float) -> float:
        (t0, n0), (t1, n1) = (next(p for p in timeline if p[1] >= f * total) for f in (start, end))
        return (n1 - n0) / max(t1 - t0, 1e-9)

    return {"sustained_images_per_s": rate(0.5, 1.0), "q3_images_per_s": rate(0.5, 0.75),
            "q4_images_per_s": rate(0.75, 1.0)}


def plain_loop(urls: list[str], model: str, batch_size: int) -> dict:
    """Read each tar, decode, preprocess, batch, score: one process, as a user would write it."""
    started = time.perf_counter()
    from pipeline.preprocess import ImageError, decode_image
    from pipeline.scorer import Scorer
    from pipeline.shards import read_shard

    scorer = Scorer.load(model)
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
    return {"images": len(scores), "total_s": total, "startup_s": timeline[0][0] - started, **rates(timeline)}


def pipeline(urls: list[str], model: str, out: Path, cpus: int, batch_size: int) -> dict:
    import ray

    from pipeline.score import ScoreConfig, run_score

    started = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    cluster_s = time.perf_counter() - started
    # On a machine without GPUs the model actor shares the cores with decoding: it reserves none, so
    # every core can run a decode task, and it uses one torch thread.
    cfg = ScoreConfig(input=urls, output=str(out), models=[model], batch_size=batch_size,
                      cpus_per_actor=0, torch_threads=1)
    timeline = []

    def committed(line: str) -> None:                   # run_score reports each committed shard
        shard = re.match(r"\[\d+/\d+\] .*: (\d+) rows", line)
        if shard:
            timeline.append((time.perf_counter(), (timeline[-1][1] if timeline else 0) + int(shard[1])))

    summary = run_score(cfg, progress=committed)
    total = time.perf_counter() - started
    ray.shutdown()
    result = summary.to_dict()
    assert result["shards"]["failed"] == 0 and result["samples"]["error"] == 0, result
    return {"images": result["samples"]["total"], "total_s": total, "cluster_start_s": cluster_s,
            "startup_s": cluster_s + result["startup_s"], **rates(timeline)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12800)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = workload_model("tiny", root)
        urls = write_workload(root / "shards", args.images, args.shards, args.size)
        print(f"workload: {args.images} JPEGs of {args.size}x{args.size} px in {args.shards} shards, "
              f"tiny memorability model (32 px input), {args.cpus} CPUs", flush=True)
        # The loop runs before and after the pipeline and its better run counts: other work on the
        # machine slows whichever happens to overlap it, and this way it never favours the pipeline.
        before = plain_loop(urls, model, args.batch_size)
        pipe = pipeline(urls, model, root / "scores", args.cpus, args.batch_size)
        after = plain_loop(urls, model, args.batch_size)
        loop = max(before, after, key=lambda r: r["sustained_images_per_s"])
    for name, r in (("loop", before), ("pipeline", pipe), ("loop", after)):
        extra = f" (Ray cluster start {r['cluster_start_s']:.1f} s)" if "cluster_start_s" in r else ""
        print(f"{name:9s} {r['images']} images in {r['total_s']:.1f} s = {r['images'] / r['total_s']:.0f} images/s "
              f"end to end; start-up {r['startup_s']:.1f} s{extra}; second half {r['sustained_images_per_s']:.0f} "
              f"images/s (quarters 3 and 4: {r['q3_images_per_s']:.0f}, {r['q4_images_per_s']:.0f})")
        if max(r["q3_images_per_s"], r["q4_images_per_s"]) > 1.25 * min(r["q3_images_per_s"], r["q4_images_per_s"]):
            print(f"warning: the {name}'s third and fourth quarters differ by more than 25%: the start-up backlog "
                  f"or other work on the machine may have skewed the second half; rerun, or with more --images")
    print(f"end-to-end ratio (start-up included): {loop['total_s'] / pipe['total_s']:.2f}")
    print(f"pipeline/loop throughput ratio: {pipe['sustained_images_per_s'] / loop['sustained_images_per_s']:.2f}")


if __name__ == "__main__":
    main()
