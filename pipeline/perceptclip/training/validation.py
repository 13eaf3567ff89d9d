"""Validation during training, on every worker: each worker scores its part of each validation
set, the (output, target) pairs of all workers are gathered, and every worker computes the same
metrics over the whole set (``validate``). Then, from the epoch's record, whether the run can go on
(``run_problems``).

A set whose samples cannot give its metric (none usable, or for a score fewer than two labels, or all
equal) stops the run: no epoch could be judged, so no model could be chosen. Predictions all equal
are the model's doing, not the data's: that epoch has no score (null), can never be the best, and the
run goes on.
"""

from __future__ import annotations

from collections import Counter
from functools import partial

import numpy as np
import torch

from perceptclip.core.metrics import classification_metrics, json_ready, regression_metrics, undefined
from perceptclip.core.tasks import Task
from perceptclip.model.preprocess import normalize
from perceptclip.training.data import batches_of, shard_rows
from perceptclip.training.labels import describe_reasons


def primary_metric(task: Task) -> str:
    return "accuracy" if task.is_classification else "srcc"


def run_metric(tasks: dict[str, Task]) -> str:
    """What an epoch's score is (``epoch_score``): the sets' main metric, or the mean of several kinds'."""
    metrics = sorted({primary_metric(t) for t in tasks.values()})
    return metrics[0] if len(metrics) == 1 else f"mean of {' and '.join(metrics)}"


@torch.no_grad()
def validate(model, parts: dict[str, list[str]], tasks: dict[str, Task], pre, device: torch.device, autocast,
             batch_size: int, storage_options: dict, read) -> dict[str, dict]:
    """Metrics of each validation set over all its samples (``parts``: this worker's shards of each), by
    the task of the set's head (``tasks``). ``read``: the worker session's reader of rows."""
    model.eval()
    results = {}
    for name, urls in parts.items():
        task = tasks[name]
        outputs, targets, reasons = [], [], Counter()
        rows = partial(shard_rows, task=task, pre=pre, aug=None, storage_options=storage_options)
        for batch in batches_of(read([{"url": u} for u in urls], rows), batch_size):
            valid = batch["error"] == ""
            reasons.update(batch["reason"][~valid].tolist())
            if not valid.any():
                continue
            pixels = torch.from_numpy(batch["pixels"][valid]).to(device)        # (B, n, 3, S, S)
            b, n = pixels.shape[:2]
            x = normalize(pixels.flatten(0, 1), pre.mean, pre.std)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                out = model(x, head=name if name in model.heads else None).float()
            outputs.append(out.view(b, n, -1).mean(1).cpu().numpy())           # crops averaged, as Scorer does
            targets.append(batch["target"][valid])
        gathered = gather((outputs, targets, reasons))
        results[name] = set_metrics(task, [o for part in gathered for o in part[0]],
                                    [t for part in gathered for t in part[1]], sum((p[2] for p in gathered), Counter()))
    model.train()
    return results


def set_metrics(task: Task, outputs: list[np.ndarray], targets: list[np.ndarray], reasons: Counter) -> dict:
    """One set's metrics, JSON-ready: ``unusable`` says why its labels give no metric, ``undefined`` why
    this epoch's predictions do not; either leaves the main metric null."""
    out = np.concatenate(outputs) if outputs else np.zeros((0, task.head_size), dtype=np.float32)
    target = np.concatenate(targets) if targets else np.zeros(0)
    why = undefined(out if task.is_classification else out[:, 0], target, task.is_classification)
    if why and why[0] == "labels":
        metrics = {primary_metric(task): None, "n": int(target.size), "unusable": why[1]}
    elif task.is_classification:
        metrics = classification_metrics(out, target.astype(np.int64), task.labels)
    else:
        metrics = regression_metrics(out[:, 0], target)
    if why and why[0] == "predictions":
        metrics["undefined"] = why[1]
    return json_ready({**metrics, "errors": sum(reasons.values()), "error_reasons": dict(reasons)})


def epoch_score(val: dict[str, dict], tasks: Task | dict[str, Task]) -> float | None:
    """The epoch's score: the mean of the sets' main metrics (each by its head's task's kind: srcc for a
    regression, accuracy for classes; ``tasks``: each set's, or one for all); None when one has none."""
    scores = [v[primary_metric(tasks[name] if isinstance(tasks, dict) else tasks)] for name, v in val.items()]
    return float(np.mean(scores)) if scores and None not in scores else None


def run_problems(record: dict, provenance: dict) -> str | None:
    """Why the run cannot go on after the epoch of ``record``: a training set with no usable sample, or
    a validation set whose labels give no metric; None when it can. ``provenance`` holds the sets'
    specs (``{"train": {name: spec}, "val": {...}}``), to name them as the command was given them."""
    problems = [f"training set {name!r} ({provenance['train'][name]}): no usable sample "
                f"({describe_reasons(t['error_reasons'])})" for name, t in record["train_sets"].items() if not t["n"]]
    problems += [f"validation set {name!r} ({provenance['val'][name]}): {m['unusable']} (unusable samples: "
                 f"{describe_reasons(m['error_reasons']) if m['errors'] else 'none'})"
                 for name, m in record["val"].items() if m.get("unusable")]
    return "; ".join(problems) or None


def gather(obj) -> list:
    """``obj`` of every worker, in rank order (``[obj]`` outside a worker group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
