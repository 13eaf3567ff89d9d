"""LoRA on the query, key and value projections of open_clip attention.

open_clip's blocks use ``nn.MultiheadAttention``, which fuses q, k and v into one ``in_proj_weight``
of shape (3*width, width). The paper adapts q, k and v each with its own rank-r pair (as peft does on
Hugging Face CLIP's separate projections), so ``LoraAttention`` keeps the fused base weight under the
same parameter names (the OpenAI weights load unchanged) and adds three ``LoraPair`` modules whose
outputs are concatenated onto the fused projection.

    qkv = x @ W_in.T + b_in + concat(s * B_q A_q drop_q(x), s * B_k A_k drop_k(x), s * B_v A_v drop_v(x))

with s = alpha / r. Merging adds s * B A into the matching third of ``in_proj_weight`` and removes the
pairs: inference then costs exactly what plain CLIP costs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoraPair(nn.Module):
    """One low-rank update: x -> scale * B(A(dropout(x))). B starts at zero, so training starts at the base."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A = nn.Parameter(torch.empty(r, in_features))   # (r, width)
        self.B = nn.Parameter(torch.zeros(out_features, r))  # (width, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))     # peft's default initialisation

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)                # (width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.linear(self.dropout(x), self.A), self.B)


class LoraAttention(nn.Module):
    """Drop-in replacement for the batch-first ``nn.MultiheadAttention`` of an open_clip block.

    Parameter names match ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``), so state dicts of plain open_clip models load into it. Attention itself runs
    through ``F.scaled_dot_product_attention``.
    """

    def __init__(self, width: int, heads: int, r: int | None, alpha: float = 8.0, dropout: float = 0.0):
        super().__init__()
        assert width % heads == 0, (width, heads)
        self.width, self.heads = width, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.lora = (
            nn.ModuleDict({name: LoraPair(width, width, r, alpha, dropout) for name in ("q", "k", "v")})
            if r
            else None
        )

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention, r: int, alpha: float, dropout: float) -> LoraAttention:
        if not mha.batch_first or mha.in_proj_weight is None:
            raise ValueError("LoRA needs a batch-first nn.MultiheadAttention with a fused in_proj_weight")
        module = cls(mha.embed_dim, mha.num_heads, r, alpha, dropout)
        with torch.no_grad():
            module.in_proj_weight.copy_(mha.in_proj_weight)
            module.in_proj_bias.copy_(mha.in_proj_bias)
            module.out_proj.load_state_dict(mha.out_proj.state_dict())
        return module.to(mha.in_proj_weight.device, mha.in_proj_weight.dtype)

    @property
    def merged(self) -> bool:
        return self.lora is None

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the LoRA updates into ``in_proj_weight`` and drop them (inference only)."""
        if self.lora is None:
            return
        delta = torch.cat([self.lora[name].delta_weight() for name in ("q", "k", "v")], dim=0)
        self.in_proj_weight.add_(delta.to(self.in_proj_weight.dtype))
        self.lora = None

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None):
        # open_clip calls attn(q_x, k_x, v_x, need_weights=False, attn_mask=...) and reads [0];
        # the vision tower only ever does self-attention.
        if (k_x is not None and k_x is not q_x) or (v_x is not None and v_x is not q_x):
            raise ValueError("LoraAttention adapts self-attention only (the vision tower never cross-attends)")
        x = q_x                                                       # (B, N, width)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)     # (B, N, 3*width)
        if self.lora is not None:
            qkv = qkv + torch.cat([self.lora[name](x) for name in ("q", "k", "v")], dim=-1)
        b, n, _ = x.shape
        q, k, v = qkv.view(b, n, 3, self.heads, self.width // self.heads).permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, Dh)
        out = out.transpose(1, 2).reshape(b, n, self.width)
        return self.out_proj(out), None


def add_lora(module: nn.Module, r: int, alpha: float, dropout: float) -> int:
    """Replace every ``nn.MultiheadAttention`` under ``module`` with a ``LoraAttention``; returns how many."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(parent, name, LoraAttention.from_multihead(child, r, alpha, dropout))
                replaced += 1
    if replaced == 0:
        raise ValueError("no nn.MultiheadAttention found to adapt: is this an open_clip VisionTransformer?")
    return replaced


def merge_lora(module: nn.Module) -> None:
    for child in module.modules():
        if isinstance(child, LoraAttention):
            child.merge()
