"""The scoring job's model actor: decoded blocks in, score rows out, every model loaded once per actor.
A plain class and function: the job (``scoring.job``) puts them on a Ray actor pool; tests call them
directly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from perceptclip.model.preprocess import DEFAULT_MAX_PIXELS, PreprocessConfig


class ModelActor:
    """Ray Data stage: decoded blocks -> score rows. Loads every model once, when the actor starts."""

    def __init__(self, models: list[tuple[str, str, int | None]], crops_index: list[int], torch_threads: int | None,
                 options: dict | None = None, preprocessing: list[PreprocessConfig] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.scorers = load_scorers(models, options, torch_threads)
        self.crops_index = crops_index
        self.preprocessing, self.max_pixels = preprocessing, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if "data" in batch:                                  # decode: device
            from perceptclip.model.device_decode import decode_block

            batch = decode_block(batch, self.preprocessing, self.scorers[0].device, self.max_pixels)
        return score_block(batch, self.scorers, self.crops_index)


def load_scorers(models: list[tuple[str, str, int | None]], options: dict | None = None,
                 torch_threads: int | None = None) -> list:
    """Every model (``(name, ref, model_batch)`` as ``ModelSpec.actor_args`` gives it) loaded once, as a
    model actor of the job or of ``add_scores`` starts. The run's storage options travel with the job:
    workers may hold no credentials of their own."""
    from perceptclip.model.clip_lora import import_open_clip_for_vision_towers

    import_open_clip_for_vision_towers()          # before anything imports open_clip: skips its transformers
    import torch

    from perceptclip.model.scorer import Scorer

    if torch_threads:
        torch.set_num_threads(torch_threads)
    return [Scorer.load(ref, name=name, storage_options=options, batch=batch) for name, ref, batch in models]


def score_block(batch: dict[str, np.ndarray], scorers, crops_index: list[int]) -> pa.Table:
    """Score the ok rows of ``batch`` with every scorer; error and control rows get null scores."""
    import torch

    ok = np.flatnonzero(batch["status"] == "ok")
    n = len(batch["status"])
    # A text column that is null in every row of a block comes back from Ray as floats: keep strings only.
    columns: dict[str, pa.Array] = {
        name: pa.array([v if isinstance(v, str) else None for v in batch[name]], type=pa.string())
        for name in ("shard", "key", "status", "error", "url", "caption", "carried") if name in batch
    }
    columns["ordinal"] = pa.array(batch["ordinal"], type=pa.int64())
    columns["shard_rows"] = pa.array(batch["shard_rows"], type=pa.int64())
    for name in ("width", "height"):
        columns[name] = pa.array(batch[name], type=pa.int32(), mask=batch[name] < 0)
    missing = np.ones(n, dtype=bool)
    missing[ok] = False
    for scorer, i in zip(scorers, crops_index):
        crops = batch[f"crops_{i}"]                       # numpy from the read tasks, a tensor if decoded here
        if isinstance(crops, np.ndarray):
            # Ray Data hands a block over as a read-only view of its object store, torch wants writable memory:
            # the image rows, gathered in one copy (pinned for a GPU: the copy the scorer makes to pin them)
            rows = torch.empty((len(ok), *crops.shape[1:]), dtype=torch.uint8, pin_memory=scorer.device.type == "cuda")
            np.take(crops, ok, axis=0, out=rows.numpy(), mode="clip")    # clip: unbuffered (ok is in range)
            crops = rows
        elif len(ok) < n:                                 # error and control rows have no image
            crops = crops[torch.as_tensor(ok, device=crops.device)]
        outputs = scorer.score(crops)                     # (rows, crops, 3, S, S) as one tensor
        for name, values in scorer.columns(outputs).items():
            full = np.empty(n, dtype=object if isinstance(values, list) else np.float32)
            full[ok] = values
            columns[name] = pa.array(full, type=pa.string() if isinstance(values, list) else pa.float32(),
                                     mask=missing)
    return pa.table(columns)

