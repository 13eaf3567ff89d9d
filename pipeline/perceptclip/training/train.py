"""Fine-tuning PerceptCLIP on Ray Train: the run's config (``TrainConfig``) and the driver (``train``).

    --train [NAME=]SHARDS ...   each epoch, every worker reads its share of each set's shards
      -> rows: read a shard, decode, random crop + flip            Ray Data CPU tasks (perceptclip.training.data)
      -> worker: AdamW on LoRA + heads, one head per training set  TorchTrainer, DDP over gloo or nccl
      -> validate: every worker scores its part of each val set, the predictions are gathered,
         metrics computed over the whole set on every worker     (perceptclip.training.worker)
      -> rank 0: checkpoint (LoRA + heads + optimizer + best so far) -> DEST/checkpoints/
                 history -> DEST/metrics.json; at the end the best epoch -> DEST/model/ (an artifact)

With ``scaling.in_process`` the one worker is this process, reading its shards itself, and there is
no Ray at all (``perceptclip.training.session``): the same epochs as a Ray Train run of one worker.

Rerunning the same command finds the checkpoint state under DEST/checkpoints and resumes
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
from collections.abc import Callable

from perceptclip.model.artifact import ArtifactMeta, read_meta
from perceptclip.model.config import ModelConfig
from perceptclip.model.reference import resolve_model
from perceptclip.output.destination import Destination, flatten
from perceptclip.training.config import TrainConfig, WorkersConfig
from perceptclip.training.report import EpochReport
from perceptclip.training.validation import run_metric
from perceptclip.training.worker import WorkerPlan, printable, run_worker, train_loop

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.json"
MODEL_DIR = "model"
RUN_RECORD = "run.json"
# how a run is carried out, not what it trains: a rerun may change these and still resume
OPERATIONAL = ("max_failures", "keep_checkpoints", "scaling.cpus_per_worker")


# ---------------------------------------------------------------------------------------------- driver

def train(cfg: TrainConfig, train_sets: dict[str, str], val_sets: dict[str, str], dest: str,
          address: str | None = None, restart: bool = False, progress: Callable[[str], None] = log.info) -> dict:
    """Fine-tune on ``train_sets`` ({head name: shard spec}), validate on ``val_sets`` every epoch,
    checkpoint to ``dest`` and export the best epoch to ``dest/model``. Returns the run's summary.
    ``address``: the Ray cluster to join when Ray is not running yet; None: RAY_ADDRESS if set, else a
    local cluster of its own, started here and shut down at the end (``perceptclip.core.cluster``).
    ``restart``: discard an earlier run in ``dest`` instead of resuming it. ``progress`` is told each
    epoch (a ``Console``: see ``perceptclip.core.console``).
    With ``scaling.in_process`` the run is this process's alone, and Ray is not started."""
    from perceptclip.core.cluster import ray_cluster
    from perceptclip.core.console import Console
    from perceptclip.core.storage import protocol, storage_options

    unknown = sorted(set(val_sets) - set(train_sets))
    if unknown:
        raise ValueError(f"validation set {unknown[0]!r} names no training set ({', '.join(train_sets)})")
    if cfg.scaling.in_process:
        check_in_process(cfg.scaling, address)
    if protocol(dest) == "file":
        dest = os.path.abspath(dest.removeprefix("file://"))
    options = storage_options()
    plan = worker_plan(cfg, train_sets, val_sets, dest, options)
    begin_run(cfg, plan.train, plan.val, dest, restart, options)
    console = progress if isinstance(progress, Console) else None
    if cfg.scaling.in_process:
        with EpochReport(plan, progress, show=console.show if console else None):
            train_here(cfg, plan, dest, options)
        return _summary(plan)
    import ray

    storage_path, storage_fs = _storage(dest, options)
    with ray_cluster(address, console) as local:
        if local:
            check_local_resources(cfg.scaling, ray.cluster_resources())
        with EpochReport(plan, progress, show=console.show if console else None):
            _trainer(cfg, plan, storage_path, storage_fs).fit()
    return _summary(plan)


def train_here(cfg: TrainConfig, plan: WorkerPlan, dest: str, options: dict) -> None:
    """The run in this process (``scaling.in_process``), on ``scaling.cpus_per_worker`` torch threads
    as a Ray Train worker would be, its checkpoints in DEST/checkpoints."""
    import torch

    from perceptclip.core.storage import join
    from perceptclip.training.session import LocalSession

    session = LocalSession(join(dest, CHECKPOINTS), options, cfg.keep_checkpoints, cfg.scaling.use_gpu)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    try:
        run_worker(plan, session)
    finally:
        torch.set_num_threads(threads)


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
    sizes = {h: t.head_size for h, t in tasks.items() if t.head_size != task.head_size}
    if cfg.init:
        meta = read_meta(resolve_model(cfg.init))
        if meta.task.name != task.name:
            log.warning("starting a %s model from a %s model (%s)", task.name, meta.task.name, cfg.init)
        return dataclasses.replace(meta.model, heads=heads, head_sizes=sizes,
                                   head=dataclasses.replace(meta.model.head, size=task.head_size))
    return dataclasses.replace(cfg.model.model_config(task, heads), head_sizes=sizes)


def check_in_process(scaling: WorkersConfig, address: str | None) -> None:
    """A run in this process joins no cluster and runs on this machine's GPU or none: fail at start."""
    import torch

    if address:
        raise ValueError(f"--address {address}: a run in this process (scaling.in_process) joins no Ray "
                         f"cluster; leave out one or the other")
    if scaling.use_gpu and not torch.cuda.is_available():
        raise ValueError("scaling.use_gpu: this process sees no GPU (scaling.in_process); set scaling.use_gpu: "
                         "false, or run on Ray Train to use a cluster's GPUs")


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
        changes = _changes(_with_defaults(earlier), record)
        if changes:
            raise ValueError(f"--output: {dest} holds a run started with other settings ({'; '.join(changes)}); "
                             f"rerun it as it was started to resume it, or pass --restart to discard it "
                             f"(checkpoints, metrics, model) and start again")
        return                      # the same run, resumed: its record stays as it was started
    # nothing to resume (a record alone is a run that failed before its first epoch): record this one
    output.begin(remove=lambda: [])
    fs.pipe_file(path, json.dumps(record, indent=1, allow_nan=False).encode())


def _with_defaults(record: dict) -> dict:
    """A run record with its config as this version reads it: a setting added since it was written
    has its default, which is what that run ran with."""
    try:
        return {**record, "config": TrainConfig.from_mapping(record["config"]).to_mapping()}
    except (KeyError, TypeError, ValueError):
        return record


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
