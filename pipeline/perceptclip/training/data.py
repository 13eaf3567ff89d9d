"""The rows a training worker reads: a shard's labelled samples as crops (``shard_rows``), one worker's
shards of a set for an epoch (``epoch_items``; the worker's session reads them), and the epoch's
batches of those rows (``shuffled_batches``; for validation, in order: ``batches_of``).

An epoch's rows are a function of (seed, epoch, rank): which shards a worker reads, their order and
every crop and flip are drawn from generators seeded with them, so a resumed run reads what the
uninterrupted run read (docs/reliability.md#training).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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


def epoch_items(urls: list[str], epoch: int, seed: int, rank: int, world: int) -> list[dict]:
    """This worker's shards of one training set for one epoch, as items for ``shard_rows``: the set's
    shards are put in an order drawn from (seed, epoch) and dealt to the workers in turn; each carries
    the seed its crops are drawn with, from (seed, epoch, shard). Read twice, an epoch gives every worker
    the same rows in the same order."""
    order = np.random.default_rng([seed, epoch]).permutation(len(urls))[rank::world]
    return [{"url": urls[i], "seed": derive_seed(seed, epoch, int(i))} for i in order]


def shuffled_batches(chunks: Iterable[dict], batch_size: int, shuffle_seed: int, window: int = 4) -> Iterator[dict]:
    """Batches of the rows in ``chunks`` (columns of numpy arrays), shuffled within a window of ``window``
    batches: whenever the window is full, a batch is drawn from it at random. The batches depend on the
    rows, their order and the seed only, not on how the rows are cut into chunks."""
    rng = np.random.default_rng(shuffle_seed)
    full = batch_size * window
    held: dict | None = None
    for chunk in chunks:
        n, start = _rows(chunk), 0
        while start < n:
            take = min(n - start, full - _rows(held))
            part = {k: v[start:start + take] for k, v in chunk.items()}
            held = part if held is None else {k: np.concatenate([held[k], part[k]]) for k in held}
            start += take
            if _rows(held) == full:
                order = rng.permutation(full)
                yield _pick(held, order[:batch_size])
                held = _pick(held, order[batch_size:])
    if held is not None and _rows(held):
        order = rng.permutation(_rows(held))
        for i in range(0, len(order), batch_size):
            yield _pick(held, order[i:i + batch_size])


def batches_of(chunks: Iterable[dict], size: int) -> Iterator[dict]:
    """The rows of ``chunks`` (columns of numpy arrays), in order, in batches of ``size`` (the last smaller)."""
    held: list[dict] = []
    count = 0
    for chunk in chunks:
        held.append(chunk)
        count += _rows(chunk)
        while count >= size:
            rows = {k: np.concatenate([c[k] for c in held]) for k in held[0]}
            yield {k: v[:size] for k, v in rows.items()}
            held, count = [{k: v[size:] for k, v in rows.items()}], count - size
    if count:
        yield {k: np.concatenate([c[k] for c in held]) for k in held[0]}


def _rows(columns: dict | None) -> int:
    return 0 if columns is None else len(next(iter(columns.values())))


def _pick(columns: dict, index: np.ndarray) -> dict:
    return {k: v[index] for k, v in columns.items()}
