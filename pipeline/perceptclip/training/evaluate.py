"""Evaluate a model on labelled shards with exactly the scoring path (``Scorer``): what is measured
here is what ``perceptclip score`` would output.

    shards (``key.<image>`` + ``key.json`` with ``label``)
      -> perceptclip.training.labels: label, decode, Scorer.preprocess -> Scorer.score
      -> metrics over the whole set (``perceptclip.core.metrics``): srcc, plcc, mse with 95% bootstrap
         intervals for regression; accuracy, macro_f1 and the confusion matrix for classification

A sample without a usable image or label is counted under ``errors`` (by reason) and left out of the
metrics; a shard that cannot be read is counted as one error of its reason (``shard_missing``, ...).
An evaluation whose main metric cannot be computed (no usable sample, labels all equal, predictions
all equal) fails, naming the shards and the counts by reason: it never reports NaN. A metric that
cannot be computed beside it (a bootstrap interval of two samples) is null in the JSON.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from perceptclip.core.metrics import classification_metrics, json_ready, regression_metrics, undefined
from perceptclip.core.storage import filesystem
from perceptclip.output.destination import check_apart
from perceptclip.training.labels import describe_reasons, labelled_samples


def evaluate(model: str, shards: str | list[str], head: str | None = None, resamples: int = 1000, seed: int = 0,
             batch_size: int = 32, device: str | None = None, storage_options: dict | None = None,
             output: str | None = None) -> dict:
    """Metrics of ``model`` (built-in name, artifact path or URI) on the labelled ``shards``; with
    ``output``, also written there as JSON (a file or URL apart from the shards and the model)."""
    from perceptclip.inputs.shards import expand_shards
    from perceptclip.model.reference import parse_model_ref, resolve_model
    from perceptclip.model.scorer import Scorer

    urls = expand_shards(shards, storage_options)
    if output:
        _check_output(output, urls, resolve_model(parse_model_ref(model)[1]))
    scorer = Scorer.load(f"{model}#{head}" if head else model, device=device)
    if len(scorer.scored_heads) > 1:    # labelled shards carry one task's labels
        raise ValueError(f"{model} has heads of several tasks ({', '.join(f'{h}: {t.name}' for h, _, t in scorer.scored_heads)}"
                         f"); evaluate one head at a time, MODEL#HEAD, on shards labelled for its task")
    task = scorer.scored_heads[0][2]            # the head's task: its kind says the metrics
    out, target, errors = _score(scorer, task, urls, batch_size, storage_options)
    what = f"{', '.join(shards) if isinstance(shards, list) else shards} ({len(urls)} shard(s))"
    if not target.size:
        raise ValueError(f"no usable sample in {what}: {describe_reasons(errors)}")
    primary = "accuracy" if task.is_classification else "srcc"
    why = undefined(out if task.is_classification else out[:, 0], target, task.is_classification)
    if why:
        raise ValueError(f"{primary} cannot be computed: {why[1]} ({what}; {target.size} usable, "
                         f"unusable: {describe_reasons(errors) if errors else 'none'})")
    if task.is_classification:
        metrics = classification_metrics(out, target.astype(np.int64), task.labels)
    else:
        metrics = regression_metrics(out[:, 0], target, resamples=resamples, seed=seed)
    result = json_ready({"model": model, "head": scorer.head, "task": task.name, "kind": task.kind, **metrics,
                         "errors": sum(errors.values()), "error_reasons": dict(errors)})
    if output:
        _write_json(output, result, storage_options)
    return result


def _score(scorer, task, urls: list[str], batch_size: int, storage_options: dict | None):
    """The model's outputs (N, outputs) and the targets (N,) of every usable sample of ``urls``, and
    the unusable ones counted by reason."""
    outputs, targets, pending, pending_targets = [], [], [], []
    errors: Counter = Counter()

    def flush():
        if pending:
            outputs.append(scorer.score(pending))
            targets.extend(pending_targets)
            pending.clear()
            pending_targets.clear()

    for url in urls:
        for sample in labelled_samples(url, task, scorer.preprocess, storage_options):
            if not sample.ok:
                errors[sample.reason] += 1
                continue
            pending.append(sample.image)
            pending_targets.append(sample.target)
            if len(pending) == batch_size:
                flush()
    flush()
    out = np.concatenate(outputs) if outputs else np.zeros((0, task.head_size), dtype=np.float32)
    return out, np.asarray(targets, dtype=np.float64), errors


def _check_output(output: str, urls: list[str], model: str) -> None:
    """The metrics file must overwrite neither a shard nor a file of the model (a file output: no record)."""
    check_apart("--output", output, {"the labelled shards": urls, "the model": [model]})


def _write_json(url: str, obj: dict, storage_options: dict | None) -> None:
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "w") as f:
        f.write(json.dumps(obj, allow_nan=False) + "\n")
