"""PerceptCLIP: an open_clip vision transformer with LoRA on q, k, v of every block and a small MLP head.

    image (B, 3, S, S), normalised
      -> open_clip VisionTransformer (frozen; LoRA on q, k, v)      class token after ln_post
      -> CLIP's visual projection (frozen)                            (B, embed_dim), 768 for ViT-L/14
      -> head: Linear(embed_dim, 512) ReLU Dropout(0.5)
               Linear(512, 256) ReLU Dropout(0.5) Linear(256, K)      (B, K)

Several heads may share one backbone: one per training dataset of a task (the paper's multi-dataset
variant), or one per task, each with its own output size. Each head has a name and the model has a
default one; one backbone pass serves any number of heads (``forward(images, heads)``). Architecture lives
in ``ModelConfig``; weights live apart, in artifacts (``perceptclip.model.artifact``) or in the released
checkpoints (``perceptclip.model.official``).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from perceptclip.core.config import Config, require, setting
from perceptclip.model.lora import LoraPair, add_lora, merge_lora

DEFAULT_BACKBONE = "ViT-L-14-quickgelu"
DEFAULT_PRETRAINED = "openai"


@dataclass
class BackboneConfig(Config):
    """An open_clip vision tower: its name (for provenance and pretrained weights) and its shape."""

    name: str = DEFAULT_BACKBONE
    pretrained: str | None = DEFAULT_PRETRAINED
    embed_dim: int = 768                 # width of CLIP's visual projection output
    quick_gelu: bool = True              # OpenAI's CLIP was trained with QuickGELU
    vision: dict = field(default_factory=lambda: {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14})

    @classmethod
    def named(cls, name: str, pretrained: str | None = DEFAULT_PRETRAINED) -> BackboneConfig:
        """An open_clip vision transformer by name, or one of ours (``NAMED_BACKBONES``)."""
        if name in NAMED_BACKBONES:
            return dataclasses.replace(NAMED_BACKBONES[name](), pretrained=pretrained)
        return cls.from_open_clip(name, pretrained)

    @classmethod
    def from_open_clip(cls, name: str, pretrained: str | None = DEFAULT_PRETRAINED) -> BackboneConfig:
        import open_clip

        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
        vision = dict(cfg["vision_cfg"])
        if vision.get("timm_model_name") or isinstance(vision.get("layers"), (list, tuple)):
            raise ValueError(f"{name!r} is not an open_clip vision transformer (timm or ResNet tower)")
        return cls(
            name=name,
            pretrained=pretrained,
            embed_dim=cfg["embed_dim"],
            quick_gelu=cfg.get("quick_gelu", False),
            vision=vision,
        )

    @property
    def image_size(self) -> int:
        size = self.vision.get("image_size", 224)
        return size if isinstance(size, int) else size[0]


DEBUG_BACKBONE = "debug-vit"


def debug_backbone(image_size: int = 32) -> BackboneConfig:
    """The debug model's tower (``model.debug``): 2 blocks of width 64 on 32 px, a few thousand parameters."""
    return BackboneConfig(
        name=DEBUG_BACKBONE, pretrained=None, embed_dim=32, quick_gelu=True,
        vision={"image_size": image_size, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    )


# Backbones of our own, by name, beside open_clip's: what ``backbone: NAME`` in a config may also say
NAMED_BACKBONES = {DEBUG_BACKBONE: debug_backbone}


@dataclass
class LoraConfig(Config):
    r: int = setting(16, minimum=0)           # 0: no LoRA (a model with its LoRA merged)
    alpha: float = 8.0
    dropout: float = setting(0.1, minimum=0, below=1)


@dataclass
class HeadConfig(Config):
    size: int = setting(1, minimum=1)         # the last layer's width: 1 for a regression, else the classes
    hidden: tuple[int, ...] = (512, 256)
    dropout: float = setting(0.5, minimum=0, below=1)


@dataclass
class ModelConfig(Config):
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    heads: tuple[str, ...] = ("default",)   # one head per training dataset or task; the first is the default
    head_sizes: dict[str, int] = field(default_factory=dict)   # a head whose task needs another size
                                                               # than head.size: its size

    def check(self):
        unknown = sorted(set(self.head_sizes) - set(self.heads))
        require(not unknown, "head_sizes", f"{unknown[0] if unknown else ''!r} is not a head ({list(self.heads)})")
        require(all(isinstance(k, int) and k >= 1 for k in self.head_sizes.values()), "head_sizes",
                f"each head size must be an integer >= 1, got {self.head_sizes}")

    def head_size(self, head: str) -> int:
        """Size of ``head``'s last layer."""
        return self.head_sizes.get(head, self.head.size)


class MLPHead(nn.Sequential):
    def __init__(self, in_features: int, cfg: HeadConfig, size: int):
        layers: list[nn.Module] = []
        width = in_features
        for hidden in cfg.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = hidden
        layers.append(nn.Linear(width, size))
        super().__init__(*layers)


def import_open_clip_for_scoring() -> None:
    """Import open_clip as if Hugging Face ``transformers`` and ``timm`` were not installed.

    open_clip's ``__init__`` imports ``transformers`` whenever it is installed, for the Hugging Face text
    towers of some CLIP variants, and ``timm``, for its timm vision towers. A PerceptCLIP model is an
    open_clip vision transformer only (``BackboneConfig.from_open_clip`` refuses timm towers), so scoring
    uses neither, and the imports cost about 1.5 s and 0.3 s of CPU in every process that loads a model:
    on a small machine they are part of the start-up of every scoring run (``docs/benchmarks.md``). The
    scoring actors call this first thing; they are processes that only score. Elsewhere (the driver,
    training, tests) open_clip imports as usual. Does nothing once open_clip is imported, skips only
    what is not imported yet, and both stay importable afterwards for code that imports them itself
    (open_clip's own Hugging Face text towers and timm towers are then unavailable in this process).
    """
    if "open_clip" in sys.modules:
        return
    skipped = [name for name in ("transformers", "timm") if name not in sys.modules]
    for name in skipped:
        sys.modules[name] = None                # `import transformers` raises ImportError, as if absent
    try:
        import open_clip  # noqa: F401
    finally:
        for name in skipped:
            del sys.modules[name]


def build_vision_tower(cfg: BackboneConfig) -> nn.Module:
    """The open_clip VisionTransformer for ``cfg``, randomly initialised (weights are loaded separately)."""
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(cfg.embed_dim, dict(cfg.vision), quick_gelu=cfg.quick_gelu)


class ClipLoraModel(nn.Module):
    def __init__(self, cfg: ModelConfig, visual: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.visual = visual if visual is not None else build_vision_tower(cfg.backbone)
        if cfg.lora.r:
            add_lora(self.visual, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
        # The base and CLIP's projection stay frozen; only the LoRA pairs (and the heads) train.
        self.visual.requires_grad_(False)
        for module in self.visual.modules():
            if isinstance(module, LoraPair):
                module.requires_grad_(True)
        self.heads = nn.ModuleDict({name: MLPHead(cfg.backbone.embed_dim, cfg.head, cfg.head_size(name))
                                    for name in cfg.heads})

    @classmethod
    def from_pretrained_backbone(cls, cfg: ModelConfig) -> ClipLoraModel:
        """Build with the backbone's pretrained open_clip weights (downloads them on first use)."""
        import open_clip

        clip = open_clip.create_model(cfg.backbone.name, pretrained=cfg.backbone.pretrained)
        return cls(cfg, visual=clip.visual)

    @property
    def default_head(self) -> str:
        return self.cfg.heads[0]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)                              # (B, embed_dim), projected, not normalised

    def forward(self, images: torch.Tensor, head: str | tuple[str, ...] | None = None) -> torch.Tensor:
        """One head's outputs (B, K); for a tuple of heads, theirs side by side (B, K_1 + K_2 + ...),
        all from one backbone pass."""
        features = self.embed(images)
        if isinstance(head, tuple):
            return torch.cat([self.heads[h](features) for h in head], dim=1)
        return self.heads[head or self.default_head](features)   # (B, K)

    def merge_lora(self) -> ClipLoraModel:
        """Fold LoRA into the base weights for inference; the model then has no LoRA parameters."""
        merge_lora(self.visual)
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA and head tensors only: what a training checkpoint needs to hold."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}
