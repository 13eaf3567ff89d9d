"""The perceptual tasks: what a model predicts, how it is trained and judged, and which way is better.

One recipe serves every task (PAPER.md), so a task is data, not code: a name (its score column), a
kind (``regression`` or ``classification``), class names for a classification (in output order), a
loss (by kind: ``mse`` or ``plcc`` for a regression, ``cross_entropy`` for classes), the preprocessing
(``resize_center_crop``, or ``multi_crop`` with its crop count), the score direction and a one-line
description. The metrics follow from the kind. The paper's three tasks are built-in definitions of
exactly that form:

    task: iqa                                  # a built-in task by name
    task:                                      # or a task of your own
      name: warmth
      kind: regression
      description: how warm the picture feels, 1 to 5

A model's artifact carries its whole task definition (``config.json``), so every consumer reads the
task from the model alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from perceptclip.core.config import Config, ConfigError, require, setting
from perceptclip.core.loading import read_yaml
from perceptclip.core.schema import RESERVED_COLUMNS

EMOSET_LABELS = (
    "amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness",
)
KINDS = ("regression", "classification")
LOSSES = {"regression": ("mse", "plcc"), "classification": ("cross_entropy",)}
METRICS = {"regression": ("srcc", "plcc", "mse"), "classification": ("accuracy", "macro_f1")}
PREPROCESSING = ("resize_center_crop", "multi_crop")
COLUMN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Task(Config):
    name: str                                 # the score column; a classification adds NAME_<class> columns
    kind: str = setting(choices=KINDS)
    labels: tuple[str, ...] | None = None     # class names, in output order; None for a regression
    loss: str | None = None                   # None: mse for a regression, cross_entropy for classes
    preprocess: str = setting("resize_center_crop", choices=PREPROCESSING)
    crops: int = setting(5, minimum=1)        # multi_crop: crops averaged per image
    higher_is_better: bool = True             # score direction, recorded in every output's metadata
    learning_rate: float = setting(5e-5, above=0)   # the default of a training run of this task
    description: str = ""

    def __post_init__(self):
        if self.loss is None and self.kind in LOSSES:
            object.__setattr__(self, "loss", LOSSES[self.kind][0])
        super().__post_init__()

    def check(self):
        require(bool(COLUMN_NAME.match(self.name)), "name",
                f"must be a column name (a letter or _, then letters, digits or _), got {self.name!r}")
        require(self.name not in RESERVED_COLUMNS, "name",
                f"{self.name!r} is a column of every score table; choose another name")
        if self.kind == "classification":
            labels = list(self.labels or ())
            require(len(labels) >= 2, "labels", f"a classification needs two or more classes, got {labels}")
            twice = sorted({c for c in labels if labels.count(c) > 1})
            require(not twice, "labels", f"class {twice[0] if twice else ''!r} is named twice")
            require(all(c.strip() for c in labels), "labels", "a class name is empty")
        else:
            require(self.labels is None, "labels", "only a classification has classes")
        require(self.loss in LOSSES[self.kind], "loss",
                f"must be one of {', '.join(LOSSES[self.kind])} for a {self.kind}, got {self.loss!r}")

    @property
    def head_size(self) -> int:
        """Size of the last layer of a head of this task: 1 for a regression, else one per class."""
        return len(self.labels) if self.labels else 1

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS[self.kind]

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"

    def columns(self, name: str | None = None) -> list[str]:
        """The score table's columns of this task's outputs, under ``name`` (a rename) or its own: the
        score, then for a classification one probability column per class."""
        name = name or self.name
        return [name] + [f"{name}_{label}" for label in self.labels or ()]

    def definition(self) -> dict:
        """The whole definition, as config files and artifacts hold it."""
        return self.to_mapping()


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        # Resizing destroys the artefacts being judged: average crops of the unresized image.
        Task(name="iqa", kind="regression", loss="plcc", preprocess="multi_crop", crops=5,
             description="no-reference image quality (higher is better quality)"),
        Task(name="memorability", kind="regression", loss="mse",
             description="image memorability in [0, 1] (higher is more memorable)"),
        Task(name="emotion", kind="classification", labels=EMOSET_LABELS, learning_rate=1e-4,
             description="evoked emotion, 8 EmoSet classes"),
    )
}


def get_task(name: str) -> Task:
    """A built-in task by name."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}, "
                         f"or define one (name, kind, labels, ...)") from None


def load_task(text: str) -> Task:
    """``--task``: a built-in name, or a YAML file holding a definition (or a training config's ``task:``)."""
    import os

    if text in TASKS or not os.path.isfile(text):
        return resolve_task(text, "--task")
    data = read_yaml(text)
    if isinstance(data, dict) and "task" in data:
        return resolve_task(data["task"], f"{text}: task")
    return resolve_task(data, text)


def resolve_task(value: Any, where: str = "task") -> Task:
    """A task from a config: a built-in name, a mapping defining one, or a ``Task``."""
    if isinstance(value, Task):
        return value
    if isinstance(value, str):
        try:
            return get_task(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    if isinstance(value, dict):
        return Task.from_mapping(value, f"{where}.")
    raise ConfigError(f"{where}: a built-in task name or a mapping (name, kind, labels, ...), got {value!r}")
