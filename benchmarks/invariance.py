"""What the batch-invariant model calls cost: each model call padded to the canonical number of crops
(``perceptclip.model.batching.canonical_batch``) against one unpadded call per batch, as before.

    python benchmarks/invariance.py [--seconds 3] [--backbones debug-vit,ViT-B-16]

For each backbone (random weights; nothing is downloaded), on the CPU with the default torch threads:

- one image (one crop), scored alone: the time of ``Scorer.score`` unpadded and padded. This is what
  ``perceptclip predict`` of one image waits for after loading; the target is a ratio within 2.
- a block of 64 images (one crop each), as the scoring job's actors get them: images/s unpadded and
  padded, and the throughput cost of the padding in percent.

The job end to end, with and without padding: ``benchmarks/pipeline_vs_loop.py --model-batch 0``
against the default. The last line is the worst one-image ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from perceptclip.model.artifact import ArtifactMeta
from perceptclip.model.clip_lora import BackboneConfig, ClipLoraModel, ModelConfig
from perceptclip.model.scorer import Scorer


def scorers(backbone: str) -> tuple[Scorer, Scorer]:
    """The same random model twice: unpadded calls, and calls padded to its canonical size."""
    if backbone == "debug-vit":
        from perceptclip.model.debug import tiny_model

        model = tiny_model("memorability")
    else:
        model = ClipLoraModel(ModelConfig(backbone=BackboneConfig.from_open_clip(backbone, pretrained=None)))
    meta = ArtifactMeta.for_task("memorability", model.cfg)
    return Scorer(model, meta, device="cpu", batch=0), Scorer(model, meta, device="cpu")


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
        plain, padded = scorers(backbone)
        size = plain.meta.preprocess.size
        one = torch.randint(0, 256, (1, 1, 3, size, size), dtype=torch.uint8)
        block = torch.randint(0, 256, (64, 1, 3, size, size), dtype=torch.uint8)
        alone = [seconds_per_call(s, one, args.seconds) for s in (plain, padded)]
        blocks = [64 / seconds_per_call(s, block, args.seconds) for s in (plain, padded)]
        worst = max(worst, alone[1] / alone[0])
        print(f"{backbone}: model calls of {padded.batch} crops; one image {alone[0] * 1000:.2f} ms unpadded, "
              f"{alone[1] * 1000:.2f} ms padded (ratio {alone[1] / alone[0]:.2f}); blocks of 64: "
              f"{blocks[0]:.1f} images/s unpadded, {blocks[1]:.1f} padded "
              f"(cost {100 * (1 - blocks[1] / blocks[0]):+.1f}%)", flush=True)
    print(f"worst one-image ratio, padded/unpadded: {worst:.2f}")


if __name__ == "__main__":
    main()
