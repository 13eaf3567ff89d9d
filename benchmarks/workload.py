"""The benchmarks' shared workload: generated JPEGs in WebDataset shards, and the model to score them."""

from __future__ import annotations

import json
from pathlib import Path


def write_workload(root: Path, images: int, shards: int, size: int) -> list[str]:
    """``images`` JPEGs of ``size`` x ``size`` px (256 distinct, repeated) in ``shards`` shards under ``root``."""
    from pipeline.shards import write_shard
    from pipeline.testing import image_bytes, make_image

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
        from pipeline.testing import make_tiny_artifact

        return make_tiny_artifact(str(root / "model"), task="memorability", seed=0)
    if model.startswith("random:"):
        from pipeline.artifact import ArtifactMeta, save_artifact
        from pipeline.model import BackboneConfig, ClipLoraModel, ModelConfig

        cfg = ModelConfig(backbone=BackboneConfig.from_open_clip(model.removeprefix("random:"), pretrained=None))
        meta = ArtifactMeta.for_task("iqa", cfg)
        meta.preprocess.kind = "resize_center_crop"        # one crop per image: the per-image model cost
        save_artifact(ClipLoraModel(cfg), meta, str(root / "model"))
        return str(root / "model")
    return model
