"""Model artifacts: a directory (local path or any fsspec URI) holding ``config.json`` and ``model.safetensors``.

``config.json`` says everything needed to rebuild and use the model without this package's defaults:

    {"format": "perceptclip-model", "format_version": 2,
     "task": {...},                                  # the whole task (Task.definition()); or, for a model
     "head_tasks": {head: {...}, ...},               #   whose heads have tasks of their own, each head's
     "model": {backbone, lora, head, heads, head_sizes},    # ModelConfig.to_mapping()
     "preprocess": {...},                            # PreprocessConfig.to_mapping()
     "provenance": {...},                            # where the weights came from
     "weights": {"file": "model.safetensors", "sha256": "...", "bytes": N}}

Each task is written once: ``task`` for a model whose heads all have it (one head per training dataset),
``head_tasks`` instead for a model of several tasks, whose default head (the first) gives its ``task``.
Version 1 (read as ever): ``task`` by name, beside ``task_definition``, ``labels`` and
``higher_is_better``; ``head_tasks`` repeating the default head's task; ``head.outputs`` and
``head_outputs`` for the head sizes.

Weights are the full, unmerged state dict (base + LoRA + heads) in safetensors, so an artifact scores
and fine-tunes offline. Nothing is ever unpickled. Remote artifacts are copied once per machine into a
local cache (``PERCEPTCLIP_CACHE``, default ``~/.cache/perceptclip``) and verified against the checksum.

Without ``head_tasks`` the model scores its default head; with it, every head (``scored_heads``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from perceptclip.core.config import Config, ConfigError, require
from perceptclip.core.storage import filesystem
from perceptclip.core.tasks import Task, resolve_task
from perceptclip.model.config import ModelConfig
from perceptclip.model.errors import ArtifactError
from perceptclip.model.preprocess import PreprocessConfig

if TYPE_CHECKING:      # torch: imported by what builds or loads a model, not by what reads a config
    from perceptclip.model.clip_lora import ClipLoraModel

FORMAT = "perceptclip-model"
FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class ArtifactMeta(Config):
    # the default head's task (a built-in name or a definition when built; a ``Task`` then)
    task: Task | str | dict
    model: ModelConfig
    preprocess: PreprocessConfig
    provenance: dict = field(default_factory=dict)
    weights_sha256: str | None = None
    # each head's task, for a model whose heads serve different tasks; None: every head has ``task``
    head_tasks: dict[str, Task] | None = None

    def check(self):
        object.__setattr__(self, "task", resolve_task(self.task))
        if self.head_tasks is not None:
            self.head_tasks = {h: resolve_task(t, f"head_tasks.{h}") for h, t in self.head_tasks.items()}
            require(list(self.head_tasks) == list(self.model.heads), "head_tasks",
                    f"names the heads {list(self.head_tasks)}, the model has {list(self.model.heads)}")
            require(self.head_tasks[self.model.heads[0]] == self.task, "head_tasks",
                    f"the default head's task must be the artifact's task {self.task.name!r}")
        for head in self.model.heads:
            task = self.task_of(head)
            require(self.model.head_size(head) == task.head_size, "model",
                    f"head {head!r} has size {self.model.head_size(head)}, its task {task.name!r} {task.head_size}")

    @property
    def labels(self) -> list[str] | None:
        """The default head's classes; None for a regression."""
        return list(self.task.labels) if self.task.labels else None

    def task_of(self, head: str) -> Task:
        """The task of one of the model's heads."""
        return self.head_tasks[head] if self.head_tasks else self.task

    def scored_heads(self, head: str | None = None, name: str | None = None) -> list[tuple[str, str, Task]]:
        """(head, column name, task) of each head a scorer of this model scores: ``head`` alone when
        given (``MODEL#HEAD``), else every head of a model of several tasks, else the default head.
        ``name`` (``NAME=MODEL``) renames the columns of a single head."""
        heads = self.model.heads
        if head is not None and head not in heads:
            raise ValueError(f"model has no head {head!r}; heads: {', '.join(heads)}")
        chosen = [head] if head else list(heads) if self.head_tasks else [heads[0]]
        if name and len(chosen) > 1:
            raise ValueError(f"NAME={name} renames one head's columns, and this model scores {len(chosen)} heads "
                             f"({', '.join(chosen)}); pick one with MODEL#HEAD")
        return [(h, name or self.task_of(h).name, self.task_of(h)) for h in chosen]

    @classmethod
    def for_task(cls, task: str | Task, model: ModelConfig, provenance: dict | None = None,
                 head_tasks: dict[str, str | Task] | None = None, **preprocess) -> ArtifactMeta:
        """Metadata with the task's defaults: its preprocessing at the model's size. ``task``: a built-in
        name or a ``Task``; ``head_tasks``: each head's, for a model of several tasks (``task`` is then
        the default head's)."""
        t = resolve_task(task)
        if t.preprocess == "multi_crop":
            preprocess.setdefault("crops", t.crops)
        pre = PreprocessConfig(kind=t.preprocess, size=model.backbone.image_size, **preprocess)
        return cls(task=t, model=model, preprocess=pre, provenance=dict(provenance or {}), head_tasks=head_tasks)

    def to_dict(self) -> dict:
        tasks = ({"head_tasks": {h: t.definition() for h, t in self.head_tasks.items()}} if self.head_tasks
                 else {"task": self.task.definition()})
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **tasks,
            "model": self.model.to_mapping(),
            "preprocess": self.preprocess.to_mapping(),
            "provenance": self.provenance,
            "weights": {"file": WEIGHTS_FILE, "sha256": self.weights_sha256},
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> ArtifactMeta:
        if d.get("format") != FORMAT:
            raise ArtifactError(f"{where}: not a perceptclip model config (format={d.get('format')!r})")
        version = d.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise ArtifactError(f"{where}: format_version {version} is newer than this perceptclip reads")
        weights = d.get("weights")
        try:
            fields = {k: d[k] for k in ("task", "model", "preprocess", "provenance", "head_tasks") if k in d}
            if version < 2:
                fields = _version_1(d, fields)
            elif "head_tasks" in d:
                if "task" in d:
                    raise ConfigError("task: written once, under head_tasks, for a model of several tasks")
                heads = (d.get("model") or {}).get("heads") or list(d["head_tasks"] or {})
                fields["task"] = (d["head_tasks"] or {}).get(heads[0] if heads else None)
            if weights is not None and not isinstance(weights, dict):
                raise ConfigError(f"weights: must be a mapping, got {weights!r}")
            return cls.from_mapping({**fields, "weights_sha256": (weights or {}).get("sha256")})
        except ValueError as e:
            raise ArtifactError(f"{where}: invalid model config: {e}") from None


def _version_1(d: dict, fields: dict) -> dict:
    """The fields of a version 1 ``config.json``, in today's terms: its task by name beside its definition,
    labels and direction (only the name in artifacts written before tasks were data: a built-in task), and
    the head sizes under ``outputs``."""
    definition = d.get("task_definition")
    task = resolve_task(definition if definition is not None else d.get("task"), "task_definition")
    require(task.name == d.get("task"), "task", f"{d.get('task')!r} but its definition is {task.name!r}")
    require(list(task.labels or []) == list(d.get("labels") or []), "labels",
            f"{d.get('labels')} but the task's classes are {list(task.labels or [])}")
    model = dict(d.get("model") or {})
    if isinstance(model.get("head"), dict) and "outputs" in model["head"]:
        head = dict(model["head"])
        head["size"] = head.pop("outputs")
        model["head"] = head
    if "head_outputs" in model:
        model["head_sizes"] = model.pop("head_outputs")
    return {**fields, "task": task, "model": model}


def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_artifact(model: ClipLoraModel, meta: ArtifactMeta, dest: str, storage_options: dict | None = None) -> str:
    """Write ``model`` (unmerged) and ``meta`` to ``dest`` (local or fsspec URI). Returns the weights' sha256.
    ``storage_options``: per protocol, as ``perceptclip.core.storage.storage_options`` gives them."""
    from safetensors.torch import save_file

    if model.cfg.lora.r and not any(".lora." in k for k in model.state_dict()):
        # a merged model has lost its LoRA tensors and no longer matches its own config
        raise ArtifactError("cannot save a merged model: save before merge_lora()")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    fs, root = filesystem(dest, storage_options)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS_FILE)
        save_file(state, local, metadata={"format": FORMAT})
        meta.weights_sha256 = _sha256_file(local)
        fs.makedirs(root, exist_ok=True)
        # weights first, config last: a config.json only ever describes complete weights
        fs.put_file(local, f"{root.rstrip('/')}/{WEIGHTS_FILE}")
    with fs.open(f"{root.rstrip('/')}/{CONFIG_FILE}", "w") as f:
        json.dump(meta.to_dict(), f, indent=2)
    return meta.weights_sha256


def read_meta(uri: str, storage_options: dict | None = None) -> ArtifactMeta:
    """``storage_options``: per protocol, as ``perceptclip.core.storage.storage_options`` gives them."""
    path = f"{uri.rstrip('/')}/{CONFIG_FILE}"
    fs, fs_path = filesystem(path, storage_options)
    try:
        with fs.open(fs_path, "r") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{uri}: no {CONFIG_FILE} here; is this a perceptclip model directory?") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    return ArtifactMeta.from_dict(raw, where=path)


def cache_dir() -> Path:
    return Path(os.environ.get("PERCEPTCLIP_CACHE", Path.home() / ".cache" / "perceptclip"))


def fetch_artifact(uri: str, storage_options: dict | None = None) -> Path:
    """A local directory holding the artifact at ``uri``: the path itself if local, else a verified
    copy in the cache, downloaded at most once per machine (concurrent callers share the result)."""
    fs, root = filesystem(uri, storage_options)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        path = Path(root)
        if not path.is_dir():
            raise ArtifactError(f"{uri}: no such model directory")
        return path
    meta = read_meta(uri, storage_options)
    target = cache_dir() / "artifacts" / hashlib.sha256(f"{uri}|{meta.weights_sha256}".encode()).hexdigest()[:32]
    if (target / CONFIG_FILE).exists():
        return target

    def download(staging: Path) -> None:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            fs.get_file(f"{root.rstrip('/')}/{name}", str(staging / name))

    return publish_once(target, download)


def publish_once(target: Path, fill) -> Path:
    """Create directory ``target`` by ``fill(staging_dir)`` then one rename, so readers never see a half
    written directory and concurrent writers (several actors on one node) all end with one good copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        fill(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / CONFIG_FILE).exists():   # lost the race to a complete copy: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_artifact(uri: str, verify: bool = True, storage_options: dict | None = None
                  ) -> tuple[ClipLoraModel, ArtifactMeta]:
    """Rebuild the model saved at ``uri`` (unmerged, eval mode, on CPU) and its metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from perceptclip.model.clip_lora import ClipLoraModel

    local = fetch_artifact(uri, storage_options)
    meta = read_meta(str(local))
    weights = local / WEIGHTS_FILE
    if not weights.exists():
        raise ArtifactError(f"{uri}: {WEIGHTS_FILE} is missing")
    if verify and meta.weights_sha256 and _sha256_file(weights) != meta.weights_sha256:
        raise ArtifactError(f"{uri}: {WEIGHTS_FILE} does not match the sha256 in {CONFIG_FILE}; refusing to load it")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{uri}: cannot read {WEIGHTS_FILE}: {e}") from None
    model = ClipLoraModel(meta.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{uri}: weights do not fit the architecture in {CONFIG_FILE}: {e}") from None
    return model.eval(), meta


def describe(meta: ArtifactMeta, task: Task | None = None) -> dict:
    """A short JSON-able identity for logs and Parquet metadata; with ``task`` (one of its heads'), that
    head's task, labels and direction, else the default head's."""
    task = task or meta.task
    return {"task": task.name, "backbone": meta.model.backbone.name,
            "weights_sha256": meta.weights_sha256, "labels": list(task.labels) if task.labels else None,
            "higher_is_better": task.higher_is_better,
            "preprocess": meta.preprocess.to_mapping(), "provenance": meta.provenance}

