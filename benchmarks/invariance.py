"""What the batch- and thread-invariant model calls cost: each model call padded to the canonical number
of crops (``perceptclip.model.batching.canonical_batch``) and run on the canonical number of CPU threads
(``canonical_threads``: 1), against one unpadded call per batch on torch's own threads, as before.

    python benchmarks/invariance.py [--seconds 3] [--backbones debug-vit,ViT-B-16]

For each backbone (random weights; nothing is downloaded), on the CPU with the default torch threads:

- one image (one crop), scored alone: the time of ``Scorer.score`` unpadded on torch's threads, padded
  on torch's threads, and padded on the canonical threads (the default). This is what ``perceptclip
  predict`` of one image waits for after loading; the target is a ratio within 2.
- a block of 64 images (one crop each), as the scoring job's actors get them: images/s each way, and
  the throughput cost of each in percent. The job's actors run one CPU each by default, so the thread
  pinning costs them nothing there; a process given more cores scores more images at once instead
  (more actors).

The job end to end, with and without padding: ``benchmarks/pipeline_vs_loop.py --model-batch 0``
against the default. The last line is the worst one-image ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from perceptclip.model.artifact import ArtifactMeta
from perceptclip.model.clip_lora import ClipLoraModel
from perceptclip.model.config import BackboneConfig, ModelConfig
from perceptclip.model.scorer import Scorer


def scorers(backbone: str) -> tuple[Scorer, Scorer, Scorer]:
    """The same random model three times: unpadded calls on torch's threads, padded calls on torch's
    threads, and padded calls on the canonical threads."""
    if backbone == "debug-vit":
        from perceptclip.model.debug import tiny_model

        model = tiny_model("memorability")
    else:
        model = ClipLoraModel(ModelConfig(backbone=BackboneConfig.from_open_clip(backbone, pretrained=None)))
    meta = ArtifactMeta.for_task("memorability", model.cfg)
    return (Scorer(model, meta, device="cpu", batch=0, threads=0), Scorer(model, meta, device="cpu", threads=0),
            Scorer(model, meta, device="cpu"))


def seconds_per_call(scorer: Scorer, crops: torch.Tensor, seconds: float) -> float:
    for _ in range(2):
        scorer.score(crops)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        scorer.score(crops)
        calls += 1
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default="debug-vit,ViT-B-16")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(f"CPU, {torch.get_num_threads()} torch threads, fp32, random weights")
    worst = 0.0
    for backbone in args.backbones.split(","):
        ways = scorers(backbone)
        size = ways[0].meta.preprocess.size
        one = torch.randint(0, 256, (1, 1, 3, size, size), dtype=torch.uint8)
        block = torch.randint(0, 256, (64, 1, 3, size, size), dtype=torch.uint8)
        alone = [seconds_per_call(s, one, args.seconds) for s in ways]
        blocks = [64 / seconds_per_call(s, block, args.seconds) for s in ways]
        worst = max(worst, alone[2] / alone[0])
        print(f"{backbone}: model calls of {ways[2].batch} crops on {ways[2].threads} thread(s); one image "
              f"{alone[0] * 1000:.2f} ms unpadded, {alone[1] * 1000:.2f} ms padded, {alone[2] * 1000:.2f} ms padded "
              f"and pinned (ratio {alone[2] / alone[0]:.2f}); blocks of 64: {blocks[0]:.1f} images/s unpadded, "
              f"{blocks[1]:.1f} padded ({100 * (1 - blocks[1] / blocks[0]):+.1f}%), {blocks[2]:.1f} padded and "
              f"pinned ({100 * (1 - blocks[2] / blocks[0]):+.1f}%)", flush=True)
    print(f"worst one-image ratio, padded and pinned / unpadded on torch's threads: {worst:.2f}")


if __name__ == "__main__":
    main()
