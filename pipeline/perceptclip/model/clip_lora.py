"""PerceptCLIP: an open_clip vision transformer with LoRA on q, k, v of every block and a small MLP head.

    image (B, 3, S, S), normalised
      -> open_clip VisionTransformer (frozen; LoRA on q, k, v)      class token after ln_post
      -> CLIP's visual projection (frozen)                            (B, embed_dim), 768 for ViT-L/14
      -> head: Linear(embed_dim, 512) ReLU Dropout(0.5)
               Linear(512, 256) ReLU Dropout(0.5) Linear(256, K)      (B, K)

Several heads may share one backbone: one per training dataset of a task (the paper's multi-dataset
variant), or one per task, each with its own output size. Each head has a name and the model has a
default one; one backbone pass serves any number of heads (``forward(images, heads)``). Architecture lives
in ``ModelConfig`` (``perceptclip.model.config``); weights live apart, in artifacts
(``perceptclip.model.artifact``) or in the released checkpoints (``perceptclip.model.official``).
"""

from __future__ import annotations

import importlib
import sys
import types

import torch
from torch import nn

from perceptclip.model.config import BackboneConfig, HeadConfig, ModelConfig
from perceptclip.model.lora import LoraPair, add_lora, merge_lora


class MLPHead(nn.Sequential):
    def __init__(self, in_features: int, cfg: HeadConfig, size: int):
        layers: list[nn.Module] = []
        width = in_features
        for hidden in cfg.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = hidden
        layers.append(nn.Linear(width, size))
        super().__init__(*layers)


def import_open_clip_for_vision_towers() -> None:
    """Import open_clip as if Hugging Face ``transformers`` and ``timm`` were not installed, and without
    torch's compiler.

    open_clip's ``__init__`` imports ``transformers`` whenever it is installed, for the Hugging Face text
    towers of some CLIP variants, and ``timm``, for its timm vision towers. A PerceptCLIP model is an
    open_clip vision transformer only (``BackboneConfig.from_open_clip`` refuses timm towers), built from
    its ``ModelConfig``, so neither is used, and the imports cost about 1.5 s and 0.3 s of CPU in every
    process that builds a model. open_clip also imports torchvision, whose ``ops.roi_align`` imports one
    function from ``torch._dynamo.utils`` and with it torch's compiler stack (dynamo, inductor, sympy):
    another 1 to 1.5 s, for a function a scoring process never calls. So that function is given as a
    stand-in that imports the real one when called (``_DeferredDynamoUtils``), and torch's compiler is
    imported only if something uses it (``Scorer(compile=True)`` does; so does a training worker's first
    optimiser step, as torch's optimisers import it).

    On a small machine these imports are part of the start-up of every scoring run and every training
    worker (``docs/benchmarks.md``). The scoring actors call this first thing, and a training worker
    before it builds a model from its configuration or an artifact; a worker that takes the backbone's
    pretrained weights from open_clip (``from_pretrained_backbone``: the whole CLIP, whose text tower may
    be a Hugging Face one) does not. Elsewhere (the driver, tests) open_clip imports as usual. Does
    nothing once open_clip is imported, skips only what is not imported yet, and everything stays
    importable afterwards for code that imports it itself (open_clip's own Hugging Face text towers and
    timm towers are then unavailable in this process).
    """
    if "open_clip" in sys.modules:
        return
    skipped: dict[str, object] = {name: None for name in ("transformers", "timm") if name not in sys.modules}
    if not {"torchvision", "torch._dynamo", _DeferredDynamoUtils.NAME} & sys.modules.keys():
        skipped[_DeferredDynamoUtils.NAME] = _DeferredDynamoUtils()
    for name, stand_in in skipped.items():
        sys.modules[name] = stand_in            # None: `import transformers` raises ImportError, as if absent
    try:
        import open_clip  # noqa: F401
    finally:
        for name, stand_in in skipped.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]


class _DeferredDynamoUtils(types.ModuleType):
    """A stand-in for ``torch._dynamo.utils`` while open_clip (and with it torchvision) is imported: its
    ``is_compile_supported`` imports the real module when first called; any other name imports the real
    module at once (what a plain import would have cost) and is taken from it."""

    NAME = "torch._dynamo.utils"

    def __init__(self):
        super().__init__(self.NAME)

    @staticmethod
    def real() -> types.ModuleType:
        stand_in = sys.modules.get(_DeferredDynamoUtils.NAME)
        if isinstance(stand_in, _DeferredDynamoUtils):
            del sys.modules[_DeferredDynamoUtils.NAME]
        return importlib.import_module(_DeferredDynamoUtils.NAME)

    @staticmethod
    def is_compile_supported(device_type):
        return _DeferredDynamoUtils.real().is_compile_supported(device_type)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.real(), name)


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
