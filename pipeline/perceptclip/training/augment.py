"""Training augmentation that keeps the label: random crops and horizontal flips.

The crop follows each task's inference preprocessing (``perceptclip.model.preprocess``) so training sees what
scoring sees, only at random positions:

- ``resize_center_crop`` tasks (memorability, emotion): the shorter side resized to ``resize_ratio``
  times the crop size (torchvision's bilinear, as at inference), then a random S x S crop.
- ``multi_crop`` tasks (iqa): a random S x S crop of the unresized image, after the same size limits
  as inference (longer side capped at ``max_side``, shorter side at least S), since resizing would
  destroy the artefacts being judged.

Output is uint8 (1, 3, S, S), like ``preprocess``; normalisation happens on the training device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from perceptclip.core.config import Config, setting
from perceptclip.model.preprocess import PreprocessConfig


@dataclass
class AugmentConfig(Config):
    flip: bool = True              # horizontal flips keep quality, memorability and emotion
    # resize_center_crop tasks: shorter side = ratio * S before the crop (256/224)
    resize_ratio: float = setting(1.14, minimum=1.0, maximum=4.0)


def random_crop(img: Image.Image, pre: PreprocessConfig, aug: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """RGB image -> one uint8 crop (1, 3, S, S) at a random position, flipped with probability 1/2."""
    from torchvision.transforms import functional as TF

    size = pre.size
    if pre.kind == "multi_crop":
        width, height = img.size
        if max(width, height) > pre.max_side:
            scale = pre.max_side / max(width, height)
            img = img.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
        if min(img.size) < size:
            img = TF.resize(img, size)
    else:
        img = TF.resize(img, max(size, round(size * aug.resize_ratio)))
    arr = np.asarray(img, dtype=np.uint8)                     # (H, W, 3)
    height, width = arr.shape[:2]
    y = int(rng.integers(0, height - size + 1))
    x = int(rng.integers(0, width - size + 1))
    crop = arr[y:y + size, x:x + size]
    if aug.flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).unsqueeze(0)  # (1, 3, S, S)
