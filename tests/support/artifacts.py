"""Model artifacts as earlier versions of the package wrote them, for the tests that check they still load."""

from __future__ import annotations


def as_version_1(config: dict) -> dict:
    """A ``config.json`` of today (format version 2) as version 1 wrote it: the task by name beside its
    definition, labels and direction; ``head_tasks`` naming every head, the default one included; the head
    sizes under ``outputs`` and ``head_outputs``."""
    head_tasks = config.get("head_tasks")
    heads = config["model"]["heads"]
    task = head_tasks[heads[0]] if head_tasks else config["task"]
    model = dict(config["model"])
    head = dict(model["head"])
    head["outputs"] = head.pop("size")
    model["head"] = head
    model["head_outputs"] = model.pop("head_sizes")
    old = {"format": config["format"], "format_version": 1, "task": task["name"], "task_definition": task,
           "labels": task.get("labels"), "higher_is_better": task["higher_is_better"], "model": model,
           "preprocess": config["preprocess"], "provenance": config["provenance"], "weights": config["weights"]}
    if head_tasks:
        old["head_tasks"] = head_tasks
    return old
