"""A loaded model ready to score images: the one inference path shared by ``predict`` and the scoring job.

    scorer = Scorer.load("perceptclip-iqa")           # or a local path / s3:// artifact
    crops = scorer.preprocess(decode_image(data))     # uint8 (n, 3, S, S), on the CPU
    out = scorer.score([crops, ...])                  # float32 (N, K): crop outputs averaged per image
                                                      # (or one (N, n, 3, S, S) array: no gathering copy)
    scorer.columns(out)                               # {"iqa": array}  or  {"emotion": [...], "emotion_awe": array, ...}

LoRA is merged at load (no adapter cost at inference); attention runs through PyTorch's
scaled-dot-product kernels. On a GPU the model runs in bf16 autocast by default, and images travel as
uint8 through pinned memory with non-blocking copies, normalised on the device. ``compile=True``
wraps the model in ``torch.compile``.
"""

from __future__ import annotations

import numpy as np
import torch

from perceptclip.artifact import ArtifactMeta, describe, load_artifact
from perceptclip.model import ClipLoraModel
from perceptclip.preprocess import normalize, preprocess


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Scorer:
    def __init__(self, model: ClipLoraModel, meta: ArtifactMeta, name: str | None = None,
                 device: str | torch.device | None = None, head: str | None = None,
                 precision: str | None = None, compile: bool = False):
        self.meta = meta
        self.name = name or meta.task
        self.device = torch.device(device) if device is not None else default_device()
        precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.precision = precision
        self.autocast_dtype = PRECISIONS[precision]
        self.head = head or model.default_head
        if self.head not in model.heads:
            raise ValueError(f"model has no head {self.head!r}; heads: {', '.join(model.heads)}")
        self.model = model.merge_lora().eval().to(self.device)
        self._forward = torch.compile(self.model, dynamic=True) if compile else self.model

    @classmethod
    def load(cls, ref: str, device: str | torch.device | None = None, name: str | None = None,
             storage_options: dict | None = None, **options) -> "Scorer":
        """``ref``: a built-in name (``perceptclip-iqa``), a local artifact directory or an fsspec URI.
        ``NAME=REF`` names the output columns (two models of one task need different names) and
        ``REF#HEAD`` picks a head of a multi-dataset model. ``storage_options``: per protocol, for
        artifacts on object storage (``perceptclip.storage.storage_options``)."""
        from perceptclip.official import parse_model_ref, resolve_model

        given_name, ref, head = parse_model_ref(ref)
        name = name or given_name
        model, meta = load_artifact(resolve_model(ref), storage_options=storage_options)
        meta.provenance.setdefault("ref", ref)
        return cls(model, meta, name=name, device=device, head=head, **options)

    @property
    def labels(self) -> list[str] | None:
        return self.meta.labels

    def describe(self) -> dict:
        return {"name": self.name, "head": self.head, **describe(self.meta)}

    def preprocess(self, image) -> np.ndarray:
        return preprocess(image, self.meta.preprocess)

    @torch.inference_mode()
    def score(self, crops: list[torch.Tensor | np.ndarray] | torch.Tensor | np.ndarray) -> np.ndarray:
        """Per-image uint8 crops -> float32 (N, K) outputs, each image's crops averaged.

        ``crops`` is a list of (n_i, 3, S, S) arrays or tensors, one per image, or one (N, n, 3, S, S)
        array or tensor when every image has n crops (the scoring job's blocks: nothing is copied to
        gather them). Classification models average logits over crops; ``columns`` applies the softmax."""
        if isinstance(crops, (list, tuple)):
            counts = [c.shape[0] for c in crops]
            batch = torch.cat([torch.as_tensor(c) for c in crops]) if crops else None
        else:
            crops = torch.as_tensor(crops)
            if crops.ndim != 5:
                raise ValueError(f"crops: expected (images, crops, 3, S, S), got shape {tuple(crops.shape)}")
            counts = [crops.shape[1]] * crops.shape[0]
            batch = crops.flatten(0, 1)
        if not counts:
            return np.zeros((0, self.meta.model.head.outputs), dtype=np.float32)
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()          # lets the copy below overlap with work already queued
        x = normalize(batch.to(self.device, non_blocking=True), self.meta.preprocess.mean, self.meta.preprocess.std)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self._forward(x, head=self.head)
        out = out.float()
        if len(set(counts)) == 1:               # one reduction, not one small kernel per image
            per_image = out.view(len(counts), counts[0], -1).mean(1)
        else:
            per_image = torch.stack([chunk.mean(0) for chunk in out.split(counts)])
        return per_image.cpu().numpy()

    def columns(self, outputs: np.ndarray) -> dict[str, object]:
        """Table columns for ``outputs`` (N, K): one float per regression model; for a classifier the
        arg-max label and one probability column per class."""
        if self.labels is None:
            return {self.name: outputs[:, 0].astype(np.float32)}
        probs = torch.softmax(torch.from_numpy(outputs), dim=1).numpy().astype(np.float32)
        cols: dict[str, object] = {self.name: [self.labels[i] for i in probs.argmax(1)]}
        for i, label in enumerate(self.labels):
            cols[f"{self.name}_{label}"] = probs[:, i]
        return cols

    def record(self, output: np.ndarray) -> dict[str, object]:
        """One image's JSON fields: ``{name: float}``, or ``{name: label, name_probs: {label: p}}``."""
        if self.labels is None:
            return {self.name: float(output[0])}
        probs = torch.softmax(torch.from_numpy(output), dim=0).tolist()
        return {self.name: self.labels[int(np.argmax(probs))],
                f"{self.name}_probs": {label: p for label, p in zip(self.labels, probs)}}
