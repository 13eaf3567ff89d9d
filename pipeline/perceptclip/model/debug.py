"""The debug model: a few-thousand-parameter open_clip ViT (2 blocks, width 64, 32 px) with LoRA and the
head, built exactly like the real one. Tests, benchmarks, the demo and ``configs/train/smoke.yaml``
(``backbone: debug-vit``) use it to exercise every code path in seconds on a CPU. Not a useful model.
Nothing here downloads anything."""

from __future__ import annotations

import torch

from perceptclip.core.tasks import Task, resolve_task
from perceptclip.model.artifact import CONFIG_FILE, ArtifactMeta, cache_dir, publish_once, save_artifact
from perceptclip.model.clip_lora import ClipLoraModel
from perceptclip.model.config import DEBUG_BACKBONE, HeadConfig, LoraConfig, ModelConfig, debug_backbone

NAME = DEBUG_BACKBONE


def tiny_model_config(task: str | Task = "iqa", image_size: int = 32, heads: tuple[str, ...] = ("default",)) -> ModelConfig:
    return ModelConfig(
        backbone=debug_backbone(image_size),
        lora=LoraConfig(r=4, alpha=8.0, dropout=0.1),
        head=HeadConfig(size=resolve_task(task).head_size, hidden=(32, 16), dropout=0.5),
        heads=heads,
    )


def tiny_model(task: str | Task = "iqa", seed: int = 0, **kwargs) -> ClipLoraModel:
    """A debug model with random weights and non-zero LoRA B, so merging is not trivially exact."""
    torch.manual_seed(seed)
    model = ClipLoraModel(tiny_model_config(task, **kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.05)
    return model.eval()


def make_tiny_artifact(dest: str, task: str | Task = "iqa", seed: int = 0, crops: int = 2, **kwargs) -> str:
    """A debug model saved as a normal artifact at ``dest``; returns ``dest``."""
    model = tiny_model(task, seed, **kwargs)
    extra = {"crops": crops, "max_side": 256} if resolve_task(task).preprocess == "multi_crop" else {}
    meta = ArtifactMeta.for_task(task, model.cfg, provenance={"source": "perceptclip.model.debug", "seed": seed},
                                 **extra)
    save_artifact(model, meta, dest)
    return dest


def debug_artifact() -> str:
    """The built-in debug model (``perceptclip-debug``): an image-quality debug model with fixed random
    weights, made once into the cache. For seeing the job run where the released weights cannot be
    fetched: its scores mean nothing, and its provenance says so."""
    target = cache_dir() / "debug" / f"{NAME}-iqa"
    if (target / CONFIG_FILE).exists():
        return str(target)
    model = tiny_model("iqa", seed=0)
    meta = ArtifactMeta.for_task("iqa", model.cfg, crops=2, max_side=256, provenance={
        "source": "perceptclip.model.debug", "seed": 0, "note": "random weights: its scores mean nothing"})
    publish_once(target, lambda staging: save_artifact(model, meta, str(staging)))
    return str(target)
