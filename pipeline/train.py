"""Fine-tuning PerceptCLIP on Ray Train: config, data rows, losses, the per-worker loop and the wiring.

    --train [NAME=]SHARDS ...   each epoch, every worker reads its share of each set's shards
      -> shard_rows: read a shard, decode, random crop + flip     Ray Data CPU tasks
      -> worker: AdamW on LoRA + heads, one head per training set  TorchTrainer (DDP, gloo or nccl)
      -> validate: every worker scores its part of each val set, the predictions are gathered,
         metrics computed over the whole set on every worker
      -> rank 0: checkpoint (LoRA + heads + optimizer + best so far) -> DEST/checkpoints/
                 history -> DEST/metrics.json; at the end the best epoch -> DEST/model/ (an artifact)

Rerunning the same command finds Ray Train's checkpoint state under DEST/checkpoints and resumes
after the latest finished epoch; a failed worker group restarts from it (``max_failures``).

An epoch is a function of (seed, epoch): which worker reads which shards, the shards' order, every
crop and flip, the rows' order within each worker and the dropout masks are all drawn from generators
seeded with it, and the rows reach a worker in its shards' order. A run resumed after epoch k therefore
trains epochs k+1... exactly as the uninterrupted run would, and exports the same model.

The Ray wiring sits in ``train`` (the trainer) and in ``epoch_rows`` and ``validate`` (the datasets a
worker reads each epoch); ``shard_rows``, the losses and ``TrainConfig`` are plain code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import tempfile
import time
import types
import typing
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from perceptclip.augment import AugmentConfig, random_crop
from perceptclip.model import BackboneConfig, ClipLoraModel, HeadConfig, LoraConfig, ModelConfig
from perceptclip.preprocess import ImageError, PreprocessConfig, decode_image, normalize, preprocess
from perceptclip.tasks import Task, get_task

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.json"
MODEL_DIR = "model"


# ---------------------------------------------------------------------------------------------- config

@dataclass
class ModelSpec:
    """The architecture to fine-tune when not starting from an artifact (``init``)."""

    backbone: str | dict = "ViT-L-14-quickgelu"   # an open_clip name, debug-vit, or BackboneConfig fields
    pretrained: str | None = "openai"              # open_clip pretrained tag; null: random init (tests, smoke)
    lora: LoraConfig = field(default_factory=LoraConfig)
    head_hidden: list[int] = field(default_factory=lambda: [512, 256])
    head_dropout: float = 0.5

    def model_config(self, task: Task, heads: tuple[str, ...]) -> ModelConfig:
        if isinstance(self.backbone, str):
            backbone = BackboneConfig.named(self.backbone, pretrained=self.pretrained)
        else:
            backbone = BackboneConfig(**{**self.backbone, "pretrained": self.pretrained})
        return ModelConfig(backbone=backbone, lora=self.lora,
                           head=HeadConfig(outputs=task.outputs, hidden=tuple(self.head_hidden), dropout=self.head_dropout),
                           heads=heads)


@dataclass
class ScalingSpec:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclass
class TrainConfig:
    task: str
    model: ModelSpec = field(default_factory=ModelSpec)
    init: str | None = None            # a model to start from: built-in name or artifact path/URI
    epochs: int = 10
    batch_size: int = 32               # per optimiser step, over all workers
    learning_rate: float | None = None  # None: the task's (5e-5 iqa and memorability, 1e-4 emotion)
    weight_decay: float = 0.01         # torch AdamW's default
    precision: str = "auto"            # auto: bf16 autocast on GPU, fp32 on CPU; or bf16 | fp32
    seed: int = 0                      # the initial heads and LoRA, the shards' order, crops, dropout
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval_crops: int = 5                # multi_crop tasks: crops per image at validation and in the export
    max_side: int = 2048               # multi_crop tasks: longer images are scaled down to this first
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    max_failures: int = 3              # worker-group restarts from the latest checkpoint
    keep_checkpoints: int = 2

    def __post_init__(self):
        get_task(self.task)
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1,
                  "learning_rate": self.learning_rate is None or self.learning_rate > 0,
                  "weight_decay": self.weight_decay >= 0, "precision": self.precision in ("auto", "bf16", "fp32"),
                  "eval_crops": self.eval_crops >= 1, "max_failures": self.max_failures >= -1,
                  "keep_checkpoints": self.keep_checkpoints >= 1,
                  "scaling.num_workers": self.scaling.num_workers >= 1,
                  "scaling.cpus_per_worker": self.scaling.cpus_per_worker > 0,
                  "model.lora.r": self.model.lora.r >= 1, "model.head_dropout": 0 <= self.model.head_dropout < 1}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid value for {bad[0]}")
        if self.batch_size % self.scaling.num_workers:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of scaling.num_workers")

    @property
    def lr(self) -> float:
        return self.learning_rate or get_task(self.task).learning_rate

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _build(cls, d, "")

    @classmethod
    def load(cls, path: str) -> "TrainConfig":
        import fsspec
        import yaml

        with fsspec.open(path, "r") as f:
            raw = yaml.safe_load(f)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of training settings")
        try:
            return cls.from_dict(raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, d, where: str):
    """``cls`` from the mapping ``d``, checking every key and value type; errors name the field."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown field {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in d.items():
        values[name] = _coerce(hints[name], value, f"{where}{name}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(f"{where.rstrip('.') or 'config'}: {e}") from None
    except ValueError as e:
        message = str(e)
        if where and "invalid value for " in message:
            message = message.replace("invalid value for ", f"invalid value for {where}")
        raise ValueError(message) from None


def _coerce(hint, value, where: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"invalid value for {where}: {value!r}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{where}.")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ValueError(f"invalid value for {where}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"invalid value for {where}: expected a mapping, got {value!r}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ValueError(f"invalid value for {where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


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


# ---------------------------------------------------------------------------------------------- rows

def target_of(meta: dict, task: Task) -> float:
    """The training target in a sample's JSON ``label``: a number, or a class name for classification."""
    if "label" not in meta:
        raise ValueError("no label in the sample's JSON")
    label = meta["label"]
    if task.is_classification:
        if isinstance(label, str):
            if label not in task.labels:
                raise ValueError(f"unknown class {label!r}; classes: {', '.join(task.labels)}")
            return float(task.labels.index(label))
        if isinstance(label, (int, float)) and not isinstance(label, bool) and float(label).is_integer() \
                and 0 <= label < len(task.labels):
            return float(label)
        raise ValueError(f"label {label!r} is not a class name or index of {task.name}")
    if isinstance(label, (int, float)) and not isinstance(label, bool) and math.isfinite(label):
        return float(label)
    raise ValueError(f"label {label!r} is not a number")


def shard_rows(row: dict, task_name: str, pre: PreprocessConfig, aug: AugmentConfig | None,
               storage_options: dict | None = None) -> list[dict]:
    """One shard URL -> one row per sample: ``pixels`` uint8 (n, 3, S, S), ``target``, ``key``, ``error``.

    ``aug`` None gives the inference preprocessing (validation); otherwise one random crop per sample.
    A sample that cannot be used (bad image, no label) becomes a row with ``error`` set and zero
    pixels, so it is counted, not silently lost; a shard that cannot be read becomes one such row.
    Training rows carry ``seed``: the crops are drawn from it, so a shard read again in the same epoch
    (a resumed run) gives the same pixels."""
    from perceptclip.shards import ShardError, image_member, iter_shard, parse_json

    task = get_task(task_name)
    url = row["url"]
    crops = 1 if aug is not None or pre.kind != "multi_crop" else pre.crops
    blank = np.zeros((crops, 3, pre.size, pre.size), dtype=np.uint8)
    rng = np.random.default_rng(row.get("seed"))
    out = []
    try:
        for sample in iter_shard(url, storage_options):
            key = sample["__key__"]
            try:
                meta = parse_json(sample.get("json", b"{}"))
                target = target_of(meta if isinstance(meta, dict) else {}, task)
                ext = image_member(sample)
                if ext is None:
                    raise ValueError("no image in the sample")
                img = decode_image(sample[ext])
                pixels = random_crop(img, pre, aug, rng) if aug is not None else preprocess(img, pre)
                out.append({"key": key, "pixels": np.asarray(pixels), "target": target, "error": ""})
            except (ImageError, ValueError) as e:
                out.append({"key": key, "pixels": blank, "target": 0.0, "error": f"{url} {key}: {e}"})
    except ShardError as e:
        out.append({"key": "", "pixels": blank, "target": 0.0, "error": str(e)})
    return out


# ---------------------------------------------------------------------------------------------- losses

def plcc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Pearson correlation of the batch: invariant to the scale and shift of the labels."""
    p = pred - pred.mean()
    t = target - target.mean()
    return 1 - (p * t).sum() / (p.norm() * t.norm() + 1e-8)


def task_loss(loss: str, out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The task's loss over the valid rows. A batch without enough valid rows gives a zero that still
    depends on every output, so all workers run the same backward (DDP needs it)."""
    out, target = out.float(), target.float()
    needed = 2 if loss == "plcc" else 1
    if int(valid.sum()) < needed:
        return out.sum() * 0.0
    out, target = out[valid], target[valid]
    if loss == "mse":
        return F.mse_loss(out[:, 0], target)
    if loss == "plcc":
        return plcc_loss(out[:, 0], target)
    if loss == "cross_entropy":
        return F.cross_entropy(out, target.long())
    raise ValueError(f"unknown loss {loss!r}")


# ---------------------------------------------------------------------------------------------- model

def build_model(plan: dict) -> ClipLoraModel:
    """The model every worker starts from: the ``init`` artifact (its heads copied to each training
    set's head), the pretrained backbone, or (``pretrained: null``) a seeded random backbone."""
    from perceptclip.artifact import load_artifact

    cfg = ModelConfig.from_dict(plan["model"])
    torch.manual_seed(plan["seed"])             # the same random heads and LoRA on every worker
    if plan["init"]:
        from perceptclip.official import resolve_model

        source, _ = load_artifact(resolve_model(plan["init"]))
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


def init_model_config(cfg: TrainConfig, heads: tuple[str, ...]) -> ModelConfig:
    """The architecture of the run: the init artifact's (with our heads) or the config's."""
    task = get_task(cfg.task)
    if cfg.init:
        from perceptclip.artifact import read_meta
        from perceptclip.official import resolve_model

        meta = read_meta(resolve_model(cfg.init))
        if meta.task != cfg.task:
            log.warning("starting a %s model from a %s model (%s)", cfg.task, meta.task, cfg.init)
        model = dataclasses.replace(meta.model, heads=heads)
        model.head = dataclasses.replace(model.head, outputs=task.outputs)
        return model
    return cfg.model.model_config(task, heads)


# ---------------------------------------------------------------------------------------------- worker

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


def derive_seed(*parts: int) -> int:
    """One 32-bit seed from several integers (run seed, epoch, rank or shard), for APIs that take one."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def seed_globals(seed: int) -> None:
    """Seed the global generators: torch's (dropout), and Python's and NumPy's for any library that
    draws from them. Done at the start of every epoch from (seed, epoch, rank), not once per run: a
    resumed epoch then draws what it drew the first time."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_rows(urls: list[str], epoch: int, seed: int, rank: int, world: int, task_name: str,
               pre: PreprocessConfig, aug: AugmentConfig, storage_options: dict):
    """This worker's rows of one training set for one epoch. The set's shards are put in an order
    drawn from (seed, epoch) and dealt to the workers in turn; each shard is cropped with a generator
    seeded by (seed, epoch, shard). Read twice, an epoch gives every worker the same rows, in the same
    order when the DataContext preserves it (``train_loop`` does)."""
    import ray.data

    order = np.random.default_rng([seed, epoch]).permutation(len(urls))[rank::world]
    items = [{"url": urls[i], "seed": derive_seed(seed, epoch, int(i))} for i in order]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.flat_map(partial(shard_rows, task_name=task_name, pre=pre, aug=aug, storage_options=storage_options))


def _batches(rows, batch_size: int, shuffle_seed: int):
    """A dataset's batches, shuffled within a window of a few batches, the same way for the same seed."""
    return rows.iter_batches(batch_size=batch_size, batch_format="numpy",
                             local_shuffle_buffer_size=batch_size * 4, local_shuffle_seed=shuffle_seed)


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


def primary_metric(task: Task) -> str:
    return "accuracy" if task.is_classification else "srcc"


def train_loop(plan: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.data
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from perceptclip.artifact import ArtifactMeta
    from perceptclip.storage import join

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # rows reach the worker in the order of their shards, not in the order the data tasks finish: with
    # seeded shard orders and crops, an epoch then gives the same batches however often it runs
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    device = ray.train.torch.get_device()
    task = get_task(plan["task"])
    pre = PreprocessConfig(**plan["preprocess"])
    autocast = torch.bfloat16 if device.type == "cuda" and plan["precision"] in ("auto", "bf16") else None

    model = build_model(plan).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan["lr"], weight_decay=plan["weight_decay"])
    state = {"epoch": -1, "best_score": None, "best_epoch": None, "history": []}
    best = model.trainable_state_dict()
    resumed_after = None           # the epoch of the checkpoint this worker started from, if any

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(_load_tensors(os.path.join(d, "trainable.safetensors")), strict=False)
            best = _load_tensors(os.path.join(d, "best.safetensors"))
            optimizer.load_state_dict(torch.load(os.path.join(d, "optimizer.pt"), weights_only=True))
            with open(os.path.join(d, "state.json")) as f:
                state = json.load(f)
        resumed_after = state["epoch"]
        if rank == 0:
            print(f"resuming after epoch {state['epoch']} from {checkpoint.path}", flush=True)

    multi = len(plan["train"]) > 1
    net = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": multi})
    per_worker = plan["batch_size"] // world
    val_parts = {name: urls[rank::world] for name, urls in plan["val"].items()}
    aug = AugmentConfig(**plan["augment"])
    blank = {"pixels": np.zeros((1, 1, 3, pre.size, pre.size), dtype=np.uint8),
             "target": np.zeros(1, dtype=np.float32), "error": np.array(["no batch left on this worker"])}

    for epoch in range(state["epoch"] + 1, plan["epochs"]):
        started = time.monotonic()
        net.train()
        seed_globals(derive_seed(plan["seed"], epoch, rank))
        iterators = {name: iter(_batches(epoch_rows(urls, epoch, plan["seed"], rank, world, task.name, pre, aug,
                                                    plan["storage_options"]),
                                         per_worker, derive_seed(plan["seed"], epoch, rank)))
                     for name, urls in plan["train"].items()}
        loss_sum, steps, seen, errors = 0.0, 0, 0, 0
        for name, batch in _interleave(iterators, blank, device):
            valid = torch.from_numpy(batch["error"] == "")
            pixels = torch.from_numpy(batch["pixels"]).to(device).flatten(0, 1)   # (B, 3, S, S)
            x = normalize(pixels, pre.mean, pre.std)
            target = torch.from_numpy(batch["target"]).to(device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                out = net(x, head=name)
            loss = task_loss(task.loss, out, target, valid.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if batch is blank:          # a step this worker only took part in: nothing of its own to count
                continue
            errors += int((~valid).sum())
            for message in batch["error"][~valid.numpy()][:3]:
                log.warning("skipped: %s", message)
            loss_sum += float(loss.detach())
            steps += 1
            seen += int(valid.sum())

        train_seconds = time.monotonic() - started
        val = validate(model, val_parts, task, pre, device, autocast, plan["batch_size"], plan["storage_options"])
        totals = _gather((loss_sum, steps, seen, errors))
        record = {
            "epoch": epoch,
            "train_loss": sum(t[0] for t in totals) / max(1, sum(t[1] for t in totals)),
            "train_samples": sum(t[2] for t in totals),
            "train_errors": sum(t[3] for t in totals),
            "val": val,
            "train_seconds": round(train_seconds, 2),
            "seconds": round(time.monotonic() - started, 2),
        }
        scores = [v[primary_metric(task)] for v in val.values()]
        record["score"] = float(np.mean(scores)) if scores and not any(np.isnan(scores)) else float("nan")
        # a score that is NaN (a validation set too small or too uniform to rank) never beats a real
        # one, but the first epoch still counts as the best so far: a run always has a model to export
        improved = state["best_epoch"] is None or _beats(record["score"], state["best_score"])
        if improved:
            state["best_score"], state["best_epoch"] = record["score"], epoch
            best = {k: v.detach().cpu().clone() for k, v in model.trainable_state_dict().items()}
        state["epoch"] = epoch
        record["best_epoch"] = state["best_epoch"]
        if resumed_after is not None:   # the history shows where a rerun or a restarted worker group began
            record["resumed_after_epoch"], resumed_after = resumed_after, None
        state["history"].append(record)
        flat = {"epoch": epoch, "score": record["score"], "train_loss": record["train_loss"],
                "train_errors": record["train_errors"], "best_epoch": state["best_epoch"]}
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                _save_tensors(model.trainable_state_dict(), os.path.join(d, "trainable.safetensors"))
                _save_tensors(best, os.path.join(d, "best.safetensors"))
                torch.save(optimizer.state_dict(), os.path.join(d, "optimizer.pt"))
                with open(os.path.join(d, "state.json"), "w") as f:
                    json.dump(state, f)
                ray.train.report(flat, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=f"epoch-{epoch:04d}")
            _write_json(join(plan["dest"], METRICS_FILE), state["history"], plan["storage_options"])
            print(json.dumps(_printable(record)), flush=True)
        else:
            ray.train.report(flat)

    if rank == 0:
        model.load_state_dict(best, strict=False)
        meta = ArtifactMeta.for_task(task.name, model.cfg, provenance={
            "trained_by": "perceptclip train", "init": plan["init"], "train": plan["train_specs"],
            "val": plan["val_specs"], "best_epoch": state["best_epoch"], "best_score": state["best_score"],
            "metric": primary_metric(task)}, **plan["export_preprocess"])
        export_artifact(model.cpu(), meta, join(plan["dest"], MODEL_DIR), plan["storage_options"])


def export_artifact(model: ClipLoraModel, meta, dest: str, storage_options: dict) -> None:
    """``save_artifact`` to ``dest`` with the run's storage options (a worker's own environment may
    hold no credentials)."""
    from perceptclip.artifact import save_artifact

    save_artifact(model, meta, dest, storage_options)


def _beats(score: float, best: float | None) -> bool:
    return not math.isnan(score) and (best is None or math.isnan(best) or score > best)


def _printable(record: dict) -> dict:
    """An epoch's record for the log: the confusion matrix left to metrics.json."""
    val = {name: {k: v for k, v in m.items() if k not in ("confusion", "labels")} for name, m in record["val"].items()}
    return {**record, "val": val}


@torch.no_grad()
def validate(model: ClipLoraModel, parts: dict[str, list[str]], task: Task, pre: PreprocessConfig,
             device: torch.device, autocast, batch_size: int, storage_options: dict) -> dict[str, dict]:
    """Metrics of each validation set over all its samples: this worker scores its shards, the
    (output, target) pairs of all workers are gathered and every worker computes the same metrics."""
    import ray.data

    model.eval()
    results = {}
    for name, urls in parts.items():
        outputs, targets, errors = [], [], 0
        if urls:
            ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
            ds = ds.flat_map(partial(shard_rows, task_name=task.name, pre=pre, aug=None, storage_options=storage_options))
            for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
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


# ---------------------------------------------------------------------------------------------- driver

def _storage(dest: str):
    """Ray Train's ``storage_path`` and ``storage_filesystem`` for DEST, through our fsspec options."""
    from perceptclip.storage import filesystem, protocol, storage_options

    options = storage_options()
    if protocol(dest) == "file":
        path = os.path.abspath(dest.removeprefix("file://"))
        os.makedirs(path, exist_ok=True)
        return path, None, options, path
    import pyarrow.fs

    fs, path = filesystem(dest, options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), options, dest


def check_local_resources(scaling: ScalingSpec, available: dict) -> None:
    """A local cluster started here cannot grow: fail at start, naming the field, instead of waiting
    forever for workers it can never place (a cluster joined with --address may autoscale)."""
    gpus, cpus = available.get("GPU", 0), available.get("CPU", 0)
    if scaling.use_gpu and gpus < scaling.num_workers:
        raise ValueError(f"scaling.use_gpu: {scaling.num_workers} GPU worker(s) asked for, this machine has "
                         f"{int(gpus)} GPU(s); set scaling.use_gpu: false or join a GPU cluster (--address)")
    if scaling.cpus_per_worker * scaling.num_workers >= cpus:
        raise ValueError(f"scaling.cpus_per_worker: {scaling.num_workers} worker(s) x {scaling.cpus_per_worker} "
                         f"CPUs leave none of this machine's {int(cpus)} for reading and decoding the data")


def train(cfg: TrainConfig, train_sets: dict[str, str], val_sets: dict[str, str], dest: str) -> dict:
    """Fine-tune on ``train_sets`` ({head name: shard spec}), validate on ``val_sets`` every epoch,
    checkpoint to ``dest`` and export the best epoch to ``dest/model``. Returns the run's summary."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from perceptclip.artifact import ArtifactMeta
    from perceptclip.shards import expand_shards
    from perceptclip.storage import filesystem, join

    unknown = sorted(set(val_sets) - set(train_sets))
    if unknown:
        raise ValueError(f"validation set {unknown[0]!r} names no training set ({', '.join(train_sets)})")
    task = get_task(cfg.task)
    storage_path, storage_fs, options, dest = _storage(dest)
    train_urls = {name: expand_shards(spec, options) for name, spec in train_sets.items()}
    val_urls = {name: expand_shards(spec, options) for name, spec in val_sets.items()}
    for name, urls in train_urls.items():
        if len(urls) < cfg.scaling.num_workers:
            log.warning("training set %s has %d shard(s) for %d workers: a worker reads whole shards, so some "
                        "read none and only keep step with the others", name, len(urls), cfg.scaling.num_workers)
    model_cfg = init_model_config(cfg, tuple(train_sets))
    export_pre = {"crops": cfg.eval_crops, "max_side": cfg.max_side} if task.preprocess == "multi_crop" else {}
    pre = ArtifactMeta.for_task(task.name, model_cfg, **export_pre).preprocess

    if not ray.is_initialized():
        ray.init()
        if not os.environ.get("RAY_ADDRESS"):
            check_local_resources(cfg.scaling, ray.cluster_resources())
    plan = {
        "task": task.name, "model": model_cfg.to_dict(), "init": cfg.init, "seed": cfg.seed,
        "lr": cfg.lr, "weight_decay": cfg.weight_decay, "precision": cfg.precision,
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "preprocess": pre.to_dict(),
        "augment": dataclasses.asdict(cfg.augment),
        "export_preprocess": export_pre, "train": train_urls, "val": val_urls,
        "train_specs": train_sets, "val_specs": val_sets, "dest": dest, "storage_options": options,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=plan,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.scaling.use_gpu else {})}),
        run_config=RunConfig(
            name=CHECKPOINTS, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    trainer.fit()
    fs, path = filesystem(join(dest, METRICS_FILE), options)
    with fs.open(path, "r") as f:
        history = json.load(f)
    best = next(r for r in history if r["epoch"] == history[-1]["best_epoch"])
    return {"model": join(dest, MODEL_DIR), "best_epoch": best["epoch"], "metric": primary_metric(task),
            "score": best["score"], "val": _printable(best)["val"], "epochs": len(history)}
