"""The benchmarks' shared workload: generated JPEGs in WebDataset shards, and the model to score them."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

# the generated images are the tests' (tests/support/images.py): fixtures stay out of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def write_workload(root: Path, images: int, shards: int, size: int) -> list[str]:
    """``images`` JPEGs of ``size`` x ``size`` px (256 distinct, repeated) in ``shards`` shards under ``root``."""
    from perceptclip.inputs.shards import write_shard
    from support.images import image_bytes, make_image

    distinct = [image_bytes(make_image(seed, (size, size)), "JPEG", quality=90) for seed in range(min(images, 256))]
    per_shard = -(-images // shards)
    urls = []
    for s in range(shards):
        keys = range(s * per_shard, min(images, (s + 1) * per_shard))
        samples = [{"__key__": f"{k:08d}", "jpg": distinct[k % len(distinct)],
                    "json": json.dumps({"url": f"https://example.com/{k}.jpg"}).encode()} for k in keys]
        urls.append(str(root / f"shard-{s:06d}.tar"))
        write_shard(urls[-1], samples)
    return urls


def workload_model(model: str, root: Path) -> str:
    """``tiny``: a tiny memorability model (32 px input) written under ``root``, whose cost per image is
    below decoding's. ``random:BACKBONE``: an IQA-shaped model on that open_clip backbone with random
    weights (``random:ViT-L-14-quickgelu`` costs what the released models cost; nothing is downloaded).
    Anything else is a model reference as ``perceptclip score --model`` takes it."""
    if model == "tiny":
        from perceptclip.model.debug import make_tiny_artifact

        return make_tiny_artifact(str(root / "model"), task="memorability", seed=0)
    if model.startswith("random:"):
        from perceptclip.model.artifact import ArtifactMeta, save_artifact
        from perceptclip.model.clip_lora import ClipLoraModel
        from perceptclip.model.config import BackboneConfig, ModelConfig

        cfg = ModelConfig(backbone=BackboneConfig.from_open_clip(model.removeprefix("random:"), pretrained=None))
        meta = ArtifactMeta.for_task("iqa", cfg)
        meta.preprocess.kind = "resize_center_crop"        # one crop per image: the per-image model cost
        save_artifact(ClipLoraModel(cfg), meta, str(root / "model"))
        return str(root / "model")
    return model


def rates(timeline: list[tuple[float, int]], decoding_before_first_s: float = 0.0) -> dict | None:
    """Images/s over the second half of the images, the third quarter and the fourth, from a timeline of
    (time, images done so far); None with fewer than four points (a run of one or two shards).

    Why the second half: while the model actors start, the decode tasks already run and queue decoded
    blocks, which the actors then score in a burst; counting from the first result would credit that
    backlog to the steady state. The backlog is at most what could be decoded before the first result
    (``decoding_before_first_s``: from when the cluster was up), at the sustained rate; when that bound
    exceeds half the images, the second half may be backlog too and ``describe_rates`` says so."""
    if len(timeline) < 4:
        return None
    total = timeline[-1][1]

    def rate(start: float, end: float) -> float:
        (t0, n0), (t1, n1) = (next(p for p in timeline if p[1] >= f * total) for f in (start, end))
        return (n1 - n0) / max(t1 - t0, 1e-9)

    sustained = rate(0.5, 1.0)
    return {"sustained_images_per_s": sustained, "q3_images_per_s": rate(0.5, 0.75),
            "q4_images_per_s": rate(0.75, 1.0), "images": total,
            "backlog_bound": decoding_before_first_s * sustained}


def describe_rates(r: dict | None) -> str:
    if r is None:
        return "second half n/a (too few shards to tell)"
    line = (f"second half {r['sustained_images_per_s']:.0f} images/s "
            f"(quarters 3 and 4: {r['q3_images_per_s']:.0f}, {r['q4_images_per_s']:.0f})")
    low, high = sorted((r["q3_images_per_s"], r["q4_images_per_s"]))
    if r["backlog_bound"] > r["images"] / 2:
        line += (f"\nwarning: up to {r['backlog_bound']:.0f} images could have been decoded before the first result, "
                 f"more than half of the {r['images']}: the second half may be that backlog, scored in a burst; "
                 f"this figure is not a sustained rate: rerun with more --images")
    elif high > 1.25 * low:
        line += ("\nwarning: the third and fourth quarters differ by more than 25%: other work on the machine may "
                 "have skewed the second half; rerun")
    return line


def commit_timeline() -> tuple[list[tuple[float, int]], callable]:
    """A timeline of (time, rows committed so far) and the ``progress`` callback for ``run_score`` that
    fills it (run_score reports each committed shard as "[k/N] shard: R rows, ...")."""
    timeline: list[tuple[float, int]] = []

    def progress(line: str) -> None:
        shard = re.match(r"\[\d+/\d+\] .*: (\d+) rows", line)
        if shard:
            timeline.append((time.perf_counter(), (timeline[-1][1] if timeline else 0) + int(shard[1])))

    return timeline, progress
