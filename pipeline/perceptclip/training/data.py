"""The rows a training worker reads: a shard's labelled samples as crops (``shard_rows``), and the
Ray Data datasets of one worker's share of a set, for an epoch of training (``epoch_rows``) or for
validation (``val_rows``).

An epoch's rows are a function of (seed, epoch, rank): which shards a worker reads, their order and
every crop and flip are drawn from generators seeded with them, so a resumed run reads what the
uninterrupted run read (docs/reliability.md#training).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from perceptclip.core.tasks import Task, resolve_task
from perceptclip.model.preprocess import PreprocessConfig, preprocess
from perceptclip.training.augment import AugmentConfig, random_crop
from perceptclip.training.labels import labelled_samples


def shard_rows(row: dict, task: Task | str, pre: PreprocessConfig, aug: AugmentConfig | None,
               storage_options: dict | None = None) -> list[dict]:
    """One shard URL -> one row per sample: ``pixels`` uint8 (n, 3, S, S), ``target``, ``key``, ``error``
    and ``reason`` (why the sample cannot be used, as ``perceptclip.training.labels`` names it; "" when it can).

    ``aug`` None gives the inference preprocessing (validation); otherwise one random crop per sample.
    A sample that cannot be used (bad image, no label) becomes a row with ``error`` set and zero
    pixels, so it is counted, not silently lost; a shard that cannot be read becomes one such row.
    Training rows carry ``seed``: the crops are drawn from it, so a shard read again in the same epoch
    (a resumed run) gives the same pixels."""
    crops = 1 if aug is not None or pre.kind != "multi_crop" else pre.crops
    blank = np.zeros((crops, 3, pre.size, pre.size), dtype=np.uint8)
    rng = np.random.default_rng(row.get("seed"))

    def transform(img):
        return np.asarray(random_crop(img, pre, aug, rng) if aug is not None else preprocess(img, pre))

    return [{"key": s.key, "pixels": s.image if s.ok else blank, "target": s.target, "error": s.error,
             "reason": s.reason}
            for s in labelled_samples(row["url"], resolve_task(task), transform, storage_options)]


def derive_seed(*parts: int) -> int:
    """One 32-bit seed from several integers (run seed, epoch, rank or shard), for APIs that take one."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def epoch_rows(urls: list[str], epoch: int, seed: int, rank: int, world: int, task: Task | str,
               pre: PreprocessConfig, aug: AugmentConfig, storage_options: dict):
    """This worker's rows of one training set for one epoch. The set's shards are put in an order
    drawn from (seed, epoch) and dealt to the workers in turn; each shard is cropped with a generator
    seeded by (seed, epoch, shard). Read twice, an epoch gives every worker the same rows, in the same
    order when the DataContext preserves it (the worker sets it)."""
    import ray.data

    order = np.random.default_rng([seed, epoch]).permutation(len(urls))[rank::world]
    items = [{"url": urls[i], "seed": derive_seed(seed, epoch, int(i))} for i in order]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.flat_map(partial(shard_rows, task=task, pre=pre, aug=aug, storage_options=storage_options))


def val_rows(urls: list[str], task: Task | str, pre: PreprocessConfig, storage_options: dict):
    """The rows of the validation shards ``urls``, preprocessed as for scoring."""
    import ray.data

    ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
    return ds.flat_map(partial(shard_rows, task=task, pre=pre, aug=None, storage_options=storage_options))


def shuffled_batches(rows, batch_size: int, shuffle_seed: int):
    """A dataset's batches, shuffled within a window of a few batches, the same way for the same seed."""
    return rows.iter_batches(batch_size=batch_size, batch_format="numpy",
                             local_shuffle_buffer_size=batch_size * 4, local_shuffle_seed=shuffle_seed)
