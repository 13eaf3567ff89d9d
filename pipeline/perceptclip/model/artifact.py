"""Model artifacts: a directory (local path or any fsspec URI) holding ``config.json`` and ``model.safetensors``.

``config.json`` says everything needed to rebuild and use the model without this package's defaults:

    {"format": "perceptclip-model", "format_version": 1,
     "task": "iqa", "labels": null, "higher_is_better": true,
     "task_definition": {...},                       # the whole task (Task.definition())
     "head_tasks": {head: {...}, ...},               # only a model whose heads have tasks of their own
     "model": {backbone, lora, head, heads},        # ModelConfig.to_mapping()
     "preprocess": {...},                            # PreprocessConfig.to_mapping()
     "provenance": {...},                            # where the weights came from
     "weights": {"file": "model.safetensors", "sha256": "...", "bytes": N}}

Weights are the full, unmerged state dict (base + LoRA + heads) in safetensors, so an artifact scores
and fine-tunes offline. Nothing is ever unpickled. Remote artifacts are copied once per machine into a
local cache (``PERCEPTCLIP_CACHE``, default ``~/.cache/perceptclip``) and verified against the checksum.

A model whose heads serve different tasks on one LoRA records each head's task in ``head_tasks``;
``task`` is then its default head's. Without ``head_tasks`` every head has the artifact's task (heads
per training dataset) and the model scores its default head; with it, every head (``outputs``).
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

from perceptclip.core.config import Config, ConfigError, require
from perceptclip.core.storage import filesystem
from perceptclip.core.tasks import Task, resolve_task
from perceptclip.model.clip_lora import ClipLoraModel, ModelConfig
from perceptclip.model.errors import ArtifactError
from perceptclip.model.preprocess import PreprocessConfig

FORMAT = "perceptclip-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class ArtifactMeta(Config):
    task: str
    model: ModelConfig
    preprocess: PreprocessConfig
    labels: list[str] | None = None
    higher_is_better: bool = True
    provenance: dict = field(default_factory=dict)
    weights_sha256: str | None = None
    # the whole task definition; None only in artifacts written before tasks were data, whose task is
    # a built-in one by name
    task_definition: Task | None = None
    # each head's task, for a model whose heads serve different tasks; None: every head has ``task``
    head_tasks: dict[str, Task] | None = None

    def check(self):
        if self.task_definition is None:
            object.__setattr__(self, "task_definition", resolve_task(self.task))
        definition = self.task_definition
        require(definition.name == self.task, "task", f"{self.task!r} but its definition is {definition.name!r}")
        require(list(definition.labels or []) == list(self.labels or []), "labels",
                f"{self.labels} but the task's classes are {list(definition.labels or [])}")
        if self.head_tasks is not None:
            self.head_tasks = {h: resolve_task(t, f"head_tasks.{h}") for h, t in self.head_tasks.items()}
            require(list(self.head_tasks) == list(self.model.heads), "head_tasks",
                    f"names the heads {list(self.head_tasks)}, the model has {list(self.model.heads)}")
            require(self.head_tasks[self.model.heads[0]] == definition, "head_tasks",
                    f"the default head's task must be the artifact's task {self.task!r}")
        for head in self.model.heads:
            task = self.task_of(head)
            require(self.model.outputs(head) == task.outputs, "model",
                    f"head {head!r} has {self.model.outputs(head)} outputs, its task {task.name!r} {task.outputs}")

    def task_of(self, head: str) -> Task:
        """The task of one of the model's heads."""
        return self.head_tasks[head] if self.head_tasks else self.task_definition

    def outputs(self, head: str | None = None, name: str | None = None) -> list[tuple[str, str, Task]]:
        """(head, column name, task) of each head a scorer of this model outputs: ``head`` alone when
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

    @property
    def task_def(self) -> Task:
        """The task this model was trained for, as its artifact defines it."""
        return self.task_definition

    @classmethod
    def for_task(cls, task: str | Task, model: ModelConfig, provenance: dict | None = None,
                 head_tasks: dict[str, str | Task] | None = None, **preprocess) -> ArtifactMeta:
        """Metadata with the task's defaults: its labels, direction and preprocessing at the model's size.
        ``task``: a built-in name or a ``Task``; ``head_tasks``: each head's, for a model of several tasks
        (``task`` is then the default head's)."""
        t = resolve_task(task)
        if t.preprocess == "multi_crop":
            preprocess.setdefault("crops", t.crops)
        pre = PreprocessConfig(kind=t.preprocess, size=model.backbone.image_size, **preprocess)
        return cls(task=t.name, model=model, preprocess=pre, labels=list(t.labels) if t.labels else None,
                   higher_is_better=t.higher_is_better, provenance=dict(provenance or {}), task_definition=t,
                   head_tasks=head_tasks)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": self.task,
            "task_definition": self.task_def.definition(),
            **({"head_tasks": {h: t.definition() for h, t in self.head_tasks.items()}} if self.head_tasks else {}),
            "labels": self.labels,
            "higher_is_better": self.higher_is_better,
            "model": self.model.to_mapping(),
            "preprocess": self.preprocess.to_mapping(),
            "provenance": self.provenance,
            "weights": {"file": WEIGHTS_FILE, "sha256": self.weights_sha256},
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> ArtifactMeta:
        if d.get("format") != FORMAT:
            raise ArtifactError(f"{where}: not a perceptclip model config (format={d.get('format')!r})")
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise ArtifactError(f"{where}: format_version {d['format_version']} is newer than this perceptclip reads")
        fields = {k: d[k] for k in ("task", "model", "preprocess", "labels", "higher_is_better", "provenance",
                                    "task_definition", "head_tasks") if k in d}
        weights = d.get("weights")
        try:
            if weights is not None and not isinstance(weights, dict):
                raise ConfigError(f"weights: must be a mapping, got {weights!r}")
            return cls.from_mapping({**fields, "weights_sha256": (weights or {}).get("sha256")})
        except ValueError as e:
            raise ArtifactError(f"{where}: invalid model config: {e}") from None


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
    head's task, labels and direction."""
    labels, higher = (meta.labels, meta.higher_is_better) if task is None else (
        list(task.labels) if task.labels else None, task.higher_is_better)
    return {"task": (task or meta.task_def).name, "backbone": meta.model.backbone.name,
            "weights_sha256": meta.weights_sha256, "labels": labels, "higher_is_better": higher,
            "preprocess": meta.preprocess.to_mapping(), "provenance": meta.provenance}

