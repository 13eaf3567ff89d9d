"""Model-alone throughput: images/s of the production inference path (``Scorer``: merged LoRA, SDPA
attention, uint8 input normalised on the device, bf16 autocast on GPU), with no decoding or I/O.

    python benchmarks/model_throughput.py                       # ViT-L/14 at 224, on CUDA if present
    python benchmarks/model_throughput.py --backbone ViT-B-32-quickgelu --device cpu --batch-sizes 8

Weights are random (throughput does not depend on their values), so nothing is downloaded. Each
batch size is warmed up, then timed over ``--seconds`` with the device synchronised around the clock.
``--model-batch``: crops per model call (default: the canonical size the scoring job pads every call
to, 64 on a GPU; 0: one unpadded call per batch, to see what another canonical size would give).
The last line is the best figure: ``model alone: X images/s``.
"""

from __future__ import annotations

import argparse
import time

import torch

from perceptclip.model.artifact import ArtifactMeta
from perceptclip.model.clip_lora import ClipLoraModel
from perceptclip.model.config import BackboneConfig, ModelConfig
from perceptclip.model.scorer import Scorer


def build_scorer(backbone: str, device: str, precision: str | None, compile: bool,
                 model_batch: int | None = None) -> Scorer:
    cfg = ModelConfig(backbone=BackboneConfig.from_open_clip(backbone, pretrained=None))
    model = ClipLoraModel(cfg)
    meta = ArtifactMeta.for_task("iqa", cfg)
    meta.preprocess.kind = "resize_center_crop"        # one crop per image: the per-image model cost
    return Scorer(model, meta, device=device, precision=precision, compile=compile, batch=model_batch)


def measure(scorer: Scorer, batch_size: int, seconds: float) -> float:
    size = scorer.meta.preprocess.size
    # one (images, crops, 3, S, S) array, as the scoring job's blocks reach the model
    crops = torch.randint(0, 256, (batch_size, 1, 3, size, size), dtype=torch.uint8)
    sync = torch.cuda.synchronize if scorer.device.type == "cuda" else (lambda: None)
    for _ in range(3):                                  # warm-up: kernels, autotuning, compilation
        scorer.score(crops)
    sync()
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        scorer.score(crops)
        images += batch_size
    sync()
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-L-14-quickgelu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--batch-sizes", default="64,128,256,512")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--model-batch", type=int, default=None,
                        help="crops per model call (default: the canonical size; 0: unpadded)")
    args = parser.parse_args()

    scorer = build_scorer(args.backbone, args.device, args.precision, args.compile, args.model_batch)
    name = torch.cuda.get_device_name() if scorer.device.type == "cuda" else "cpu"
    calls = f"model calls of {scorer.batch} crops" if scorer.batch else "one unpadded model call per batch"
    print(f"{args.backbone} on {name}, precision {scorer.precision}, compile={args.compile}, {calls}")
    best = 0.0
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        rate = measure(scorer, batch_size, args.seconds)
        best = max(best, rate)
        print(f"batch {batch_size:4d}: {rate:9.1f} images/s", flush=True)
    print(f"model alone: {best:.1f} images/s")


if __name__ == "__main__":
    main()
