"""Fine-tuning PerceptCLIP on Ray Train: the run's config (``TrainConfig``) and the driver (``train``).

    --train [NAME=]SHARDS ...   each epoch, every worker reads its share of each set's shards
      -> rows: read a shard, decode, random crop + flip            Ray Data CPU tasks (perceptclip.training.data)
      -> worker: AdamW on LoRA + heads, one head per training set  TorchTrainer, DDP over gloo or nccl
      -> validate: every worker scores its part of each val set, the predictions are gathered,
         metrics computed over the whole set on every worker     (perceptclip.training.worker)
      -> rank 0: checkpoint (LoRA + heads + optimizer + best so far) -> DEST/checkpoints/
                 history -> DEST/metrics.json; at the end the best epoch -> DEST/model/ (an artifact)

Rerunning the same command finds Ray Train's checkpoint state under DEST/checkpoints and resumes
after the latest finished epoch; a failed worker group restarts from it (``max_failures``). An epoch
depends only on (seed, epoch), so a resumed run exports the model the uninterrupted run would.

A resumed run must be the same run: DEST/run.json records what it was started with (the config and
every set's shards), and a rerun with another config or other data is refused, naming what changed,
unless ``restart``, which discards the earlier run (checkpoints, metrics, model) first. Settings of how
a run is carried out, not of what it trains (``OPERATIONAL``), may change between reruns. DEST must
hold none of the run's inputs; both are checked before any work. A run none of whose epochs could be
scored, or stopped by a set it cannot use (``perceptclip.training.validation``), fails and exports nothing.

The driver resolves the config once into a ``WorkerPlan`` (shard lists expanded, the architecture and
the preprocessing fixed), starts Ray unless it is running, and runs the trainer. The layout of DEST is
known here only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from perceptclip.core.config import Config, ConfigError, require, setting
from perceptclip.core.loading import load_config
from perceptclip.core.tasks import Task, resolve_task
from perceptclip.model.artifact import ArtifactMeta, read_meta
from perceptclip.model.clip_lora import BackboneConfig, HeadConfig, LoraConfig, ModelConfig
from perceptclip.model.reference import resolve_model
from perceptclip.output.destination import Destination, flatten
from perceptclip.training.augment import AugmentConfig
from perceptclip.training.report import EpochReport
from perceptclip.training.validation import run_metric
from perceptclip.training.worker import WorkerPlan, printable, train_loop

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.json"
MODEL_DIR = "model"
RUN_RECORD = "run.json"
# how a run is carried out, not what it trains: a rerun may change these and still resume
OPERATIONAL = ("max_failures", "keep_checkpoints", "scaling.cpus_per_worker")


# ---------------------------------------------------------------------------------------------- config

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
        head = HeadConfig(outputs=task.outputs, hidden=tuple(self.head_hidden), dropout=self.head_dropout)
        return ModelConfig(backbone=backbone, lora=self.lora, head=head, heads=heads)


@dataclass
class WorkersConfig(Config):
    """The training workers (``scaling:`` in a training config), given to Ray Train as its ScalingConfig."""

    num_workers: int = setting(1, minimum=1)
    use_gpu: bool = False
    cpus_per_worker: float = setting(1.0, above=0)


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
    def load(cls, path: str, **overrides) -> TrainConfig:
        """The config in YAML file ``path`` with ``overrides`` (those not None: the command line) on top."""
        return load_config(cls, path, overrides)


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


# ---------------------------------------------------------------------------------------------- driver

def train(cfg: TrainConfig, train_sets: dict[str, str], val_sets: dict[str, str], dest: str,
          address: str | None = None, restart: bool = False, progress: Callable[[str], None] = log.info) -> dict:
    """Fine-tune on ``train_sets`` ({head name: shard spec}), validate on ``val_sets`` every epoch,
    checkpoint to ``dest`` and export the best epoch to ``dest/model``. Returns the run's summary.
    ``address``: the Ray cluster to join when Ray is not running yet; None: RAY_ADDRESS if set, else a
    local cluster, started here and shut down at the end. ``restart``: discard an earlier run in ``dest``
    instead of resuming it. ``progress`` is told each epoch (a ``Console``: see ``perceptclip.core.console``)."""
    import ray

    from perceptclip.core.console import Console, ray_output
    from perceptclip.core.storage import protocol, storage_options

    unknown = sorted(set(val_sets) - set(train_sets))
    if unknown:
        raise ValueError(f"validation set {unknown[0]!r} names no training set ({', '.join(train_sets)})")
    if protocol(dest) == "file":
        dest = os.path.abspath(dest.removeprefix("file://"))
    options = storage_options()
    plan = worker_plan(cfg, train_sets, val_sets, dest, options)
    begin_run(cfg, plan.train, plan.val, dest, restart, options)
    storage_path, storage_fs = _storage(dest, options)
    console = progress if isinstance(progress, Console) else None
    started_ray = not ray.is_initialized()
    with ray_output(console) as output:
        if started_ray:
            ray.init(address=address, log_to_driver=output.shown)
        output.keep_in_session()
        try:
            if started_ray and not (address or os.environ.get("RAY_ADDRESS")):
                check_local_resources(cfg.scaling, ray.cluster_resources())
            with EpochReport(plan, progress, show=console.show if console else None):
                _trainer(cfg, plan, storage_path, storage_fs).fit()
        finally:
            if started_ray:
                ray.shutdown()
    return _summary(plan)


def worker_plan(cfg: TrainConfig, train_sets: dict[str, str], val_sets: dict[str, str], dest: str,
                options: dict) -> WorkerPlan:
    """The run as every worker needs it: the shard lists expanded, the architecture and preprocessing fixed."""
    from perceptclip.core.storage import join
    from perceptclip.inputs.shards import expand_shards

    heads = tuple(train_sets)
    tasks = cfg.head_tasks(heads)
    task = tasks[heads[0]]                  # the default head's: the artifact's task
    train_urls = {name: expand_shards(spec, options) for name, spec in train_sets.items()}
    val_urls = {name: expand_shards(spec, options) for name, spec in val_sets.items()}
    for name, urls in train_urls.items():
        if len(urls) < cfg.scaling.num_workers:
            log.warning("training set %s has %d shard(s) for %d workers: a worker reads whole shards, so some "
                        "read none and only keep step with the others", name, len(urls), cfg.scaling.num_workers)
    export_pre = {"crops": cfg.eval_crops, "max_side": cfg.max_side} if task.preprocess == "multi_crop" else {}
    # heads of several tasks record each one's; heads of one task keep the single-task layout
    head_tasks = tasks if len(set(tasks.values())) > 1 else None
    artifact = ArtifactMeta.for_task(task, init_model_config(cfg, heads), head_tasks=head_tasks, provenance={
        "trained_by": "perceptclip train", "init": cfg.init, "train": train_sets, "val": val_sets}, **export_pre)
    return WorkerPlan(
        artifact=artifact, init=cfg.init, seed=cfg.seed, lr=cfg.lr, weight_decay=cfg.weight_decay,
        precision=cfg.precision, epochs=cfg.epochs, batch_size=cfg.batch_size, augment=cfg.augment,
        train=train_urls, val=val_urls, metrics_url=join(dest, METRICS_FILE), model_url=join(dest, MODEL_DIR),
        storage_options=options)


def init_model_config(cfg: TrainConfig, heads: tuple[str, ...]) -> ModelConfig:
    """The architecture of the run: the init artifact's (with our heads) or the config's; each head's
    output size that of its task."""
    tasks = cfg.head_tasks(heads)
    task = tasks[heads[0]]
    sizes = {h: t.outputs for h, t in tasks.items() if t.outputs != task.outputs}
    if cfg.init:
        meta = read_meta(resolve_model(cfg.init))
        if meta.task != task.name:
            log.warning("starting a %s model from a %s model (%s)", task.name, meta.task, cfg.init)
        return dataclasses.replace(meta.model, heads=heads, head_outputs=sizes,
                                   head=dataclasses.replace(meta.model.head, outputs=task.outputs))
    return dataclasses.replace(cfg.model.model_config(task, heads), head_outputs=sizes)


def check_local_resources(scaling: WorkersConfig, available: dict) -> None:
    """A local cluster started here cannot grow: fail at start, naming the field, instead of waiting
    forever for workers it can never place (a cluster joined with --address may autoscale)."""
    gpus, cpus = available.get("GPU", 0), available.get("CPU", 0)
    if scaling.use_gpu and gpus < scaling.num_workers:
        raise ValueError(f"scaling.use_gpu: {scaling.num_workers} GPU worker(s) asked for, this machine has "
                         f"{int(gpus)} GPU(s); set scaling.use_gpu: false or join a GPU cluster (--address)")
    if scaling.cpus_per_worker * scaling.num_workers >= cpus:
        raise ValueError(f"scaling.cpus_per_worker: {scaling.num_workers} worker(s) x {scaling.cpus_per_worker} "
                         f"CPUs leave none of this machine's {int(cpus)} for reading and decoding the data")


def _storage(dest: str, options: dict):
    """Ray Train's ``storage_path`` and ``storage_filesystem`` for DEST, through our fsspec options."""
    from perceptclip.core.storage import filesystem, protocol

    if protocol(dest) == "file":
        return dest, None
    import pyarrow.fs

    fs, path = filesystem(dest, options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


# ---------------------------------------------------------------------------------------------- the run record

def begin_run(cfg: TrainConfig, train_urls: dict[str, list[str]], val_urls: dict[str, list[str]], dest: str,
              restart: bool = False, options: dict | None = None) -> None:
    """Check DEST before any work and record there what the run is started with. DEST must hold none
    of the inputs; an earlier run in DEST is resumed only if it was started with the same config and
    shards, and discarded first with ``restart``."""
    from perceptclip.core.storage import filesystem

    inputs = {"the training shards": [u for urls in train_urls.values() for u in urls],
              "the validation shards": [u for urls in val_urls.values() for u in urls]}
    if cfg.init:
        inputs["the init model"] = [resolve_model(cfg.init)]
    # apart from the inputs and no other command's output; the run's own identity is its record, run.json
    output = Destination.open(dest, "train", options or {}, inputs=inputs, compare_inputs=False,
                              made_from=[{"url": u, "kind": kind} for kind, urls in inputs.items() for u in urls])
    fs, root = filesystem(dest, options)
    record = {"config": cfg.to_mapping(), "train": train_urls, "val": val_urls}
    path = posixpath.join(root, RUN_RECORD)
    earlier = json.loads(fs.cat_file(path)) if fs.exists(path) else None
    found = [name for name in (CHECKPOINTS, METRICS_FILE, MODEL_DIR) if fs.exists(posixpath.join(root, name))]
    if restart:
        for name in found:
            fs.rm(posixpath.join(root, name), recursive=True)
    elif found and earlier is None:
        raise ValueError(f"--output: {dest} holds an earlier run ({', '.join(found)}) with no record of its "
                         f"settings; pass --restart to discard it, or choose another --output")
    elif found:
        changes = _changes(earlier, record)
        if changes:
            raise ValueError(f"--output: {dest} holds a run started with other settings ({'; '.join(changes)}); "
                             f"rerun it as it was started to resume it, or pass --restart to discard it "
                             f"(checkpoints, metrics, model) and start again")
        return                      # the same run, resumed: its record stays as it was started
    # nothing to resume (a record alone is a run that failed before its first epoch): record this one
    output.begin(remove=lambda: [])
    fs.pipe_file(path, json.dumps(record, indent=1, allow_nan=False).encode())


def _changes(earlier: dict, now: dict) -> list[str]:
    """What differs between two run records, for a person: ``epochs: 15 -> 2``, ``train.default: other shards``."""
    old, new = flatten(earlier), flatten(now)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        name = key.removeprefix("config.")
        if name in OPERATIONAL or old.get(key) == new.get(key):
            continue
        if key.startswith(("train.", "val.")):
            a, b = (f"{len(v)} shards" if v is not None else "no such set" for v in (old.get(key), new.get(key)))
            changes.append(f"{key}: {a} -> {b}" if a != b else f"{key}: other shards")
        else:
            a, b = (json.dumps(d[key])[:60] if key in d else "(unset)" for d in (old, new))
            changes.append(f"{name}: {a} -> {b}")
    return changes


def _trainer(cfg: TrainConfig, plan: WorkerPlan, storage_path: str, storage_fs):
    """Ray Train's ``TorchTrainer`` running ``train_loop`` on ``cfg.scaling``'s workers, its checkpoints
    under DEST/checkpoints."""
    import ray.train
    from ray.train.torch import TorchTrainer

    scaling = cfg.scaling
    return TorchTrainer(
        train_loop,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=CHECKPOINTS, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )


def _summary(plan: WorkerPlan) -> dict:
    """The run's summary from the history the workers wrote: the best epoch, its score and metrics.
    Raises when the run stopped on a set it cannot use, or when no epoch had a score."""
    from perceptclip.core.storage import filesystem

    fs, path = filesystem(plan.metrics_url, plan.storage_options)
    with fs.open(path, "r") as f:
        history = json.load(f)
    last = history[-1]
    metric = run_metric({head: plan.artifact.task_of(head) for head in plan.train})
    if last.get("failure"):
        raise ValueError(f"training stopped after epoch {last['epoch']}, nothing exported: {last['failure']}")
    if last["best_epoch"] is None:
        why = "; ".join(f"validation set {name!r}: {m.get('undefined', 'no score')}" for name, m in last["val"].items())
        raise ValueError(f"no epoch of the run could be scored ({metric} of every epoch undefined; last epoch: "
                         f"{why}), nothing exported")
    best = next(r for r in history if r["epoch"] == last["best_epoch"])
    return {"model": plan.model_url, "best_epoch": best["epoch"], "metric": metric, "score": best["score"],
            "val": printable(best)["val"], "epochs": len(history)}
