"""Labelled samples: the one reader of shards whose ``key.json`` holds a ``label``, for training
(``perceptclip.training.data``) and for evaluation (``perceptclip.training.evaluate``).

    shard -> per sample: label from key.json -> image member -> decode -> transform -> LabelledSample

No sample is dropped: one that cannot be used comes out with a reason and a message instead of an
image and a target, and a shard that cannot be read (or stops being readable) ends with one such item
of key "". The caller decides what an unusable sample becomes (an error row, a count by reason).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from perceptclip.core.tasks import Task
from perceptclip.inputs.shards import ShardError, image_member, iter_shard, parse_json
from perceptclip.model.preprocess import ImageError, decode_image


@dataclass
class LabelledSample:
    key: str
    image: Any = None        # what the transform made of the decoded image; None when unusable
    target: float = 0.0      # the label as a number (a class index for classification); 0.0 when unusable
    reason: str = ""         # "" when usable; else bad_label, no_image, an ImageError's reason or shard_<reason>
    error: str = ""          # why, for a person: "URL KEY: message", or for a shard the ShardError's message

    @property
    def ok(self) -> bool:
        return not self.reason


def target_of(meta: dict, task: Task) -> float:
    """The training target in a sample's JSON ``label``: a finite number for a score; for a classifier a
    class name, or a class index written as a JSON integer (a float such as 2.0 is a score, not a class)."""
    if "label" not in meta:
        raise ValueError("no label in the sample's JSON")
    label = meta["label"]
    if task.is_classification:
        if isinstance(label, str):
            if label not in task.labels:
                raise ValueError(f"unknown class {label!r}; classes: {', '.join(task.labels)}")
            return float(task.labels.index(label))
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(task.labels):
            return float(label)
        raise ValueError(f"label {label!r} is not a class of {task.name}: a class name "
                         f"({', '.join(task.labels)}) or an integer index 0..{len(task.labels) - 1}")
    if isinstance(label, (int, float)) and not isinstance(label, bool) and math.isfinite(label):
        return float(label)
    raise ValueError(f"label {label!r} is not a number")


def describe_reasons(reasons: dict[str, int]) -> str:
    """Counts of unusable samples by reason, for a message: ``bad_label 8, shard_missing 1``."""
    if not reasons:
        return "the shards hold no sample"
    return ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]))


def labelled_samples(url: str, task: Task, transform: Callable, storage_options: dict | None = None,
                     ) -> Iterator[LabelledSample]:
    """Every sample of the shard at ``url``, in shard order, its decoded image passed through
    ``transform`` (preprocessing or a training crop; an ``ImageError`` it raises makes the sample
    unusable)."""
    try:
        for sample in iter_shard(url, storage_options):
            yield _labelled(url, sample, task, transform)
    except ShardError as e:
        yield LabelledSample(key="", reason=f"shard_{e.reason}", error=str(e))


def _labelled(url: str, sample: dict, task: Task, transform: Callable) -> LabelledSample:
    key = sample["__key__"]
    try:
        meta = parse_json(sample.get("json", b"{}"))
        target = target_of(meta if isinstance(meta, dict) else {}, task)
    except ValueError as e:
        return LabelledSample(key, reason="bad_label", error=f"{url} {key}: {e}")
    ext = image_member(sample)
    if ext is None:
        return LabelledSample(key, reason="no_image", error=f"{url} {key}: no image in the sample")
    try:
        image = transform(decode_image(sample[ext]))
    except ImageError as e:
        return LabelledSample(key, reason=e.reason, error=f"{url} {key}: {e}")
    return LabelledSample(key, image=image, target=target)
