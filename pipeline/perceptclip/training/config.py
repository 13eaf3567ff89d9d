"""The config of a training run (``perceptclip train --config``): the task or tasks, the architecture
to fine-tune or the model to start from, the optimiser, the workers (``scaling``); and the ``--train`` /
``--val`` arguments (``parse_datasets``). Checked when loaded: a mistake names its field."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from perceptclip.core.config import Config, ConfigError, require, setting
from perceptclip.core.loading import load_config
from perceptclip.core.tasks import Task, resolve_task
from perceptclip.model.config import BackboneConfig, HeadConfig, LoraConfig, ModelConfig
from perceptclip.training.augment import AugmentConfig


@dataclass
class ArchitectureConfig(Config):
    """The architecture to fine-tune when not starting from an artifact (``init``)."""

    backbone: str | dict = "ViT-L-14-quickgelu"   # an open_clip name, debug-vit, or BackboneConfig fields
    pretrained: str | None = "openai"              # open_clip pretrained tag; null: random init (tests, smoke)
    lora: LoraConfig = field(default_factory=LoraConfig)
    head_hidden: list[int] = field(default_factory=lambda: [512, 256])
    head_dropout: float = setting(0.5, minimum=0, below=1)

    def check(self):
        # LoraConfig admits r = 0 (a model whose LoRA is merged); a model to fine-tune needs LoRA
        require(self.lora.r >= 1, "lora.r", f"must be an integer >= 1, got {self.lora.r!r}")

    def model_config(self, task: Task, heads: tuple[str, ...]) -> ModelConfig:
        if isinstance(self.backbone, str):
            backbone = BackboneConfig.named(self.backbone, pretrained=self.pretrained)
        else:
            backbone = BackboneConfig.from_mapping({**self.backbone, "pretrained": self.pretrained}, "model.backbone.")
        head = HeadConfig(size=task.head_size, hidden=tuple(self.head_hidden), dropout=self.head_dropout)
        return ModelConfig(backbone=backbone, lora=self.lora, head=head, heads=heads)


@dataclass
class WorkersConfig(Config):
    """The training workers (``scaling:`` in a training config), given to Ray Train as its ScalingConfig.
    ``in_process``: no Ray at all; one worker, this process, reading its shards itself (a small run, a
    notebook, a debugger); the same epochs as one Ray Train worker, without its restarts."""

    num_workers: int = setting(1, minimum=1)
    use_gpu: bool = False
    cpus_per_worker: float = setting(1.0, above=0)
    in_process: bool = False

    def check(self):
        require(not self.in_process or self.num_workers == 1, "in_process",
                f"trains in this process, one worker: set scaling.num_workers: 1 (got {self.num_workers})")


@dataclass
class TrainConfig(Config):
    # a built-in task by name, or a mapping defining one (core.tasks): a ``Task`` once the config is built
    task: Task | str | dict | None = None
    # several tasks on one LoRA: {training set (head): task}; a set not named here has ``task``
    tasks: dict[str, Task | str | dict] = field(default_factory=dict)
    model: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    init: str | None = None            # a model to start from: built-in name or artifact path/URI
    epochs: int = setting(10, minimum=1)
    batch_size: int = setting(32, minimum=1)                # per optimiser step, over all workers
    learning_rate: float | None = setting(None, above=0)    # None: the task's (5e-5 iqa and memorability, 1e-4 emotion)
    weight_decay: float = setting(0.01, minimum=0)          # torch AdamW's default
    precision: str = setting("auto", choices=("auto", "bf16", "fp32"))   # auto: bf16 autocast on GPU, fp32 on CPU
    seed: int = 0                      # the initial heads and LoRA, the shards' order, crops, dropout
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval_crops: int = setting(5, minimum=1)   # multi_crop tasks: crops per image at validation and in the export
    max_side: int = 2048               # multi_crop tasks: longer images are scaled down to this first
    scaling: WorkersConfig = field(default_factory=WorkersConfig)
    max_failures: int = setting(3, minimum=-1)      # worker-group restarts from the latest checkpoint; -1: no limit
    keep_checkpoints: int = setting(2, minimum=1)

    def check(self):
        require(self.task is not None or self.tasks, "task", "required (or tasks: a task per training set)")
        # typed once, here: an unknown name fails naming the built-in tasks, a bad definition its field
        if self.task is not None:
            object.__setattr__(self, "task", resolve_task(self.task))
        object.__setattr__(self, "tasks", {name: resolve_task(t, f"tasks.{name}") for name, t in self.tasks.items()})
        # one backbone pass serves every head: their images must be cropped alike
        recipes = {(t.preprocess, t.crops if t.preprocess == "multi_crop" else None)
                   for t in [*self.tasks.values(), *([self.task] if self.task is not None else [])]}
        require(len(recipes) <= 1, "tasks", f"the tasks of one model share one preprocessing, got {sorted(recipes)}")
        require(self.batch_size % self.scaling.num_workers == 0, "batch_size",
                f"must be a multiple of scaling.num_workers ({self.scaling.num_workers}), got {self.batch_size}")

    @property
    def lr(self) -> float:
        return self.learning_rate or self.task_def.learning_rate

    @property
    def task_def(self) -> Task:
        """``task``, or without one the first of ``tasks``."""
        return self.task if self.task is not None else next(iter(self.tasks.values()))

    def head_tasks(self, heads: tuple[str, ...]) -> dict[str, Task]:
        """Each training set's (head's) task: as ``tasks`` names it, else ``task``."""
        missing = [h for h in heads if h not in self.tasks and self.task is None]
        if missing:
            raise ConfigError(f"tasks: training set {missing[0]!r} has no task; name it under tasks: or set task:")
        unknown = sorted(set(self.tasks) - set(heads))
        if unknown:
            raise ConfigError(f"tasks.{unknown[0]}: names no training set ({', '.join(heads)}); "
                              f"give its shards with --train {unknown[0]}=SHARDS")
        return {h: self.tasks.get(h, self.task_def) for h in heads}

    @classmethod
    def load(cls, path: str, in_process: bool = False, **overrides) -> TrainConfig:
        """The config in YAML file ``path`` with ``overrides`` (those not None: the command line) on top;
        ``in_process``: with ``scaling.in_process`` set."""
        cfg = load_config(cls, path, overrides)
        if in_process:
            cfg = cls.from_mapping({**cfg.to_mapping(), "scaling": {**cfg.scaling.to_mapping(), "in_process": True}})
        return cfg


def parse_datasets(specs: tuple[str, ...] | list[str], what: str) -> dict[str, str]:
    """``[NAME=]SHARDS`` arguments -> {name: shards}; a single unnamed set is called ``default``."""
    out: dict[str, str] = {}
    for spec in specs:
        m = re.match(r"^([A-Za-z][A-Za-z0-9_-]*)=(.+)$", spec)
        name, shards = (m.group(1), m.group(2)) if m else ("default", spec)
        if name in out:
            raise ValueError(f"{what}: two sets are named {name!r}; name them NAME=SHARDS")
        out[name] = shards
    if not out:
        raise ValueError(f"{what}: at least one set of shards is needed")
    return out
