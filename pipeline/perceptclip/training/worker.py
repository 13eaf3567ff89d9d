"""What runs on every worker of ``perceptclip train`` (a Ray Train worker, or this process alone: the
worker's ``session``, ``training.session``), from the plan the driver resolved (``WorkerPlan``) to the
checkpoints and the exported model.

    restore     the latest checkpoint, if any: LoRA + heads, the best epoch's, AdamW's state, the history
    each epoch  train on this worker's rows of every training set (DDP), one head per set; validate
                every set, the predictions of all workers gathered, metrics over the whole set
                (perceptclip.training.validation)
    checkpoint  rank 0: the epoch's state -> the session (DEST/checkpoints), the history -> metrics.json
    export      rank 0, after the last epoch: the best epoch -> a model artifact (DEST/model)

A set that cannot be used (a training set without a usable sample, a validation set whose labels
give no metric) stops the run after the epoch that found it: rank 0 writes that epoch's record, with
its ``failure``, to metrics.json, and nothing is checkpointed or exported. The driver raises it.

An epoch depends only on the seed, its number, the worker's rank and the checkpoint it starts from:
the rows (``perceptclip.training.data``), the batch shuffle and the dropout masks are drawn from
generators seeded with them. A worker group restarted from a checkpoint therefore trains the epochs
after it exactly as the uninterrupted run did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from perceptclip.core.metrics import json_ready
from perceptclip.model.artifact import ArtifactMeta, load_artifact, save_artifact
from perceptclip.model.clip_lora import ClipLoraModel, import_open_clip_for_vision_towers
from perceptclip.model.config import ModelConfig
from perceptclip.model.preprocess import normalize
from perceptclip.model.reference import resolve_model
from perceptclip.training.augment import AugmentConfig
from perceptclip.training.data import derive_seed, epoch_items, shard_rows, shuffled_batches
from perceptclip.training.losses import task_loss
from perceptclip.training.session import STATE_FILE
from perceptclip.training.validation import epoch_score, gather, run_metric, run_problems, validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker is told, resolved once by the driver: shard lists expanded, the architecture
    and the preprocessing fixed. A worker reads nothing else but its shards and its checkpoint."""

    artifact: ArtifactMeta        # the model the run exports: task, architecture, preprocessing (validation's
                                  # too) and the run's provenance, to which the best epoch is added
    init: str | None              # a model whose weights to start from: built-in name or artifact path/URI
    seed: int
    lr: float
    weight_decay: float
    precision: str                # auto | bf16 | fp32
    epochs: int
    batch_size: int               # per optimiser step, over all workers
    augment: AugmentConfig
    train: dict[str, list[str]]   # head name -> shard URLs
    val: dict[str, list[str]]     # head name -> shard URLs; every name is also a training set's
    metrics_url: str              # the history, rewritten by rank 0 after every epoch
    model_url: str                # where rank 0 exports the best epoch
    storage_options: dict         # the driver's: a worker's own environment may hold no credentials


@dataclass
class RunState:
    """What an epoch hands the next besides the weights: ``state.json`` in every checkpoint."""

    epoch: int = -1                     # the last finished epoch
    best_score: float | None = None     # None until an epoch has a score
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)     # one record per finished epoch


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker; ``config`` is ``{"plan": WorkerPlan}``."""
    from perceptclip.training.session import RaySession

    run_worker(config["plan"], RaySession())


def run_worker(plan: WorkerPlan, session) -> None:
    """The run's epochs on one worker of ``session`` (``training.session``): from its latest checkpoint,
    if any, to the last epoch; then rank 0 exports the best."""
    worker = Worker(plan, session)
    with session.latest() as checkpoint:
        worker.restore(checkpoint)
    worker.distribute()
    for epoch in range(worker.state.epoch + 1, plan.epochs):
        started = time.monotonic()
        counts = worker.train_epoch(epoch)
        record = worker.validate_epoch(epoch, started, counts)
        problems = run_problems(record, plan.artifact.provenance)   # the same on every worker
        if problems:
            worker.fail(record, problems)
            return
        worker.checkpoint(record)
    if worker.rank == 0 and worker.state.best_epoch is not None:   # else no epoch had a score: the driver says so
        worker.export()


def build_model(cfg: ModelConfig, seed: int, init: str | None) -> ClipLoraModel:
    """The model every worker starts from: the ``init`` artifact (its heads copied to each training
    set's head), the pretrained backbone, or (``pretrained: null``) a seeded random backbone."""
    torch.manual_seed(seed)             # the same random heads and LoRA on every worker
    if init or not cfg.backbone.pretrained:
        import_open_clip_for_vision_towers()     # the model is built from configuration: the vision tower only
    if init:
        source, _ = load_artifact(resolve_model(init))
        model = ClipLoraModel(cfg)
        state = {k: v for k, v in source.state_dict().items() if not k.startswith("heads.")}
        model.load_state_dict(state, strict=False)
        src_head = source.heads[source.default_head]
        for head in model.heads.values():
            if src_head[-1].out_features == head[-1].out_features:
                head.load_state_dict(src_head.state_dict())
        return model
    if cfg.backbone.pretrained:
        return ClipLoraModel.from_pretrained_backbone(cfg)
    return ClipLoraModel(cfg)


class Worker:
    """One worker's model, optimiser and run state, and the steps of ``train_loop``."""

    def __init__(self, plan: WorkerPlan, session):
        self.plan, self.session = plan, session
        self.rank, self.world, self.device = session.rank, session.world, session.device
        self.tasks = {head: plan.artifact.task_of(head) for head in plan.train}   # each training set's head's
        self.pre = plan.artifact.preprocess
        self.autocast = torch.bfloat16 if self.device.type == "cuda" and plan.precision in ("auto", "bf16") else None
        self.model = build_model(plan.artifact.model, plan.seed, plan.init).to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay)
        self.state = RunState()
        self.best = self.model.trainable_state_dict()
        self.resumed_after: int | None = None     # the epoch of the checkpoint this worker started from
        self.per_worker = plan.batch_size // self.world
        self.val_parts = {name: urls[self.rank::self.world] for name, urls in plan.val.items()}
        self.blank = {"pixels": np.zeros((1, 1, 3, self.pre.size, self.pre.size), dtype=np.uint8),
                      "target": np.zeros(1, dtype=np.float32), "error": np.array(["no batch left on this worker"]),
                      "reason": np.array(["no_batch"])}
        self.net = self.model                     # the model as DDP wraps it, once ``distribute`` has

    def restore(self, directory: str | None) -> None:
        """Continue from the checkpoint in ``directory`` (the session's latest), if there is one."""
        if directory is None:
            return
        self.model.load_state_dict(_load_tensors(os.path.join(directory, "trainable.safetensors")), strict=False)
        self.best = _load_tensors(os.path.join(directory, "best.safetensors"))
        self.optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), weights_only=True))
        with open(os.path.join(directory, STATE_FILE)) as f:
            self.state = RunState(**json.load(f))
        self.resumed_after = self.state.epoch
        if self.rank == 0:
            self.session.note(f"resuming after epoch {self.state.epoch}")

    def distribute(self) -> None:
        """Wrap the model for DDP, after ``restore``: DDP starts every worker from rank 0's weights."""
        multi = len(self.plan.train) > 1     # each step trains one head: the others get no gradient
        self.net = self.session.prepare(self.model, find_unused=multi)

    def train_epoch(self, epoch: int) -> tuple[float, int, dict[str, int], dict[str, Counter]]:
        """One pass over this worker's rows of every training set: its (loss sum, steps, usable samples
        per set, unusable ones per set by reason)."""
        plan = self.plan
        self.net.train()
        seed_globals(derive_seed(plan.seed, epoch, self.rank))
        iterators = {}
        for name, urls in plan.train.items():
            rows = partial(shard_rows, task=self.tasks[name], pre=self.pre, aug=plan.augment,
                           storage_options=plan.storage_options)
            chunks = self.session.read(epoch_items(urls, epoch, plan.seed, self.rank, self.world), rows)
            iterators[name] = shuffled_batches(chunks, self.per_worker, derive_seed(plan.seed, epoch, self.rank))
        loss_sum, steps = 0.0, 0
        seen, reasons = dict.fromkeys(plan.train, 0), {name: Counter() for name in plan.train}
        for name, batch in _interleave(iterators, self.blank, self.device):
            valid, loss = self.step(name, batch)
            if batch is self.blank:          # a step this worker only took part in: nothing of its own to count
                continue
            reasons[name].update(batch["reason"][~valid.numpy()].tolist())
            for message in batch["error"][~valid.numpy()][:3]:
                log.warning("skipped: %s", message)
            loss_sum += float(loss.detach())
            steps += 1
            seen[name] += int(valid.sum())
        return loss_sum, steps, seen, reasons

    def step(self, head: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step of ``head`` on ``batch``: (which rows were valid, the loss). A batch comes
        from one training set, so its samples carry the labels of one head: the loss is that head's
        task's, over them (the sum of the heads' losses over the samples that carry their labels)."""
        valid = torch.from_numpy(batch["error"] == "")
        pixels = torch.from_numpy(batch["pixels"]).to(self.device).flatten(0, 1)   # (B, 3, S, S)
        x = normalize(pixels, self.pre.mean, self.pre.std)
        target = torch.from_numpy(batch["target"]).to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.net(x, head=head)
        loss = task_loss(self.tasks[head].loss, out, target, valid.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return valid, loss

    def validate_epoch(self, epoch: int, started: float, counts: tuple) -> dict:
        """The epoch's record (training totals over all workers, per set and in all, validation metrics),
        added to the history; the epoch's weights become the best if its score beats the best so far."""
        train_seconds = time.monotonic() - started
        val = validate(self.model, self.val_parts, self.tasks, self.pre, self.device, self.autocast,
                       self.plan.batch_size, self.plan.storage_options, self.session.read)
        totals = gather(counts)
        sets = {}
        for name in self.plan.train:
            reasons = sum((t[3][name] for t in totals), Counter())
            sets[name] = {"n": sum(t[2][name] for t in totals), "errors": sum(reasons.values()),
                          "error_reasons": dict(reasons)}
        record = json_ready({
            "epoch": epoch,
            "train_loss": sum(t[0] for t in totals) / max(1, sum(t[1] for t in totals)),
            "train_samples": sum(s["n"] for s in sets.values()),
            "train_errors": sum(s["errors"] for s in sets.values()),
            "train_sets": sets,
            "val": val,
            "train_seconds": round(train_seconds, 2),
            "seconds": round(time.monotonic() - started, 2),
            "score": epoch_score(val, self.tasks),    # None: an epoch whose predictions could not be ranked
        })
        state = self.state
        if record["score"] is not None and (state.best_score is None or record["score"] > state.best_score):
            state.best_score, state.best_epoch = record["score"], epoch
            self.best = {k: v.detach().cpu().clone() for k, v in self.model.trainable_state_dict().items()}
        state.epoch = epoch
        record["best_epoch"] = state.best_epoch
        if self.resumed_after is not None:   # the history shows where a rerun or a restarted worker group began
            record["resumed_after_epoch"], self.resumed_after = self.resumed_after, None
        state.history.append(record)
        return record

    def checkpoint(self, record: dict) -> None:
        """Report the epoch to the session; rank 0 with the checkpoint, and rewrites the history."""
        flat = {"epoch": record["epoch"], "score": record["score"], "train_loss": record["train_loss"],
                "train_errors": record["train_errors"], "best_epoch": self.state.best_epoch}
        if self.rank != 0:
            self.session.report(flat)
            return
        with tempfile.TemporaryDirectory() as d:
            _save_tensors(self.model.trainable_state_dict(), os.path.join(d, "trainable.safetensors"))
            _save_tensors(self.best, os.path.join(d, "best.safetensors"))
            torch.save(self.optimizer.state_dict(), os.path.join(d, "optimizer.pt"))
            with open(os.path.join(d, STATE_FILE), "w") as f:
                json.dump(json_ready(dataclasses.asdict(self.state)), f, allow_nan=False)
            self.session.report(flat, d, record["epoch"])
        _write_json(self.plan.metrics_url, self.state.history, self.plan.storage_options)
        self.session.note(json.dumps(printable(record)))

    def fail(self, record: dict, problems: str) -> None:
        """Stop the run at this epoch: rank 0 writes the epoch's record, with why, after the history;
        nothing is checkpointed, so a rerun after the data is fixed starts from the last good epoch."""
        if self.rank == 0:
            failed = {**record, "failure": problems}
            _write_json(self.plan.metrics_url, [*self.state.history[:-1], failed], self.plan.storage_options)
            self.session.note(json.dumps(printable(failed)))

    def export(self) -> None:
        """The best epoch's weights as a model artifact at ``plan.model_url`` (rank 0, after the last epoch)."""
        self.model.load_state_dict(self.best, strict=False)
        meta = self.plan.artifact
        meta = dataclasses.replace(meta, provenance={
            **meta.provenance, "best_epoch": self.state.best_epoch, "best_score": self.state.best_score,
            "metric": run_metric(self.tasks)})
        save_artifact(self.model.cpu(), meta, self.plan.model_url, self.plan.storage_options)


def printable(record: dict) -> dict:
    """An epoch's record for the log: the confusion matrix left to metrics.json."""
    val = {name: {k: v for k, v in m.items() if k not in ("confusion", "labels")} for name, m in record["val"].items()}
    return {**record, "val": val}


def seed_globals(seed: int) -> None:
    """Seed the global generators: torch's (dropout), and Python's and NumPy's for any library that
    draws from them. Done at the start of every epoch from (seed, epoch, rank), not once per run: a
    resumed epoch then draws what it drew the first time."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- across workers -------------------------------------------------------------------------------------

def _interleave(iterators: dict, blank: dict, device: torch.device):
    """Round-robin over the training sets' batches, (name, batch), the same sequence on every worker.
    Workers read different shards, so one may run out of a set's batches before another: until no
    worker has one left, it steps on ``blank`` (rows without a label: a zero loss that still runs the
    backward pass, which DDP needs from every worker)."""
    live = list(iterators)
    while live:
        for name in list(live):
            batch = next(iterators[name], None)
            if _on_any_worker(batch is not None, device):
                yield name, blank if batch is None else batch
            else:
                live.remove(name)


def _on_any_worker(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any worker; every worker must ask at the same point."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    flags = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())


# --- files ----------------------------------------------------------------------------------------------

def _save_tensors(state: dict, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)


def _load_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def _write_json(url: str, obj, storage_options: dict) -> None:
    from perceptclip.core.storage import filesystem

    fs, path = filesystem(url, storage_options)
    with fs.open(path, "w") as f:
        json.dump(json_ready(obj), f, indent=1, allow_nan=False)
