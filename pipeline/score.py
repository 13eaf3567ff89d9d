"""The scoring job: shards in (tars, Parquet, tables, folders of images), one Parquet table of scores per shard out.

    plan       list the shards, drop those already committed (before reading any)         driver      plan.py
    read       one task per shard reads it (a shard is a unit), whatever its kind         CPU tasks   inputs.py
    decode     bytes -> image -> uint8 crops, once per distinct preprocessing; a bad
               image becomes an error row, a broken shard one ``shard`` row with why      same tasks  decode.py
    score      every model on the crops, one backbone pass per model                      actor pool  here
    commit     the driver gathers each shard's rows; when all have arrived it writes the
               Parquet, then the marker (exactly once per shard, no shuffle)              driver      commit.py
    summary    counts, errors by reason, images/s, under DEST/_runs/                      driver      commit.py

Every shard sends exactly one control row (``status == "shard"``) carrying its sample count or the
reason it could not be read, so the driver knows when a shard is complete without a shuffle and
reports a broken shard instead of losing it. Images stay in the workers; only scores reach the driver.

This module holds the job's configuration, the models as the driver sees them, the model actor, and
all the job's Ray wiring (``run_score``, ``score_dataset``); the stages are plain functions and classes. ``commit.py`` is the one place that knows the output layout.
"""

from __future__ import annotations

import logging
import sys
import time
import types
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from perceptclip.commit import BASE_COLUMNS, COMMIT_WORKERS, ScoreWriter, check_destination, utc_now
from perceptclip.config import Config, require, setting
from perceptclip.decode import read_and_decode
from perceptclip.inputs import INPUT_FORMATS, InputSpec
from perceptclip.plan import Plan, plan_shards
from perceptclip.preprocess import DEFAULT_MAX_PIXELS, PreprocessConfig
from perceptclip.runs import RunProgress, RunSummary, write_summary
from perceptclip.storage import (StorageConfig, StorageError, redact, redact_text,
                                 storage_options)

if TYPE_CHECKING:   # annotations only: importing the job loads neither torch nor the model code
    from perceptclip.artifact import ArtifactMeta

log = logging.getLogger(__name__)

DECODE_MODES = ("cpu", "device")


# --- configuration -----------------------------------------------------------------------------------

@dataclass
class ScoreConfig(Config):
    """Everything the scoring job reads; ``configs/score.yaml`` documents each field."""

    input: list[str] = field(default_factory=list)
    output: str = ""
    models: list[str] = field(default_factory=list)
    address: str | None = None           # None: RAY_ADDRESS if set, else a local cluster
    overwrite: bool = False
    batch_size: int = setting(64, minimum=1)          # images per actor call; model calls: model_batch
    block_rows: int = setting(64, minimum=1)          # decoded images per block sent to the model actors
    batches_in_flight: int = setting(4, minimum=1)    # blocks sent to each model actor at a time
    decode: str = setting("cpu", choices=DECODE_MODES)  # "cpu": PIL in the read tasks; "device": on the model actors' device
    actors: int | None = setting(None, minimum=1)     # model actor pool size; None: one per GPU, else 1
    gpus_per_actor: float | None = setting(None, minimum=0)   # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = setting(1.0, minimum=0)
    cpus_per_reader: float = setting(1.0, minimum=0.01)       # CPUs reserved by each read + decode task
    reader_memory_mb: int = setting(1024, minimum=1)  # memory reserved by each read + decode task (it holds a shard)
    torch_threads: int | None = setting(None, minimum=1)      # None: the actor's CPU share, at least 1
    num_cpus: int | None = setting(None, minimum=1)   # local cluster only
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, minimum=1)  # larger images become error rows (too_large)
    sample_fraction: float | None = setting(None, above=0, maximum=1)   # dry run: score this seeded share of the shards
    sample_seed: int = setting(0, minimum=0)
    model_batch: int | None = setting(None, minimum=0)   # crops per model call; None: canonical; 0: unpadded
    input_format: str = setting("auto", choices=INPUT_FORMATS)   # auto: told by each shard's name and content
    image_column: str | None = None      # the column of images (Parquet) or of their locations (tables)
    key_column: str | None = None        # Parquet: the key; None: __key__, key or id when present, else the row number
    carry_columns: list[str] = field(default_factory=list)    # input columns copied into the score table
    fetch_workers: int = setting(32, minimum=1)       # tables, files: image requests in flight per read task
    fetch_timeout_s: float = setting(30.0, above=0)   # tables, files: a request unanswered by then is an error row
    files_per_shard: int = setting(1000, minimum=1)   # files: image files per virtual shard (new ones only)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def check(self):
        clash = sorted(set(self.carry_columns) & (set(BASE_COLUMNS) | {"ordinal", "shard_rows"}))
        require(not clash, "carry_columns", f"{', '.join(clash)}: already a column of the score table")
        require(len(set(self.carry_columns)) == len(self.carry_columns), "carry_columns", "a column named twice")

    def input_spec(self) -> InputSpec:       # what the read tasks need of this config
        return InputSpec(format=self.input_format, image_column=self.image_column, key_column=self.key_column,
                         carry_columns=tuple(self.carry_columns), fetch_workers=self.fetch_workers,
                         fetch_timeout_s=self.fetch_timeout_s)

    def validate(self) -> "ScoreConfig":
        """What a run needs beyond well-formed values; checked when a run starts."""
        require(bool(self.input), "input", "give at least one shard path, URL, pattern or URL list")
        require(bool(self.output), "output", "give a destination folder or object-store prefix")
        require(bool(self.models), "models", "give at least one model")
        require(self.address is None or self.num_cpus is None, "num_cpus",
                "only for a local cluster; an existing cluster (address) has its own")
        return self


def load_score_config(path: str | None = None, **overrides) -> ScoreConfig:
    """The config in YAML file ``path`` (if any) with ``overrides`` (the command line) on top."""
    import yaml

    data: dict = {}
    if path:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a score config is a mapping of options")
        try:
            ScoreConfig.from_mapping(loaded)        # the file alone: its own mistakes name the file
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        data = loaded
    data.update({k: v for k, v in overrides.items() if v is not None})
    return ScoreConfig.from_mapping(data).validate()


# --- models, as the driver sees them ------------------------------------------------------------------

@dataclass
class ModelSpec:
    """A model named on the command line: its output name, the reference the actors load, its metadata.
    The driver reads only ``config.json``; weights are loaded by the actors, once each."""

    name: str
    ref: str                  # resolved: an absolute path, a cache directory or a URI (what actors load)
    meta: ArtifactMeta
    given: str = ""           # as the user wrote it, for provenance
    batch: int | None = None  # crops per model call (ScoreConfig.model_batch); None: the canonical size

    @classmethod
    def resolve(cls, text: str, options: dict | None = None, batch: int | None = None) -> "ModelSpec":
        from perceptclip.artifact import read_meta
        from perceptclip.official import parse_model_ref, resolve_model

        name, base, head = parse_model_ref(text)
        resolved = resolve_model(base)             # the actors load exactly what the driver resolved
        meta = read_meta(resolved, options)
        return cls(name=meta.outputs(head, name)[0][1], ref=resolved + (f"#{head}" if head else ""), meta=meta,
                   given=base + (f"#{head}" if head else ""), batch=batch)

    @property
    def head(self) -> str | None:
        """The head picked with ``MODEL#HEAD``; None: the model's own choice (``ArtifactMeta.outputs``)."""
        return self.ref.rsplit("#", 1)[1] if "#" in self.ref else None

    @property
    def outputs(self) -> list[tuple]:
        """(head, name, task) of each head this model scores: one, or every head of a model of several tasks."""
        return self.meta.outputs(self.head, self.name if self.name != self.meta.task else None)

    @property
    def columns(self) -> list[str]:
        return [c for _, name, task in self.outputs for c in task.columns(name)]

    def describe(self) -> dict:
        """The model in the run summary and every table's metadata: task, labels and direction those of the
        head it scores. A model of several tasks lists every column and adds ``outputs``, each head's entry."""
        from perceptclip.artifact import describe

        base = {"ref": self.given or self.ref, "resolved": self.ref, "model_batch": self.model_batch()}
        outputs = [{"name": name, **base, "head": head if self.head or len(self.outputs) > 1 else None,
                    "columns": task.columns(name), **describe(self.meta, task)} for head, name, task in self.outputs]
        return outputs[0] if len(outputs) == 1 else {**outputs[0], "head": None, "columns": self.columns,
                                                     "outputs": outputs}

    def model_batch(self) -> int | dict[str, int]:
        """Crops per model call: as configured, else the canonical size for each device type."""
        from perceptclip.scorer import canonical_batch

        if self.batch is not None:
            return self.batch
        return {device: canonical_batch(device, self.meta.model) for device in ("cpu", "cuda")}


def check_columns(models: list[ModelSpec], carried: list[str] = ()) -> None:
    """Refuse, before any work, two score columns of one name, or one named as a base or carried column."""
    seen = set(BASE_COLUMNS)
    for model in models:
        for column in model.columns:
            if column in seen or column in carried:
                what = "a carried column" if column in carried else "two outputs"
                fix = (f"name the model NAME=MODEL, e.g. --model {model.name}_2={model.given or model.ref}" if
                       len(model.outputs) == 1 else f"score its heads apart: NAME=MODEL#HEAD ({model.meta.model.heads})")
                raise ValueError(f"models: {what} would be called {column!r}; {fix}")
            seen.add(column)


def distinct_preprocessing(models: list[ModelSpec]) -> tuple[list[PreprocessConfig], list[int]]:
    """Each preprocessing once (decode once, crop once per distinct recipe) and which one each model uses."""
    configs: list[PreprocessConfig] = []
    index: list[int] = []
    for model in models:
        if model.meta.preprocess not in configs:
            configs.append(model.meta.preprocess)
        index.append(configs.index(model.meta.preprocess))
    return configs, index


# --- score (actor pool) --------------------------------------------------------------------------------

class ModelActor:
    """Ray Data stage: decoded blocks -> score rows. Loads every model once, when the actor starts."""

    def __init__(self, models: list[tuple[str, str, int | None]], crops_index: list[int], torch_threads: int | None,
                 options: dict | None = None, preprocessing: list[PreprocessConfig] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        from perceptclip.model import import_open_clip_for_scoring

        import_open_clip_for_scoring()          # before anything imports open_clip: skips its transformers
        import torch

        from perceptclip.scorer import Scorer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        # the run's storage options travel with the job: workers may hold no credentials of their own
        self.scorers = [Scorer.load(ref, name=name, storage_options=options, batch=batch)
                        for name, ref, batch in models]
        self.crops_index = crops_index
        self.preprocessing, self.max_pixels = preprocessing, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if "data" in batch:                                  # decode: device
            from perceptclip.device_decode import decode_block

            batch = decode_block(batch, self.preprocessing, self.scorers[0].device, self.max_pixels)
        return score_block(batch, self.scorers, self.crops_index)


def score_block(batch: dict[str, np.ndarray], scorers, crops_index: list[int]) -> pa.Table:
    """Score the ok rows of ``batch`` with every scorer; error and control rows get null scores."""
    import torch

    ok = np.flatnonzero(batch["status"] == "ok")
    n = len(batch["status"])
    # A text column that is null in every row of a block comes back from Ray as floats: keep strings only.
    columns: dict[str, pa.Array] = {
        name: pa.array([v if isinstance(v, str) else None for v in batch[name]], type=pa.string())
        for name in ("shard", "key", "status", "error", "url", "caption", "carried") if name in batch
    }
    columns["ordinal"] = pa.array(batch["ordinal"], type=pa.int64())
    columns["shard_rows"] = pa.array(batch["shard_rows"], type=pa.int64())
    for name in ("width", "height"):
        columns[name] = pa.array(batch[name], type=pa.int32(), mask=batch[name] < 0)
    missing = np.ones(n, dtype=bool)
    missing[ok] = False
    for scorer, i in zip(scorers, crops_index):
        crops = batch[f"crops_{i}"]                       # numpy from the read tasks, a tensor if decoded here
        if isinstance(crops, np.ndarray):
            # Ray Data hands a block over as a read-only view of its object store, torch wants writable memory:
            # the image rows, gathered in one copy (pinned for a GPU: the copy the scorer makes to pin them)
            rows = torch.empty((len(ok), *crops.shape[1:]), dtype=torch.uint8, pin_memory=scorer.device.type == "cuda")
            np.take(crops, ok, axis=0, out=rows.numpy(), mode="clip")    # clip: unbuffered (ok is in range)
            crops = rows
        elif len(ok) < n:                                 # error and control rows have no image
            crops = crops[torch.as_tensor(ok, device=crops.device)]
        outputs = scorer.score(crops)                     # (rows, crops, 3, S, S) as one tensor
        for name, values in scorer.columns(outputs).items():
            full = np.empty(n, dtype=object if isinstance(values, list) else np.float32)
            full[ok] = values
            columns[name] = pa.array(full, type=pa.string() if isinstance(values, list) else pa.float32(),
                                     mask=missing)
    return pa.table(columns)


# --- the job: all Ray wiring is here -------------------------------------------------------------------

def run_score(cfg: ScoreConfig, progress: Callable[[str], None] = log.info) -> RunSummary:
    """Score every shard ``cfg.input`` names that is not yet committed under ``cfg.output``."""
    cfg.validate()
    started = time.perf_counter()
    options = storage_options(cfg.storage)
    check_destination(cfg.output, options)
    models = [ModelSpec.resolve(m, options, batch=cfg.model_batch) for m in cfg.models]
    check_columns(models, cfg.carry_columns)
    plan = plan_shards(cfg, options)
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    summary = RunSummary(run_id=run_id, output=cfg.output, started_at=utc_now(),
                         models=[m.describe() for m in models], storage=redact(options),
                         planned=plan.total, skipped=len(plan.skipped))
    if cfg.sample_fraction is not None:
        summary.sample = {"fraction": cfg.sample_fraction, "seed": cfg.sample_seed, "not_sampled": plan.not_sampled}
        progress(f"dry run: a seeded sample of {plan.total} shards; {plan.not_sampled} left out")
    progress(f"{plan.total} shards: {len(plan.todo)} to score, {len(plan.skipped)} already committed")
    try:
        if plan.todo:
            _execute(cfg, plan, models, options, summary, started, progress)
    except BaseException as e:
        # what was committed stays committed (a rerun resumes); the summary says where the run stopped
        summary.aborted = redact_text(f"{type(e).__name__}: {e}", options)
        summary.duration_s = time.perf_counter() - started
        progress(f"stopped with {len(summary.done)} of {len(plan.todo)} shards committed by this run and "
                 f"{len(summary.failed)} failed; a rerun scores the rest")
        try:
            write_summary(summary, options)
        except StorageError as lost:
            # the summary often lives on the store that just failed: the run's own error is the one to raise
            progress(str(lost))
        raise
    summary.duration_s = time.perf_counter() - started
    write_summary(summary, options)
    return summary


def score_dataset(cfg: ScoreConfig, shards: list[str], models: list[ModelSpec], options: dict):
    """The Ray Data pipeline from shard URLs to score rows (one pyarrow block per decoded block, plus each
    shard's control row). Needs a connected Ray; consuming it is the caller's business (``_execute``
    commits the rows; the stage benchmark discards them)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    gpus_per_actor = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1 if gpus else 0)
    actors = cfg.actors or (max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else 1)
    preprocessing, crops_index = distinct_preprocessing(models)
    threads = cfg.torch_threads or max(1, int(cfg.cpus_per_actor))

    ds = ray.data.from_items([{"shard": u} for u in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(read_and_decode, batch_size=1, batch_format="numpy",
                        fn_kwargs={"preprocessing": preprocessing, "options": options,
                                   "block_rows": cfg.block_rows, "max_pixels": cfg.max_pixels,
                                   "decode": cfg.decode, "inputs": cfg.input_spec()},
                        num_cpus=cfg.cpus_per_reader,
                        # A read task holds a whole shard. Reserving memory for it also keeps Ray Data from
                        # fusing this stage into the model actors (it fuses stages with equal resources),
                        # where decoding would run on a few actors instead of on every CPU of the cluster.
                        memory=cfg.reader_memory_mb * 2**20)
    ds = ds.map_batches(ModelActor, batch_size=cfg.batch_size, batch_format="numpy",
                        fn_constructor_args=([(m.name, m.ref, m.batch) for m in models], crops_index, threads, options,
                                             preprocessing, cfg.max_pixels),
                        compute=ray.data.ActorPoolStrategy(size=actors,
                                                           max_tasks_in_flight_per_actor=cfg.batches_in_flight),
                        num_gpus=gpus_per_actor, num_cpus=cfg.cpus_per_actor)
    return ds


def _execute(cfg: ScoreConfig, plan: Plan, models: list[ModelSpec], options: dict, summary: RunSummary,
             started: float, progress: Callable[[str], None]) -> None:
    import ray

    from perceptclip.console import Console, ShardTally, ray_output

    console = progress if isinstance(progress, Console) else None
    started_ray = not ray.is_initialized()
    # with a console, Ray's own output goes to the session's logs (unless verbose) and our bar replaces its
    with ray_output(console) as output:
        if started_ray:
            # no address and no RAY_ADDRESS: ray.init starts a local cluster, the embedded default
            ray.init(address=cfg.address, num_cpus=cfg.num_cpus, include_dashboard=False,
                     log_to_driver=output.shown)
        output.keep_in_session()
        try:
            ds = score_dataset(cfg, plan.todo, models, options)

            # commits run on a few threads of the driver while it goes on pulling rows (docs/scoring.md)
            writer = ScoreWriter(cfg.output, options, models, summary.run_id, cfg.overwrite, workers=COMMIT_WORKERS)
            # with a console, the tally says a failed shard and shows the rest on the bar, not a line each
            tally = ShardTally(console, len(plan.todo)) if console else None
            report = RunProgress(summary, len(plan.todo), started, tally.say if tally else progress, show=tally)
            try:
                for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    if tally is not None:
                        tally.block(block["status"].to_pylist())
                    report(writer.add(block))
                report(writer.finish())
            finally:
                report(writer.close())      # stopped early: the commits in flight settle, and count
            report.finish()
            lost = writer.pending()
            if lost:
                raise RuntimeError(f"shards with missing rows at the end of the run: {', '.join(lost)}")
        finally:
            if started_ray:
                ray.shutdown()


# --- ``perceptclip.score(...)`` ---------------------------------------------------------------------------

class _CallableModule(types.ModuleType):
    """This module is also the API's ``perceptclip.score``: once it is imported, Python makes it the
    package's ``score`` attribute, so calling it runs ``perceptclip.api.score``."""

    def __call__(self, *args, **kwargs) -> RunSummary:
        from perceptclip.api import score

        return score(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
