"""A model just wide enough that batching changes its scores' bits on a CPU in fp32.

The debug ViT (width 64) gives an image the same bits in any batch: its matrices are too small for the
kernels to block them differently. At width 128 and 64 px crops (17 tokens), an image scored alone and
in batches of 2 to 64 took 3 to 4 distinct float32 values (unpadded), while a model call still costs
about a millisecond. Its canonical batch on a CPU is 2 crops, so padding is exercised on every odd count.
"""

from __future__ import annotations

import torch

from perceptclip.core.tasks import get_task
from perceptclip.model.artifact import ArtifactMeta, save_artifact
from perceptclip.model.clip_lora import ClipLoraModel
from perceptclip.model.config import BackboneConfig, HeadConfig, LoraConfig, ModelConfig


def wide_model_config(task: str) -> ModelConfig:
    backbone = BackboneConfig(name="debug-vit", pretrained=None, embed_dim=64, quick_gelu=True,
                              vision={"image_size": 64, "layers": 2, "width": 128, "patch_size": 16,
                                      "head_width": 64})
    return ModelConfig(backbone=backbone, lora=LoraConfig(r=4), head=HeadConfig(size=get_task(task).head_size,
                                                                               hidden=(32, 16)))


def make_wide_artifact(dest: str, task: str = "memorability", seed: int = 0, crops: int = 3) -> str:
    """A wide model with random weights saved as a normal artifact at ``dest``; returns ``dest``."""
    torch.manual_seed(seed)
    model = ClipLoraModel(wide_model_config(task)).eval()
    extra = {"crops": crops, "max_side": 256} if get_task(task).preprocess == "multi_crop" else {}
    meta = ArtifactMeta.for_task(task, model.cfg, provenance={"source": "tests/support/wide_model", "seed": seed},
                                 **extra)
    save_artifact(model, meta, dest)
    return dest


def make_thread_sensitive_artifact(dest: str, seed: int = 0) -> str:
    """A ViT of width 256, 4 blocks, on 224 px crops (patch 14): wide enough that, on CPUs whose matrix
    kernels split sums by thread, 1, 2 and 4 intra-op threads give an image other float32 bits; a crop costs
    about 2 GFLOP (tens of milliseconds on one core)."""
    torch.manual_seed(seed)
    backbone = BackboneConfig(name="debug-vit", pretrained=None, embed_dim=128, quick_gelu=True,
                              vision={"image_size": 224, "layers": 4, "width": 256, "patch_size": 14,
                                      "head_width": 64})
    cfg = ModelConfig(backbone=backbone, lora=LoraConfig(r=4), head=HeadConfig(size=1, hidden=(32, 16)))
    model = ClipLoraModel(cfg).eval()
    meta = ArtifactMeta.for_task("memorability", model.cfg, provenance={"source": "tests/support/wide_model"})
    save_artifact(model, meta, dest)
    return dest
