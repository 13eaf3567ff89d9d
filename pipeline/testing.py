"""Tiny real objects for tests, benchmarks and demos: a few-thousand-parameter open_clip ViT with LoRA
and head, saved as a normal artifact, and generated images. Nothing here downloads anything."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from perceptclip.artifact import ArtifactMeta, save_artifact
from perceptclip.model import BackboneConfig, ClipLoraModel, HeadConfig, LoraConfig, ModelConfig
from perceptclip.tasks import get_task


def tiny_model_config(task: str = "iqa", image_size: int = 32, heads: tuple[str, ...] = ("default",)) -> ModelConfig:
    return ModelConfig(
        backbone=BackboneConfig(
            name="tiny-vit", pretrained=None, embed_dim=32, quick_gelu=True,
            vision={"image_size": image_size, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        ),
        lora=LoraConfig(r=4, alpha=8.0, dropout=0.1),
        head=HeadConfig(outputs=get_task(task).outputs, hidden=(32, 16), dropout=0.5),
        heads=heads,
    )


def tiny_model(task: str = "iqa", seed: int = 0, **kwargs) -> ClipLoraModel:
    """A tiny model with random weights and non-zero LoRA B, so merging is not trivially exact."""
    torch.manual_seed(seed)
    model = ClipLoraModel(tiny_model_config(task, **kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.05)
    return model.eval()


def make_tiny_artifact(dest: str, task: str = "iqa", seed: int = 0, crops: int = 2, **kwargs) -> str:
    model = tiny_model(task, seed, **kwargs)
    extra = {"crops": crops, "max_side": 256} if get_task(task).preprocess == "multi_crop" else {}
    meta = ArtifactMeta.for_task(task, model.cfg, provenance={"source": "perceptclip.testing.tiny_model", "seed": seed},
                                 **extra)
    save_artifact(model, meta, dest)
    return dest


def make_image(seed: int, size: tuple[int, int] = (96, 64), mode: str = "RGB") -> Image.Image:
    """A smooth random image (gradients plus noise): compresses like a photo, differs per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * rng.uniform(0.5, 3) + yy * rng.uniform(0.5, 3) + rng.uniform(0, 255)) % 256
                     for _ in range(3)], axis=-1)
    noise = rng.normal(0, 12, size=(h, w, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    return img if mode == "RGB" else img.convert(mode)


def image_bytes(img: Image.Image, fmt: str = "JPEG", **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()
