"""What runs on every Ray Train worker of ``perceptclip train``, from the plan the driver resolved
(``WorkerPlan``) to the checkpoints and the exported model.

    restore     the latest checkpoint, if any: LoRA + heads, the best epoch's, AdamW's state, the history
    each epoch  train on this worker's rows of every training set (DDP), one head per set; validate
                every set, the predictions of all workers gathered, metrics over the whole set
    checkpoint  rank 0: the epoch's state -> Ray Train (DEST/checkpoints), the history -> metrics.json
    export      rank 0, after the last epoch: the best epoch -> a model artifact (DEST/model)

An epoch depends only on the seed, its number, the worker's rank and the checkpoint it starts from:
the rows (``perceptclip.train_data``), the batch shuffle and the dropout masks are drawn from
generators seeded with them. A worker group restarted from a checkpoint therefore trains the epochs
after it exactly as the uninterrupted run did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from perceptclip.artifact import ArtifactMeta, load_artifact, save_artifact
from perceptclip.augment import AugmentConfig
from perceptclip.losses import task_loss
from perceptclip.model import ClipLoraModel, ModelConfig
from perceptclip.official import resolve_model
from perceptclip.preprocess import normalize
from perceptclip.tasks import Task, get_task
from perceptclip.train_data import derive_seed, epoch_rows, shuffled_batches, val_rows

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
    best_score: float | None = None
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)     # one record per finished epoch


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker; ``config`` is ``{"plan": WorkerPlan}``."""
    import ray.train

    worker = Worker(config["plan"])
    worker.restore(ray.train.get_checkpoint())
    worker.distribute()
    for epoch in range(worker.state.epoch + 1, worker.plan.epochs):
        started = time.monotonic()
        counts = worker.train_epoch(epoch)
        record = worker.validate_epoch(epoch, started, counts)
        worker.checkpoint(record)
    if worker.rank == 0:
        worker.export()


def build_model(cfg: ModelConfig, seed: int, init: str | None) -> ClipLoraModel:
    """The model every worker starts from: the ``init`` artifact (its heads copied to each training
    set's head), the pretrained backbone, or (``pretrained: null``) a seeded random backbone."""
    torch.manual_seed(seed)             # the same random heads and LoRA on every worker
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

    def __init__(self, plan: WorkerPlan):
        import ray.data
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.plan, self.rank, self.world = plan, ctx.get_world_rank(), ctx.get_world_size()
        # rows reach the worker in the order of their shards, not in the order the data tasks finish: with
        # seeded shard orders and crops, an epoch then gives the same batches however often it runs
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        self.device = ray.train.torch.get_device()
        self.task = get_task(plan.artifact.task)
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
                      "target": np.zeros(1, dtype=np.float32), "error": np.array(["no batch left on this worker"])}
        self.net = self.model                     # the model as DDP wraps it, once ``distribute`` has

    def restore(self, checkpoint) -> None:
        """Continue from ``checkpoint`` (Ray Train's latest), if there is one."""
        if not checkpoint:
            return
        with checkpoint.as_directory() as d:
            self.model.load_state_dict(_load_tensors(os.path.join(d, "trainable.safetensors")), strict=False)
            self.best = _load_tensors(os.path.join(d, "best.safetensors"))
            self.optimizer.load_state_dict(torch.load(os.path.join(d, "optimizer.pt"), weights_only=True))
            with open(os.path.join(d, "state.json")) as f:
                self.state = RunState(**json.load(f))
        self.resumed_after = self.state.epoch
        if self.rank == 0:
            print(f"resuming after epoch {self.state.epoch} from {checkpoint.path}", flush=True)

    def distribute(self) -> None:
        """Wrap the model for DDP, after ``restore``: DDP starts every worker from rank 0's weights."""
        import ray.train.torch

        multi = len(self.plan.train) > 1     # each step trains one head: the others get no gradient
        self.net = ray.train.torch.prepare_model(self.model, parallel_strategy_kwargs={"find_unused_parameters": multi})

    def train_epoch(self, epoch: int) -> tuple[float, int, int, int]:
        """One pass over this worker's rows of every training set: its (loss sum, steps, samples, errors)."""
        plan = self.plan
        self.net.train()
        seed_globals(derive_seed(plan.seed, epoch, self.rank))
        iterators = {name: iter(shuffled_batches(epoch_rows(urls, epoch, plan.seed, self.rank, self.world,
                                                            self.task.name, self.pre, plan.augment,
                                                            plan.storage_options),
                                                 self.per_worker, derive_seed(plan.seed, epoch, self.rank)))
                     for name, urls in plan.train.items()}
        loss_sum, steps, seen, errors = 0.0, 0, 0, 0
        for name, batch in _interleave(iterators, self.blank, self.device):
            valid, loss = self.step(name, batch)
            if batch is self.blank:          # a step this worker only took part in: nothing of its own to count
                continue
            errors += int((~valid).sum())
            for message in batch["error"][~valid.numpy()][:3]:
                log.warning("skipped: %s", message)
            loss_sum += float(loss.detach())
            steps += 1
            seen += int(valid.sum())
        return loss_sum, steps, seen, errors

    def step(self, head: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step of ``head`` on ``batch``: (which rows were valid, the loss)."""
        valid = torch.from_numpy(batch["error"] == "")
        pixels = torch.from_numpy(batch["pixels"]).to(self.device).flatten(0, 1)   # (B, 3, S, S)
        x = normalize(pixels, self.pre.mean, self.pre.std)
        target = torch.from_numpy(batch["target"]).to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.net(x, head=head)
        loss = task_loss(self.task.loss, out, target, valid.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return valid, loss

    def validate_epoch(self, epoch: int, started: float, counts: tuple[float, int, int, int]) -> dict:
        """The epoch's record (training totals over all workers, validation metrics), added to the
        history; the epoch's weights become the best if its score beats the best so far."""
        train_seconds = time.monotonic() - started
        val = validate(self.model, self.val_parts, self.task, self.pre, self.device, self.autocast,
                       self.plan.batch_size, self.plan.storage_options)
        totals = _gather(counts)
        record = {
            "epoch": epoch,
            "train_loss": sum(t[0] for t in totals) / max(1, sum(t[1] for t in totals)),
            "train_samples": sum(t[2] for t in totals),
            "train_errors": sum(t[3] for t in totals),
            "val": val,
            "train_seconds": round(train_seconds, 2),
            "seconds": round(time.monotonic() - started, 2),
        }
        scores = [v[primary_metric(self.task)] for v in val.values()]
        record["score"] = float(np.mean(scores)) if scores and not any(np.isnan(scores)) else float("nan")
        # a score that is NaN (a validation set too small or too uniform to rank) never beats a real
        # one, but the first epoch still counts as the best so far: a run always has a model to export
        state = self.state
        if state.best_epoch is None or _beats(record["score"], state.best_score):
            state.best_score, state.best_epoch = record["score"], epoch
            self.best = {k: v.detach().cpu().clone() for k, v in self.model.trainable_state_dict().items()}
        state.epoch = epoch
        record["best_epoch"] = state.best_epoch
        if self.resumed_after is not None:   # the history shows where a rerun or a restarted worker group began
            record["resumed_after_epoch"], self.resumed_after = self.resumed_after, None
        state.history.append(record)
        return record

    def checkpoint(self, record: dict) -> None:
        """Report the epoch to Ray Train; rank 0 with the checkpoint, and rewrites the history."""
        import ray.train
        from ray.train import Checkpoint

        flat = {"epoch": record["epoch"], "score": record["score"], "train_loss": record["train_loss"],
                "train_errors": record["train_errors"], "best_epoch": self.state.best_epoch}
        if self.rank != 0:
            ray.train.report(flat)
            return
        with tempfile.TemporaryDirectory() as d:
            _save_tensors(self.model.trainable_state_dict(), os.path.join(d, "trainable.safetensors"))
            _save_tensors(self.best, os.path.join(d, "best.safetensors"))
            torch.save(self.optimizer.state_dict(), os.path.join(d, "optimizer.pt"))
            with open(os.path.join(d, "state.json"), "w") as f:
                json.dump(dataclasses.asdict(self.state), f)
            ray.train.report(flat, checkpoint=Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"epoch-{record['epoch']:04d}")
        _write_json(self.plan.metrics_url, self.state.history, self.plan.storage_options)
        print(json.dumps(printable(record)), flush=True)

    def export(self) -> None:
        """The best epoch's weights as a model artifact at ``plan.model_url`` (rank 0, after the last epoch)."""
        self.model.load_state_dict(self.best, strict=False)
        meta = self.plan.artifact
        meta = dataclasses.replace(meta, provenance={
            **meta.provenance, "best_epoch": self.state.best_epoch, "best_score": self.state.best_score,
            "metric": primary_metric(self.task)})
        save_artifact(self.model.cpu(), meta, self.plan.model_url, self.plan.storage_options)


@torch.no_grad()
def validate(model: ClipLoraModel, parts: dict[str, list[str]], task: Task, pre, device: torch.device, autocast,
             batch_size: int, storage_options: dict) -> dict[str, dict]:
    """Metrics of each validation set over all its samples: this worker scores its shards, the
    (output, target) pairs of all workers are gathered and every worker computes the same metrics."""
    model.eval()
    results = {}
    for name, urls in parts.items():
        outputs, targets, errors = [], [], 0
        if urls:
            for batch in val_rows(urls, task.name, pre, storage_options).iter_batches(batch_size=batch_size,
                                                                                       batch_format="numpy"):
                valid = batch["error"] == ""
                errors += int((~valid).sum())
                if not valid.any():
                    continue
                pixels = torch.from_numpy(batch["pixels"][valid]).to(device)        # (B, n, 3, S, S)
                b, n = pixels.shape[:2]
                x = normalize(pixels.flatten(0, 1), pre.mean, pre.std)
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    out = model(x, head=name if name in model.heads else None).float()
                outputs.append(out.view(b, n, -1).mean(1).cpu().numpy())           # crops averaged, as Scorer does
                targets.append(batch["target"][valid])
        gathered = _gather((outputs, targets, errors))
        all_out = [o for part in gathered for o in part[0]]
        all_target = [t for part in gathered for t in part[1]]
        if all_out:
            metrics = _val_metrics(task, np.concatenate(all_out), np.concatenate(all_target))
        else:
            metrics = {primary_metric(task): float("nan"), "n": 0}
        metrics["errors"] = sum(part[2] for part in gathered)
        results[name] = metrics
    model.train()
    return results


def primary_metric(task: Task) -> str:
    return "accuracy" if task.is_classification else "srcc"


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


def _gather(obj):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _val_metrics(task: Task, outputs: np.ndarray, targets: np.ndarray) -> dict:
    from perceptclip.metrics import classification_metrics, regression_metrics

    if task.is_classification:
        return classification_metrics(outputs, targets.astype(np.int64), task.labels)
    return regression_metrics(outputs[:, 0], targets)


def _beats(score: float, best: float | None) -> bool:
    return not math.isnan(score) and (best is None or math.isnan(best) or score > best)


# --- files ----------------------------------------------------------------------------------------------

def _save_tensors(state: dict, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)


def _load_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def _write_json(url: str, obj, storage_options: dict) -> None:
    from perceptclip.storage import filesystem

    fs, path = filesystem(url, storage_options)
    with fs.open(path, "w") as f:
        json.dump(obj, f, indent=1)
