"""Evaluate a model on labelled shards with exactly the scoring path (``Scorer``): what is measured
here is what ``perceptclip score`` would output.

    shards (``key.<image>`` + ``key.json`` with ``label``)
      -> perceptclip.labels: label, decode, Scorer.preprocess -> Scorer.score
      -> metrics over the whole set (``perceptclip.metrics``): srcc, plcc, mse with 95% bootstrap
         intervals for regression; accuracy, macro_f1 and the confusion matrix for classification

A sample without a usable image or label is counted under ``errors`` (by reason) and left out of the
metrics; a shard that cannot be read is counted as one error of its reason (``shard_missing``, ...).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from perceptclip.labels import labelled_samples
from perceptclip.metrics import classification_metrics, regression_metrics
from perceptclip.tasks import get_task


def evaluate(model: str, shards: str | list[str], head: str | None = None, resamples: int = 1000, seed: int = 0,
             batch_size: int = 32, device: str | None = None, storage_options: dict | None = None) -> dict:
    """Metrics of ``model`` (built-in name, artifact path or URI) on the labelled ``shards``."""
    from perceptclip.scorer import Scorer
    from perceptclip.shards import expand_shards

    scorer = Scorer.load(f"{model}#{head}" if head else model, device=device)
    task = get_task(scorer.meta.task)
    outputs, targets, pending, pending_targets = [], [], [], []
    errors: Counter = Counter()

    def flush():
        if pending:
            outputs.append(scorer.score(pending))
            targets.extend(pending_targets)
            pending.clear()
            pending_targets.clear()

    for url in expand_shards(shards, storage_options):
        for sample in labelled_samples(url, task, scorer.preprocess, storage_options):
            if not sample.ok:
                errors[sample.reason] += 1
                continue
            pending.append(sample.image)
            pending_targets.append(sample.target)
            if len(pending) == batch_size:
                flush()
    flush()

    out = np.concatenate(outputs) if outputs else np.zeros((0, task.outputs), dtype=np.float32)
    target = np.asarray(targets, dtype=np.float64)
    if task.is_classification:
        metrics = classification_metrics(out, target.astype(np.int64), scorer.labels or task.labels)
    else:
        metrics = regression_metrics(out[:, 0], target, resamples=resamples, seed=seed)
    return {"model": model, "head": scorer.head, "task": task.name, **metrics,
            "errors": sum(errors.values()), "error_reasons": dict(errors)}
