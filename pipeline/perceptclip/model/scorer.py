"""A loaded model ready to score images: the one inference path shared by ``predict`` and the scoring job.

    scorer = Scorer.load("perceptclip-iqa")           # or a local path / s3:// artifact
    crops = scorer.preprocess(decode_image(data))     # uint8 (n, 3, S, S), on the CPU
    out = scorer.score([crops, ...])                  # float32 (N, K): crop outputs averaged per image
                                                      # (or one (N, n, 3, S, S) array: no gathering copy)
    scorer.columns(out)                               # {"iqa": array}  or  {"emotion": [...], "emotion_awe": array, ...}

A model whose heads serve several tasks scores every head from one backbone pass per model call: its
outputs sit side by side in ``score``'s array and ``columns`` names each head's after its task
(``REF#HEAD`` picks one head; ``ArtifactMeta.scored_heads`` says which heads, under which names).

**One image, one score.** Every model call has the same number of crops, the canonical batch
(``canonical_batch``: per device type and model size), the last call of a batch padded with zero
crops, and on a CPU every call runs on the same number of intra-op threads (``canonical_threads``).
Matrix kernels pick their blocking, and so their order of summation, by the shapes they are given and
the threads they split over: without the padding an image's score moves in its last bits with the
batch it meets, without the pinning with the machine's cores. With both an image's scores are
bit-identical whatever batch, position, shard, block, actor or core count, and through
``predict``, the scoring job or ``add_scores``, given the same device type, precision and library
versions (docs/scoring.md says what is and is not promised).

LoRA is merged at load (no adapter cost at inference); attention runs through PyTorch's
scaled-dot-product kernels. On a GPU the model runs in bf16 autocast by default, and images travel as
uint8 through pinned memory with non-blocking copies, normalised on the device. ``compile=True``
wraps the model in ``torch.compile``.
"""

from __future__ import annotations

import numpy as np
import torch

from perceptclip.model.artifact import ArtifactMeta, describe, load_artifact
from perceptclip.model.batching import canonical_batch, canonical_threads
from perceptclip.model.clip_lora import ClipLoraModel
from perceptclip.model.preprocess import normalize, preprocess

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Scorer:
    def __init__(self, model: ClipLoraModel, meta: ArtifactMeta, name: str | None = None,
                 device: str | torch.device | None = None, head: str | None = None,
                 precision: str | None = None, compile: bool = False, batch: int | None = None,
                 threads: int | None = None):
        """``batch``: crops per model call (None: ``canonical_batch`` for the device and model; 0: one call
        for whatever is passed, unpadded, so that scores depend on the batch). ``threads``: a CPU's
        intra-op threads for scoring (None: ``canonical_threads``; 0: torch's setting as it is, so that
        scores depend on the machine's cores)."""
        self.meta = meta
        self.device = torch.device(device) if device is not None else default_device()
        precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.precision = precision
        self.autocast_dtype = PRECISIONS[precision]
        # (head, column name, task) of each head scored, in output order
        # (naming a model after its own task renames nothing: the job's actors are given every model's name)
        self.scored_heads = meta.scored_heads(head, name if name != meta.task.name else None)
        self.heads = tuple(h for h, _, _ in self.scored_heads)
        self.name = self.scored_heads[0][1]        # the first output's (the only one, but for a model of several tasks)
        if batch is not None and batch < 0:
            raise ValueError(f"batch must be >= 0 (0: unpadded calls), not {batch}")
        self.batch = canonical_batch(self.device.type, meta.model) if batch is None else batch
        if threads is not None and threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's setting as it is), not {threads}")
        self.threads = canonical_threads(self.device.type) if threads is None else (threads or None)
        self.model = model.merge_lora().eval().to(self.device)
        self._forward = torch.compile(self.model, dynamic=True) if compile else self.model

    @classmethod
    def load(cls, ref: str, device: str | torch.device | None = None, name: str | None = None,
             storage_options: dict | None = None, **options) -> Scorer:
        """``ref``: a built-in name (``perceptclip-iqa``), a local artifact directory or an fsspec URI.
        ``NAME=REF`` names the output columns (two models of one task need different names) and
        ``REF#HEAD`` picks a head of a multi-dataset model. ``storage_options``: per protocol, for
        artifacts on object storage (``perceptclip.core.storage.storage_options``)."""
        from perceptclip.model.reference import parse_model_ref, resolve_model

        given_name, ref, head = parse_model_ref(ref)
        name = name or given_name
        model, meta = load_artifact(resolve_model(ref), storage_options=storage_options)
        meta.provenance.setdefault("ref", ref)
        return cls(model, meta, name=name, device=device, head=head, **options)

    @property
    def head(self) -> str:
        """The head scored first (the only one, unless the model serves several tasks)."""
        return self.heads[0]

    @property
    def labels(self) -> list[str] | None:
        labels = self.scored_heads[0][2].labels
        return list(labels) if labels else None

    @property
    def names(self) -> list[str]:
        """Each output's name: the score column (or JSON key) of each head scored."""
        return [name for _, name, _ in self.scored_heads]

    def describe(self) -> dict:
        return {"name": self.name, "head": self.head, "heads": list(self.heads), "batch": self.batch,
                "threads": self.threads,
                "device": self.device.type, "precision": self.precision, **describe(self.meta)}

    def preprocess(self, image) -> np.ndarray:
        return preprocess(image, self.meta.preprocess)

    def score(self, crops: list[torch.Tensor | np.ndarray] | torch.Tensor | np.ndarray) -> np.ndarray:
        """Per-image uint8 crops -> float32 (N, K) outputs, each image's crops averaged.

        ``crops`` is a list of (n_i, 3, S, S) arrays or tensors, one per image, or one (N, n, 3, S, S)
        array or tensor when every image has n crops (the scoring job's blocks: nothing is copied to
        gather them). Classification models average logits over crops; ``columns`` applies the softmax.
        On a CPU it runs on ``self.threads`` intra-op threads, torch's setting restored after."""
        if self.threads is None:
            return self._score(crops)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._score(crops)
        finally:
            torch.set_num_threads(before)

    @torch.inference_mode()
    def _score(self, crops) -> np.ndarray:
        if isinstance(crops, (list, tuple)):
            counts = [c.shape[0] for c in crops]
            batch = torch.cat([torch.as_tensor(c) for c in crops]) if crops else None
        else:
            crops = torch.as_tensor(crops)
            if crops.ndim != 5:
                raise ValueError(f"crops: expected (images, crops, 3, S, S), got shape {tuple(crops.shape)}")
            counts = [crops.shape[1]] * crops.shape[0]
            batch = crops.flatten(0, 1)
        sizes = [task.head_size for _, _, task in self.scored_heads]
        if not counts:
            return np.zeros((0, sum(sizes)), dtype=np.float32)
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()          # lets the copy below overlap with work already queued
        x = normalize(batch.to(self.device, non_blocking=True), self.meta.preprocess.mean, self.meta.preprocess.std)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self._calls(x)
        # each head's outputs averaged on their own, as one head scored alone is (bit for bit)
        per_image = torch.cat([self._average(part.float().contiguous(), counts) for part in out.split(sizes, 1)], 1)
        return per_image.cpu().numpy()

    @staticmethod
    def _average(out: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(crops, K) -> (images, K): each image's crops averaged."""
        if len(set(counts)) == 1:               # one reduction, not one small kernel per image
            return out.view(len(counts), counts[0], -1).mean(1)
        return torch.stack([chunk.mean(0) for chunk in out.split(counts)])

    def _calls(self, x: torch.Tensor) -> torch.Tensor:
        """The model on ``x`` in calls of exactly ``self.batch`` crops, the last padded with zeros."""
        size = self.batch or x.shape[0]
        short = -x.shape[0] % size
        if short:
            x = torch.cat([x, x.new_zeros((short, *x.shape[1:]))])
        heads = self.heads if len(self.heads) > 1 else self.heads[0]     # a tuple: one pass, every head
        out = torch.cat([self._forward(chunk, head=heads) for chunk in x.split(size)])
        return out[:out.shape[0] - short]

    def columns(self, outputs: np.ndarray) -> dict[str, object]:
        """Table columns for ``outputs`` (N, K): per head, one float for a regression; for a
        classification the arg-max label and one probability column per class."""
        cols: dict[str, object] = {}
        for (_, name, task), part in zip(self.scored_heads, self._split(outputs)):
            if not task.is_classification:
                cols[name] = part[:, 0].astype(np.float32)
                continue
            probs = torch.softmax(torch.from_numpy(part), dim=1).numpy().astype(np.float32)
            cols[name] = [task.labels[i] for i in probs.argmax(1)]
            for i, column in enumerate(task.columns(name)[1:]):
                cols[column] = probs[:, i]
        return cols

    def record(self, output: np.ndarray) -> dict[str, object]:
        """One image's JSON fields, per head: ``{name: float}``, or ``{name: label, name_probs: {label: p}}``."""
        fields: dict[str, object] = {}
        for (_, name, task), part in zip(self.scored_heads, self._split(output[None])):
            if not task.is_classification:
                fields[name] = float(part[0, 0])
                continue
            probs = torch.softmax(torch.from_numpy(part[0]), dim=0).tolist()
            fields[name] = task.labels[int(np.argmax(probs))]
            fields[f"{name}_probs"] = dict(zip(task.labels, probs))
        return fields

    def _split(self, outputs: np.ndarray) -> list[np.ndarray]:
        """(N, K_1 + K_2 + ...) -> each head's (N, K_i)."""
        bounds = np.cumsum([task.head_size for _, _, task in self.scored_heads])[:-1]
        return np.split(outputs, bounds, axis=1)
