"""The Python API: the scoring job from Python, and score columns for a Ray Data pipeline of your own.

    import perceptclip

    summary = perceptclip.score(input="shards/{000000..000099}.tar", output="scores",
                                models=["perceptclip-iqa"])            # as ``perceptclip score``

    ds = ray.data.read_images("photos/", include_paths=True)          # or read_parquet, from_items, ...
    ds = perceptclip.add_scores(ds, ["perceptclip-iqa"], image_column="image")
    ds.filter(lambda row: row["error"] is None and row["iqa"] > 0.6).write_parquet("best")

``add_scores`` runs the scoring job's model actors on your dataset: the same models, preprocessing,
batch-invariant model calls, actor pool and resources, so an image's scores are the bits ``score`` gives
it. A bad image is an error value in its row (``error``, null when the image scored), never a failed
dataset. ``perceptclip.Scorer`` scores a few images in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from perceptclip.model.preprocess import DEFAULT_MAX_PIXELS, ImageError, PreprocessConfig, decode_image, preprocess

if TYPE_CHECKING:
    from perceptclip.output.runs import RunSummary
    from perceptclip.scoring.config import ScoreConfig


def score(input: str | list[str] | None = None, output: str | None = None,
          models: str | list[str] | None = None, *, config: str | ScoreConfig | None = None,
          progress: Callable[[str], None] | None = None, **settings) -> RunSummary:
    """The scoring job, as ``perceptclip score`` runs it: every shard ``input`` names that is not yet
    committed under ``output``, scored with ``models``; returns the run summary. ``config``: a YAML file
    or a ``ScoreConfig``; ``settings``: any of its fields (``configs/score.yaml``), over the config.
    ``progress``: called with each progress line (default: the ``perceptclip.score`` logger, at INFO).
    Raises ``ValueError`` for a bad setting, before any work; a shard that could not be read is in the
    summary's ``failed``, as on the command line (where it makes the exit status 1)."""
    import dataclasses

    from perceptclip.scoring.config import ScoreConfig, load_score_config
    from perceptclip.scoring.job import run_score

    given = {"input": [input] if isinstance(input, str) else input, "output": output,
             "models": [models] if isinstance(models, str) else models, **settings}
    if isinstance(config, ScoreConfig):
        cfg = dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None}).validate()
    else:
        cfg = load_score_config(config, **given)
    # progress lines go to the ``perceptclip.score`` logger unless a callable takes them
    return run_score(cfg, progress=progress) if progress else run_score(cfg)


def add_scores(ds, models: str | list[str], image_column: str = "image", *, batch_size: int = 64,
               actors: int | None = None, gpus_per_actor: float | None = None, cpus_per_actor: float = 1.0,
               model_batch: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               error_column: str = "error", storage_options: dict | None = None):
    """``ds`` (a ``ray.data.Dataset``) with each model's score columns and ``error_column`` added.

    ``image_column`` holds encoded image bytes (``read_parquet``, ``read_binary_files``) or decoded
    HWC uint8 arrays (``read_images``); each model's own preprocessing is applied either way. Arrays are
    taken as they are: EXIF orientation is applied to bytes only (as ``score`` does), so for photos that
    carry one pass bytes to get ``score``'s scores. ``models``, ``batch_size`` (images per actor call),
    ``actors``, ``gpus_per_actor``, ``cpus_per_actor`` and ``model_batch`` mean what they mean for
    ``perceptclip score``: by default one actor per GPU of the cluster, else one on the CPU."""
    import ray

    from perceptclip.model.reference import ModelSpec, check_columns, distinct_preprocessing
    from perceptclip.scoring.job import actor_pool

    specs = [ModelSpec.resolve(m, storage_options, batch=model_batch)
             for m in ([models] if isinstance(models, str) else models)]
    check_columns(specs)
    preprocessing, crops_index = distinct_preprocessing(specs)
    if not ray.is_initialized():
        ray.init()          # as Ray Data itself would: RAY_ADDRESS, else the last `ray start`, else a local cluster
    _check_names(ds, specs, image_column, error_column)
    size, per_actor = actor_pool(actors, gpus_per_actor)
    return ds.map_batches(
        ScoreColumns, batch_size=batch_size, batch_format="numpy",
        fn_constructor_args=([s.actor_args() for s in specs], crops_index, preprocessing,
                             image_column, error_column, max_pixels, storage_options),
        compute=ray.data.ActorPoolStrategy(size=size), num_gpus=per_actor, num_cpus=cpus_per_actor)


def _check_names(ds, specs, image_column: str, error_column: str) -> None:
    """Refuse, before any model loads, columns the dataset lacks or would get twice. A dataset whose schema is
    not known yet (``read_binary_files(...).map(...)``) runs until its first block says it: a user's
    column is never overwritten."""
    schema = ds.schema(fetch_if_missing=True)
    if schema is None:                  # no rows at all: nothing to overwrite, nothing to score
        return
    names = list(schema.names)
    if image_column not in names:
        raise ValueError(f"image_column: the dataset has no column {image_column!r}; its columns: {', '.join(names)}")
    for column in [c for s in specs for c in s.columns] + [error_column]:
        if column in names:
            raise ValueError(f"the dataset already has a column {column!r}; name the model NAME=MODEL "
                             f"(or pass error_column=) so the scores get columns of their own")


class ScoreColumns:
    """Ray Data stage of ``add_scores``: a batch of the user's rows -> the same rows with score columns.
    Loads every model once, when the actor starts."""

    def __init__(self, models: list[tuple[str, str, int | None]], crops_index: list[int],
                 preprocessing: list[PreprocessConfig], image_column: str, error_column: str, max_pixels: int,
                 storage_options: dict | None = None):
        from perceptclip.scoring.actor import load_scorers

        self.scorers = load_scorers(models, storage_options)
        self.crops_index, self.preprocessing = crops_index, preprocessing
        self.image_column, self.error_column, self.max_pixels = image_column, error_column, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch[self.image_column]
        n = len(images)
        crops = [np.zeros((n, p.crops if p.kind == "multi_crop" else 1, 3, p.size, p.size), np.uint8)
                 for p in self.preprocessing]
        errors = np.full(n, None, dtype=object)
        for i in range(n):
            try:
                img = as_image(images[i], self.max_pixels)
                for out, p in zip(crops, self.preprocessing):
                    out[i] = preprocess(img, p)
            except ImageError as e:
                errors[i] = str(e)
            except Exception as e:  # one odd image must not fail the user's dataset
                errors[i] = f"preprocess_failed: {type(e).__name__}: {e}"
        ok = np.flatnonzero(errors == None)  # noqa: E711 (elementwise)
        out = dict(batch)
        for scorer, i in zip(self.scorers, self.crops_index):
            for name, values in scorer.columns(scorer.score(crops[i][ok])).items():
                full = np.full(n, None, dtype=object)
                full[ok] = values
                out[name] = full
        out[self.error_column] = errors
        return out


def as_image(value, max_pixels: int = DEFAULT_MAX_PIXELS):
    """A cell of the image column -> an RGB image: encoded bytes are decoded as ``score`` decodes them;
    an array is taken as HWC (or HW) uint8 pixels."""
    from PIL import Image

    from perceptclip.model.preprocess import to_rgb

    if value is None:
        raise ImageError("empty", "no image (null)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_image(bytes(value), max_pixels=max_pixels)
    if isinstance(value, dict) and "bytes" in value:           # a Hugging Face datasets Image struct
        return as_image(value["bytes"], max_pixels)
    arr = np.asarray(value)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ImageError("not_an_image", f"expected encoded bytes or HWC uint8 pixels, got an array of "
                                         f"{arr.dtype} with shape {arr.shape}")
    if arr.shape[0] * arr.shape[1] > max_pixels:
        raise ImageError("too_large", f"{arr.shape[1]}x{arr.shape[0]} exceeds the limit of {max_pixels} pixels")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
