"""The perceptual tasks: what a model predicts, how it is trained and judged, and which way is better.

One recipe serves every task (PAPER.md); a task only fixes the head's output size, the loss, the
metrics, the label names and the default preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

EMOSET_LABELS = (
    "amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness",
)


@dataclass(frozen=True)
class Task:
    name: str
    outputs: int                      # size of the head's last layer
    loss: str                         # "mse" | "plcc" | "cross_entropy"
    metrics: tuple[str, ...]
    labels: tuple[str, ...] | None    # class names, in output order; None for a regression score
    higher_is_better: bool            # score direction, recorded in every output's metadata
    preprocess: str                   # "resize_center_crop" | "multi_crop"
    learning_rate: float
    description: str

    @property
    def is_classification(self) -> bool:
        return self.labels is not None


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="iqa",
            outputs=1,
            loss="plcc",
            metrics=("srcc", "plcc", "mse"),
            labels=None,
            higher_is_better=True,
            # Resizing destroys the artefacts being judged: average crops of the unresized image.
            preprocess="multi_crop",
            learning_rate=5e-5,
            description="no-reference image quality (higher is better quality)",
        ),
        Task(
            name="memorability",
            outputs=1,
            loss="mse",
            metrics=("srcc", "plcc", "mse"),
            labels=None,
            higher_is_better=True,
            preprocess="resize_center_crop",
            learning_rate=5e-5,
            description="image memorability in [0, 1] (higher is more memorable)",
        ),
        Task(
            name="emotion",
            outputs=len(EMOSET_LABELS),
            loss="cross_entropy",
            metrics=("accuracy", "macro_f1"),
            labels=EMOSET_LABELS,
            higher_is_better=True,
            preprocess="resize_center_crop",
            learning_rate=1e-4,
            description="evoked emotion, 8 EmoSet classes",
        ),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
