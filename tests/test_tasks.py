"""A task is data: the built-in tasks are definitions like a user's own, a bad definition fails at start
naming its field, and a model's artifact carries its whole task."""

import json

import pytest

from perceptclip.core.tasks import TASKS, Task, resolve_task
from perceptclip.model.artifact import ArtifactError, read_meta
from perceptclip.model.debug import make_tiny_artifact
from perceptclip.training.config import TrainConfig
from support.artifacts import as_version_1

WARMTH = {"name": "warmth", "kind": "regression", "description": "how warm the picture feels, 1 to 5"}
SAFETY = {"name": "brand_safety", "kind": "classification", "labels": ["safe", "borderline", "unsafe"],
          "higher_is_better": False}


def test_the_built_in_tasks_are_definitions_with_the_values_they_had():
    assert {name: (t.kind, t.head_size, t.loss, t.metrics, t.preprocess, t.learning_rate)
            for name, t in TASKS.items()} == {
        "iqa": ("regression", 1, "plcc", ("srcc", "plcc", "mse"), "multi_crop", 5e-5),
        "memorability": ("regression", 1, "mse", ("srcc", "plcc", "mse"), "resize_center_crop", 5e-5),
        "emotion": ("classification", 8, "cross_entropy", ("accuracy", "macro_f1"), "resize_center_crop", 1e-4),
    }
    assert resolve_task(TASKS["iqa"].definition()) == TASKS["iqa"]      # a definition round-trips


def test_a_definition_takes_defaults_by_kind():
    warmth, safety = resolve_task(WARMTH), resolve_task(SAFETY)
    assert (warmth.loss, warmth.head_size, warmth.metrics, warmth.labels) == ("mse", 1, ("srcc", "plcc", "mse"), None)
    assert (safety.loss, safety.head_size, safety.labels) == ("cross_entropy", 3, ("safe", "borderline", "unsafe"))


@pytest.mark.parametrize("change, message", [
    ({"kind": "ordinal"}, "task.kind: must be one of regression, classification, got 'ordinal'"),
    ({"kind": "classification", "labels": ["hot"]}, "task.labels: a classification needs two or more classes"),
    ({"kind": "classification", "labels": ["hot", "cold", "hot"]}, "task.labels: class 'hot' is named twice"),
    ({"labels": ["hot", "cold"]}, "task.labels: only a classification has classes"),
    ({"name": "2warm"}, "task.name: must be a column name"),
    ({"name": "warm th"}, "task.name: must be a column name"),
    ({"name": "status"}, "task.name: 'status' is a column of every score table"),
    ({"loss": "cross_entropy"}, "task.loss: must be one of mse, plcc for a regression, got 'cross_entropy'"),
    ({"preprocess": "squash"}, "task.preprocess: must be one of resize_center_crop, multi_crop"),
    ({"colour": "red"}, "task.colour: unknown option"),
])
def test_a_bad_definition_fails_at_start_naming_its_field(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig.from_mapping({"task": {**WARMTH, **change}})


def test_a_training_config_names_a_built_in_task_or_defines_one():
    assert TrainConfig.from_mapping({"task": "emotion"}).task_def is TASKS["emotion"]
    assert TrainConfig.from_mapping({"task": SAFETY}).task_def == Task.from_mapping(SAFETY)
    with pytest.raises(ValueError, match="task: unknown task 'quality'; built-in tasks: emotion, iqa, memorability"):
        TrainConfig.from_mapping({"task": "quality"})


def test_the_artifact_carries_its_whole_task(tmp_path):
    safety = resolve_task(SAFETY)
    dest = make_tiny_artifact(str(tmp_path / "safety"), task=safety)
    written = json.loads((tmp_path / "safety" / "config.json").read_text())
    assert written["task"] == safety.definition() and "head_tasks" not in written
    meta = read_meta(dest)
    assert meta.task == safety and meta.labels == ["safe", "borderline", "unsafe"]
    assert meta.task.higher_is_better is False and meta.model.head.size == 3


def test_an_artifact_written_before_tasks_were_data_still_loads(tmp_path):
    dest = make_tiny_artifact(str(tmp_path / "old"), task="emotion")
    config = tmp_path / "old" / "config.json"
    written = as_version_1(json.loads(config.read_text()))
    del written["task_definition"]                  # as every artifact written before tasks were data
    config.write_text(json.dumps(written))
    assert read_meta(dest).task is TASKS["emotion"]


@pytest.mark.parametrize("change, message", [
    ({"labels": ["a", "b"]}, r"labels: \['a', 'b'\] but the task's classes are \['amusement'"),
    ({"task": "iqa"}, "task: 'iqa' but its definition is 'emotion'"),
])
def test_a_version_1_config_disagreeing_with_its_task_is_refused(change, message, tmp_path):
    """Version 1 wrote the task's name, classes and direction beside its definition: they must agree."""
    dest = make_tiny_artifact(str(tmp_path / "old"), task="emotion")
    config = tmp_path / "old" / "config.json"
    config.write_text(json.dumps({**as_version_1(json.loads(config.read_text())), **change}))
    with pytest.raises(ArtifactError, match=message):
        read_meta(dest)


def test_a_config_with_a_task_and_head_tasks_is_refused(tmp_path):
    """Format version 2 writes each task once: ``task`` or, for a model of several tasks, ``head_tasks``."""
    dest = make_tiny_artifact(str(tmp_path / "m"), task="emotion", heads=("a", "b"))
    config = tmp_path / "m" / "config.json"
    written = json.loads(config.read_text())
    config.write_text(json.dumps({**written, "head_tasks": {"a": written["task"], "b": written["task"]}}))
    with pytest.raises(ArtifactError, match="task: written once, under head_tasks"):
        read_meta(dest)
