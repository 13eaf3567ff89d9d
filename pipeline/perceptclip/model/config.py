"""A PerceptCLIP model's architecture as configuration: the open_clip vision tower (``BackboneConfig``),
its LoRA (``LoraConfig``), the heads (``HeadConfig``) and the whole (``ModelConfig``). Plain data without
torch: the drivers read and check a model's configuration (an artifact's ``config.json``, a training
config) without importing torch; ``perceptclip.model.clip_lora`` builds the model from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from perceptclip.core.config import Config, require, setting

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
