"""Several tasks, one pass: the same images scored by three single-head models and by one model with the
three heads on one LoRA (``ArtifactMeta.head_tasks``), in one run.

    python benchmarks/heads.py                       # 256 images, a wider debug-like ViT, on CUDA if present
    python benchmarks/heads.py --images 32 --device cpu

Each path decodes and preprocesses the images itself (the scoring job decodes once per preprocessing,
and so does this), then scores them through ``Scorer`` (merged LoRA, canonical padded calls), timed
after a warm-up. The backbone (a random ViT of width ``--width``, 64 px, 6 blocks: far more than
decoding costs) runs once per image for the three-head model and three times for the three models,
so the ratio nears 3 as the model's share of the time grows. The last line is
``three models / one three-head model time ratio: X``.
"""

from __future__ import annotations

import argparse
import time

import torch
import workload  # noqa: F401, I001  (puts tests/ on the path: the generated images are the tests')

from perceptclip.core.tasks import Task
from perceptclip.model.artifact import ArtifactMeta
from perceptclip.model.clip_lora import ClipLoraModel
from perceptclip.model.config import BackboneConfig, HeadConfig, LoraConfig, ModelConfig
from perceptclip.model.preprocess import decode_image
from perceptclip.model.scorer import Scorer
from support.images import image_bytes, make_image

TASKS = {
    "sharp": Task(name="sharpness", kind="regression"),
    "mood": Task(name="mood", kind="classification", labels=("calm", "busy", "warm", "cold")),
    "click": Task(name="clicked", kind="regression"),
}


def model_config(width: int, heads: tuple[str, ...]) -> ModelConfig:
    backbone = BackboneConfig(name="debug-vit", pretrained=None, embed_dim=128, quick_gelu=True,
                              vision={"image_size": 64, "layers": 6, "width": width, "patch_size": 8,
                                      "head_width": 64})
    first = TASKS[heads[0]]
    return ModelConfig(backbone=backbone, lora=LoraConfig(r=4), head=HeadConfig(size=first.head_size, hidden=(64, 32)),
                       heads=heads, head_sizes={h: TASKS[h].head_size for h in heads if TASKS[h].head_size != first.head_size})


def scorer(width: int, heads: tuple[str, ...], device: str) -> Scorer:
    torch.manual_seed(0)
    cfg = model_config(width, heads)
    head_tasks = {h: TASKS[h] for h in heads} if len(heads) > 1 else None
    meta = ArtifactMeta.for_task(TASKS[heads[0]], cfg, head_tasks=head_tasks)
    return Scorer(ClipLoraModel(cfg), meta, device=device)


def run(scorers: list[Scorer], images: list[bytes]) -> float:
    """Seconds to decode, preprocess and score ``images`` with every scorer (decoded once for all)."""
    sync = torch.cuda.synchronize if scorers[0].device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    crops = [scorers[0].preprocess(decode_image(data)) for data in images]
    for s in scorers:
        s.columns(s.score(crops))
    sync()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--width", type=int, default=384, help="the ViT's width: the model's cost per image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path; the best is kept")
    args = parser.parse_args()

    images = [image_bytes(make_image(seed, (160, 120)), "JPEG", quality=90) for seed in range(args.images)]
    singles = [scorer(args.width, (h,), args.device) for h in TASKS]
    three = [scorer(args.width, tuple(TASKS), args.device)]
    for scorers in (singles, three):                                        # warm-up
        run(scorers, images[:8])
    apart = min(run(singles, images) for _ in range(args.repeats))
    together = min(run(three, images) for _ in range(args.repeats))
    print(f"{args.images} images on {args.device}, ViT width {args.width}")
    print(f"three single-head models: {apart:.3f} s ({args.images / apart:.1f} images/s)")
    print(f"one three-head model:     {together:.3f} s ({args.images / together:.1f} images/s)")
    print(f"three models / one three-head model time ratio: {apart / together:.2f}")


if __name__ == "__main__":
    main()
