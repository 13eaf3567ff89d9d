"""The fine-tuning losses of the paper's tasks (PAPER.md): PLCC-induced for iqa, MSE for memorability,
cross-entropy for emotion. ``Task.loss`` names one of them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def plcc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Pearson correlation of the batch: invariant to the scale and shift of the labels."""
    p = pred - pred.mean()
    t = target - target.mean()
    return 1 - (p * t).sum() / (p.norm() * t.norm() + 1e-8)


def task_loss(loss: str, out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The task's loss over the valid rows. A batch without enough valid rows gives a zero that still
    depends on every output, so all workers run the same backward (DDP needs it)."""
    out, target = out.float(), target.float()
    needed = 2 if loss == "plcc" else 1
    if int(valid.sum()) < needed:
        return out.sum() * 0.0
    out, target = out[valid], target[valid]
    if loss == "mse":
        return F.mse_loss(out[:, 0], target)
    if loss == "plcc":
        return plcc_loss(out[:, 0], target)
    if loss == "cross_entropy":
        return F.cross_entropy(out, target.long())
    raise ValueError(f"unknown loss {loss!r}")
