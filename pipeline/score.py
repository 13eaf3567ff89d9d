"""The scoring job: WebDataset shards in, one Parquet table of scores per shard out.

    plan       list the shards, drop those already committed (before reading any)         driver
    read       one task per shard reads the whole tar (a shard is a unit)                 CPU tasks
    decode     bytes -> image -> uint8 crops, once per distinct preprocessing; a bad
               image becomes an error row, a broken shard one ``shard`` row with why      same CPU tasks
    score      every model on the crops, one backbone pass per model                      actor pool
    commit     the driver gathers each shard's rows; when all have arrived it writes the
               Parquet, then the marker (exactly once per shard, no shuffle)              driver
    summary    counts, errors by reason, images/s, under DEST/_runs/                      driver

Every shard sends exactly one control row (``status == "shard"``) carrying its sample count or the
reason it could not be read, so the driver knows when a shard is complete without a shuffle and
reports a broken shard instead of losing it. Images stay in the workers; only scores reach the driver.
All Ray wiring lives in ``run_score``; the stages are plain functions and classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from perceptclip import __version__
from perceptclip.preprocess import DEFAULT_MAX_PIXELS, ImageError, PreprocessConfig, decode_image, preprocess
from perceptclip.shards import ShardError, expand_shards, image_member, read_shard, sample_info, shard_name
from perceptclip.storage import (StorageConfig, StorageError, filesystem, join, protocol, redact, redact_text,
                              storage_error, storage_options)

if TYPE_CHECKING:   # the decode tasks import this module: they need neither torch nor the model code
    from perceptclip.artifact import ArtifactMeta

log = logging.getLogger(__name__)

MARKERS_DIR = "_markers"
RUNS_DIR = "_runs"
METADATA_KEY = b"perceptclip"
BASE_COLUMNS = ("key", "shard", "status", "error", "width", "height", "url", "caption")
SHARD_ROW = "shard"          # status of a shard's control row; never written to a table
DECODE_MODES = ("cpu", "device")


# --- configuration -----------------------------------------------------------------------------------

@dataclass
class ScoreConfig:
    """Everything the scoring job reads; ``configs/score.yaml`` documents each field."""

    input: list[str] = field(default_factory=list)
    output: str = ""
    models: list[str] = field(default_factory=list)
    address: str | None = None           # None: RAY_ADDRESS if set, else a local cluster
    overwrite: bool = False
    batch_size: int = 64                  # images per model call
    block_rows: int = 64                  # decoded images per block sent to the model actors
    batches_in_flight: int = 4            # blocks sent to each model actor at a time
    decode: str = "cpu"                   # "cpu": PIL in the read tasks; "device": on the model actors' device
    actors: int | None = None             # model actor pool size; None: one per GPU, else 1
    gpus_per_actor: float | None = None   # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    cpus_per_reader: float = 1.0          # CPUs reserved by each read + decode task
    reader_memory_mb: int = 1024          # memory reserved by each read + decode task (it holds a shard)
    torch_threads: int | None = None      # None: the actor's CPU share, at least 1
    num_cpus: int | None = None           # local cluster only
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images become error rows (too_large)
    sample_fraction: float | None = None  # dry run: score only this seeded random share of the shards
    sample_seed: int = 0
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self):
        if isinstance(self.input, str):
            self.input = [self.input]
        if isinstance(self.models, str):
            self.models = [self.models]
        if isinstance(self.storage, dict):
            self.storage = _from_mapping(StorageConfig, self.storage, "storage.")

    def validate(self) -> "ScoreConfig":
        """Fail at start, naming the field, rather than an hour into a cluster job."""
        if not self.input:
            raise ValueError("input: give at least one shard path, URL, pattern or URL list")
        if not self.output:
            raise ValueError("output: give a destination folder or object-store prefix")
        if not self.models:
            raise ValueError("models: give at least one model")
        for name in ("batch_size", "block_rows", "batches_in_flight", "max_pixels", "reader_memory_mb"):
            _check(name, getattr(self, name), int, minimum=1)
        for name in ("actors", "torch_threads", "num_cpus"):
            if getattr(self, name) is not None:
                _check(name, getattr(self, name), int, minimum=1)
        _check("cpus_per_actor", self.cpus_per_actor, (int, float), minimum=0)
        _check("cpus_per_reader", self.cpus_per_reader, (int, float), minimum=0.01)
        if self.gpus_per_actor is not None:
            _check("gpus_per_actor", self.gpus_per_actor, (int, float), minimum=0)
        if self.sample_fraction is not None:
            _check("sample_fraction", self.sample_fraction, (int, float), minimum=0)
            if not 0 < self.sample_fraction <= 1:
                raise ValueError(f"sample_fraction: must be in (0, 1], got {self.sample_fraction!r}")
        _check("sample_seed", self.sample_seed, int, minimum=0)
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode: must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        if self.address is not None and self.num_cpus is not None:
            raise ValueError("num_cpus: only for a local cluster; an existing cluster (address) has its own")
        return self


def _check(name: str, value, types, minimum) -> None:
    if isinstance(value, bool) or not isinstance(value, types) or value < minimum:
        kind = "an integer" if types is int else "a number"
        raise ValueError(f"{name}: must be {kind} >= {minimum}, got {value!r}")


def _from_mapping(cls, data: dict, prefix: str = ""):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown option; known: {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ValueError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def load_score_config(path: str | None = None, **overrides) -> ScoreConfig:
    """The config in YAML file ``path`` (if any) with ``overrides`` (the command line) on top."""
    import yaml

    data: dict = {}
    if path:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a score config is a mapping of options")
        data = loaded
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _from_mapping(ScoreConfig, data).validate()


# --- models, as the driver sees them ------------------------------------------------------------------

@dataclass
class ModelSpec:
    """A model named on the command line: its output name, the reference the actors load, its metadata.
    The driver reads only ``config.json``; weights are loaded by the actors, once each."""

    name: str
    ref: str                  # resolved: an absolute path, a cache directory or a URI (what actors load)
    meta: ArtifactMeta
    given: str = ""           # as the user wrote it, for provenance

    @classmethod
    def resolve(cls, text: str, options: dict | None = None) -> "ModelSpec":
        from perceptclip.official import parse_model_ref, resolve_model

        name, base, head = parse_model_ref(text)
        resolved = resolve_model(base)             # the actors load exactly what the driver resolved
        from perceptclip.artifact import read_meta

        meta = read_meta(resolved, options)
        return cls(name=name or meta.task, ref=resolved + (f"#{head}" if head else ""), meta=meta,
                   given=base + (f"#{head}" if head else ""))

    @property
    def columns(self) -> list[str]:
        if self.meta.labels is None:
            return [self.name]
        return [self.name] + [f"{self.name}_{label}" for label in self.meta.labels]

    def describe(self) -> dict:
        from perceptclip.artifact import describe

        head = self.ref.rsplit("#", 1)[1] if "#" in self.ref else None
        return {"name": self.name, "ref": self.given or self.ref, "resolved": self.ref, "head": head,
                "columns": self.columns, **describe(self.meta)}


def check_columns(models: list[ModelSpec]) -> None:
    seen = set(BASE_COLUMNS)
    for model in models:
        for column in model.columns:
            if column in seen:
                raise ValueError(f"models: two outputs would be called {column!r}; name one NAME=MODEL, "
                                 f"e.g. --model {model.name}_2={model.given or model.ref}")
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


# --- plan ----------------------------------------------------------------------------------------------

@dataclass
class Plan:
    todo: list[str]
    skipped: list[str]
    not_sampled: int = 0       # shards left out by sample_fraction

    @property
    def total(self) -> int:
        return len(self.todo) + len(self.skipped)


def committed_names(dest: str, options: dict) -> set[str]:
    """Names of the shards with a marker under ``dest``: one listing, no reads."""
    fs, root = filesystem(join(dest, MARKERS_DIR), options)
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return set()
    return {e.rsplit("/", 1)[-1].removesuffix(".json") for e in entries if e.endswith(".json")}


def plan_shards(cfg: ScoreConfig, options: dict) -> Plan:
    urls = expand_shards(cfg.input, options)
    by_name: dict[str, str] = {}
    for url in urls:
        other = by_name.setdefault(shard_name(url), url)
        if other != url:
            # outputs are named after shards so users can join them; two shards cannot share one
            raise ValueError(f"input: {other} and {url} would both write {shard_name(url)}.parquet; "
                             f"score them into different outputs")
    listed = len(urls)
    if cfg.sample_fraction is not None:
        urls = sample_shards(urls, cfg.sample_fraction, cfg.sample_seed)
    done = set() if cfg.overwrite else committed_names(cfg.output, options)
    return Plan(todo=[u for u in urls if shard_name(u) not in done],
                skipped=[u for u in urls if shard_name(u) in done], not_sampled=listed - len(urls))


def sample_shards(urls: list[str], fraction: float, seed: int) -> list[str]:
    """A seeded random share of ``urls`` (at least one), in listing order. Drawn by shard name, so the
    same listing and seed give the same sample wherever the shards live and whatever ran before."""
    import random

    count = max(1, round(fraction * len(urls)))
    chosen = set(random.Random(seed).sample(sorted(shard_name(u) for u in urls), count))
    return [u for u in urls if shard_name(u) in chosen]


# --- read + decode (CPU tasks) -------------------------------------------------------------------------

def decode_samples(shard: str, samples: list[dict], start: int, preprocessing: list[PreprocessConfig],
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """One block of rows: sample metadata, status and, per preprocessing ``i``, uint8 crops ``crops_i``
    (n, crops, 3, S, S). A sample that cannot be decoded, or that the reader refused (``__error__``:
    a link, a duplicated key), is an error row with zero crops: one row per sample, whatever it holds."""
    block, images = sample_block(shard, samples, start)
    n = len(samples)
    crops = [np.zeros((n, p.crops if p.kind == "multi_crop" else 1, 3, p.size, p.size), np.uint8)
             for p in preprocessing]
    status, error, width, height = block["status"], block["error"], block["width"], block["height"]
    for i, data in enumerate(images):
        if data is None:
            continue
        try:
            img = decode_image(data, max_pixels=max_pixels)
            width[i], height[i] = img.info.get("source_size", img.size)
            for out, p in zip(crops, preprocessing):
                out[i] = preprocess(img, p)
        except ImageError as e:
            status[i], error[i] = "error", str(e)
        except Exception as e:  # a preprocessing bug on one odd image must not fail the whole run
            status[i], error[i] = "error", f"preprocess_failed: {type(e).__name__}: {e}"
    block.update({f"crops_{i}": c for i, c in enumerate(crops)})
    return block


def encoded_samples(shard: str, samples: list[dict], start: int) -> dict[str, np.ndarray]:
    """One block of rows for ``decode: device``: sample metadata and each image's encoded bytes in
    ``data`` (empty in error rows); the model actor decodes them on its device."""
    block, images = sample_block(shard, samples, start)
    # never None: a block whose column holds no bytes at all would reach Arrow as another type
    data = np.empty(len(images), dtype=object)
    data[:] = [b"" if d is None else d for d in images]
    block["data"] = data
    return block


def sample_block(shard: str, samples: list[dict], start: int) -> tuple[dict[str, np.ndarray], list[bytes | None]]:
    """The columns every row has, and each sample's image bytes. A sample that the reader refused
    (``__error__``: a link, a duplicated key) or that holds no image is already an error row (None)."""
    n = len(samples)
    status, error = np.full(n, "ok", dtype=object), np.full(n, None, dtype=object)
    images: list[bytes | None] = []
    for i, sample in enumerate(samples):
        ext = image_member(sample)
        if "__error__" in sample:
            status[i], error[i] = "error", sample["__error__"]
        elif ext is None:
            status[i], error[i] = "error", str(ImageError(
                "no_image", f"no image file among {sorted(k for k in sample if k != '__key__')}"))
        images.append(sample[ext] if status[i] == "ok" else None)
    info = [sample_info(s) for s in samples]
    block = {
        "shard": np.full(n, shard, dtype=object),
        "ordinal": np.arange(start, start + n, dtype=np.int64),
        "key": np.array([s["__key__"] for s in samples], dtype=object),
        "status": status, "error": error,
        "width": np.full(n, -1, np.int32), "height": np.full(n, -1, np.int32),
        "url": np.array([x["url"] for x in info], dtype=object),
        "caption": np.array([x["caption"] for x in info], dtype=object),
        "shard_rows": np.full(n, -1, np.int64),
    }
    return block, images


def shard_row(shard: str, rows: int, error: ShardError | None, preprocessing: list[PreprocessConfig],
              decode: str = "cpu") -> dict:
    """The control row: how many samples the shard holds, or why it could not be read."""
    # the block schema, zero rows: Ray Data batches blocks together, so every block has the same columns
    empty = decode_samples(shard, [], 0, preprocessing) if decode == "cpu" else encoded_samples(shard, [], 0)
    row = {name: np.zeros((1, *col.shape[1:]), col.dtype) for name, col in empty.items()}
    row.update(shard=np.array([shard], dtype=object), ordinal=np.array([-1]), key=np.array([None], dtype=object),
               status=np.array([SHARD_ROW], dtype=object), error=np.array([str(error) if error else None], dtype=object),
               width=np.array([-1], np.int32), height=np.array([-1], np.int32), url=np.array([None], dtype=object),
               caption=np.array([None], dtype=object), shard_rows=np.array([rows]))
    if "data" in row:
        row["data"] = np.array([b""], dtype=object)
    return row


def read_and_decode(batch: dict[str, np.ndarray], preprocessing: list[PreprocessConfig], options: dict,
                    block_rows: int, max_pixels: int, decode: str = "cpu") -> Iterator[dict[str, np.ndarray]]:
    """Ray Data stage: a batch naming shards -> blocks of each shard's samples, then its control row.
    ``decode: cpu`` decodes and crops here; ``device`` sends the encoded images to the model actors."""
    for shard in batch["shard"]:
        shard = str(shard)
        try:
            samples = read_shard(shard, options)
        except ShardError as e:
            yield shard_row(shard, 0, e, preprocessing, decode)
            continue
        for start in range(0, len(samples), block_rows):
            part = samples[start:start + block_rows]
            yield decode_samples(shard, part, start, preprocessing, max_pixels) if decode == "cpu" \
                else encoded_samples(shard, part, start)
        yield shard_row(shard, len(samples), None, preprocessing, decode)


# --- score (actor pool) --------------------------------------------------------------------------------

class ModelActor:
    """Ray Data stage: decoded blocks -> score rows. Loads every model once, when the actor starts."""

    def __init__(self, models: list[tuple[str, str]], crops_index: list[int], torch_threads: int | None,
                 options: dict | None = None, preprocessing: list[PreprocessConfig] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        from perceptclip.model import import_open_clip_for_scoring

        import_open_clip_for_scoring()          # before anything imports open_clip: skips its transformers
        import torch

        from perceptclip.scorer import Scorer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        # the run's storage options travel with the job: workers may hold no credentials of their own
        self.scorers = [Scorer.load(ref, name=name, storage_options=options) for name, ref in models]
        self.crops_index = crops_index
        self.preprocessing, self.max_pixels = preprocessing, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if "data" in batch:                                  # decode: device
            batch = decode_block(batch, self.preprocessing, self.scorers[0].device, self.max_pixels)
        return score_block(batch, self.scorers, self.crops_index)


def decode_block(batch: dict[str, np.ndarray], preprocessing: list[PreprocessConfig], device,
                 max_pixels: int) -> dict:
    """An ``encoded_samples`` block -> the same rows with their crops on ``device`` (``crops_i`` tensors),
    as ``decode_samples`` gives them on the CPU; an image that cannot be decoded becomes an error row."""
    import torch

    from perceptclip.device_decode import decode_on_device

    todo = np.flatnonzero(batch["status"] == "ok")
    out = decode_on_device([bytes(batch["data"][i]) for i in todo], preprocessing, device, max_pixels)
    block = {name: col.copy() for name, col in batch.items() if name != "data"}
    for name in ("status", "error", "width", "height"):
        block[name][todo] = getattr(out, name)
    for i, crops in enumerate(out.crops):
        full = torch.zeros((len(block["status"]), *crops.shape[1:]), dtype=torch.uint8, device=crops.device)
        full[torch.as_tensor(todo, device=crops.device)] = crops
        block[f"crops_{i}"] = full
    return block


def score_block(batch: dict[str, np.ndarray], scorers, crops_index: list[int]) -> pa.Table:
    """Score the ok rows of ``batch`` with every scorer; error and control rows get null scores."""
    import torch

    ok = np.flatnonzero(batch["status"] == "ok")
    n = len(batch["status"])
    # A text column that is null in every row of a block comes back from Ray as floats: keep strings only.
    columns: dict[str, pa.Array] = {
        name: pa.array([v if isinstance(v, str) else None for v in batch[name]], type=pa.string())
        for name in ("shard", "key", "status", "error", "url", "caption")
    }
    columns["ordinal"] = pa.array(batch["ordinal"], type=pa.int64())
    columns["shard_rows"] = pa.array(batch["shard_rows"], type=pa.int64())
    for name in ("width", "height"):
        columns[name] = pa.array(batch[name], type=pa.int32(), mask=batch[name] < 0)
    missing = np.ones(n, dtype=bool)
    missing[ok] = False
    for scorer, i in zip(scorers, crops_index):
        crops = torch.as_tensor(batch[f"crops_{i}"])      # numpy from the read tasks, a tensor if decoded here
        if len(ok) < n:                                   # error and control rows have no image
            crops = crops[torch.as_tensor(ok, device=crops.device)]
        outputs = scorer.score(crops)                     # (rows, crops, 3, S, S) as one array: no copy
        for name, values in scorer.columns(outputs).items():
            full = np.empty(n, dtype=object if isinstance(values, list) else np.float32)
            full[ok] = values
            columns[name] = pa.array(full, type=pa.string() if isinstance(values, list) else pa.float32(),
                                     mask=missing)
    return pa.table(columns)


# --- commit (driver) -----------------------------------------------------------------------------------

@dataclass
class ShardResult:
    shard: str
    rows: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    failed: str | None = None           # why the shard could not be read
    output: str | None = None


class ScoreWriter:
    """Gathers score rows per shard on the driver and commits each shard once all its rows are in:
    Parquet first, then the marker. A shard is done only when its marker exists; object stores have
    no rename, so nothing here depends on one. A rerun overwrites any Parquet left without a marker."""

    def __init__(self, dest: str, options: dict, models: list[ModelSpec], run_id: str, overwrite: bool):
        self.dest, self.options, self.models, self.run_id = dest, options, models, run_id
        self.overwrite = overwrite
        self.fs, self.root = filesystem(dest, options)
        self.fs.makedirs(join(self.root, MARKERS_DIR), exist_ok=True)
        self.parts: dict[str, list[pa.Table]] = defaultdict(list)
        self.received: Counter = Counter()
        self.expected: dict[str, int] = {}
        self.failed: dict[str, str] = {}
        self.finished: set[str] = set()

    def add(self, table: pa.Table) -> list[ShardResult]:
        """Take one block of score rows; returns the shards it completed (committed or failed)."""
        import pyarrow.compute as pc

        touched = []
        for shard in pc.unique(table["shard"]).to_pylist():
            rows = table.filter(pc.equal(table["shard"], shard))
            control = rows.filter(pc.equal(rows["status"], SHARD_ROW))
            samples = rows.filter(pc.not_equal(rows["status"], SHARD_ROW))
            if samples.num_rows:
                self.parts[shard].append(samples)
                self.received[shard] += samples.num_rows
            for row in control.select(["shard_rows", "error"]).to_pylist():
                if row["error"] is not None:
                    self.failed[shard] = row["error"]
                else:
                    self.expected[shard] = row["shard_rows"]
            touched.append(shard)
        return [result for shard in touched if (result := self._maybe_finish(shard)) is not None]

    def _maybe_finish(self, shard: str) -> ShardResult | None:
        if shard in self.finished:
            raise RuntimeError(f"{shard}: rows arrived after the shard was finished")
        if shard in self.failed:
            self.parts.pop(shard, None)
            self.finished.add(shard)
            return ShardResult(shard=shard, failed=self.failed[shard])
        if shard not in self.expected or self.received[shard] < self.expected[shard]:
            return None
        if self.received[shard] != self.expected[shard]:
            raise RuntimeError(f"{shard}: received {self.received[shard]} rows for {self.expected[shard]} samples")
        self.finished.add(shard)
        return self.commit(shard, self.parts.pop(shard, []))

    def table(self, shard: str, parts: list[pa.Table]) -> pa.Table:
        columns = list(BASE_COLUMNS) + [c for m in self.models for c in m.columns]
        if parts:
            table = pa.concat_tables(parts).sort_by("ordinal")
        else:
            table = self.empty_table()
        table = table.select(columns)
        metadata = {
            "format": "perceptclip-scores", "format_version": 1, "package_version": __version__,
            "run_id": self.run_id, "shard": shard, "models": [m.describe() for m in self.models],
        }
        return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})

    def empty_table(self) -> pa.Table:
        fields = [pa.field(c, pa.int32() if c in ("width", "height") else pa.string()) for c in BASE_COLUMNS]
        fields.append(pa.field("ordinal", pa.int64()))
        for m in self.models:
            fields += [pa.field(c, pa.string() if m.meta.labels and c == m.name else pa.float32()) for c in m.columns]
        return pa.schema(fields).empty_table()

    def commit(self, shard: str, parts: list[pa.Table]) -> ShardResult:
        import pyarrow.parquet as pq

        name = shard_name(shard)
        table = self.table(shard, parts)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        output = join(self.root, f"{name}.parquet")
        marker = join(self.root, MARKERS_DIR, f"{name}.json")
        statuses = Counter(table["status"].to_pylist())
        errors = Counter(e.split(":", 1)[0] for e in table["error"].to_pylist() if e is not None)
        result = ShardResult(shard=shard, rows=table.num_rows, ok=statuses["ok"], errors=errors,
                             output=join(self.dest, f"{name}.parquet"))
        try:
            if self.overwrite and self.fs.exists(marker):
                self.fs.rm_file(marker)     # the shard is not done while its Parquet is being replaced
            self.fs.pipe_file(output, data)
            # only once the whole table is stored (one put: a failed put leaves no part of it visible)
            self.fs.pipe_file(marker, json.dumps({
                "shard": shard, "output": result.output, "rows": result.rows, "ok": result.ok,
                "errors": sum(errors.values()), "errors_by_reason": dict(errors),
                "models": [{"name": m.name, "ref": m.given or m.ref, "weights_sha256": m.meta.weights_sha256}
                           for m in self.models],
                "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "run_id": self.run_id,
                "committed_at": _now(),
            }, indent=2).encode())
        except Exception as e:  # after the client's own retries: an outage or a revoked permission
            raise storage_error(f"commit {name}", self.dest, e, self.options) from None
        return result

    def pending(self) -> list[str]:
        """Shards that sent rows but never completed: must be empty at the end of a run."""
        return sorted((set(self.parts) | set(self.expected) | set(self.failed)) - self.finished)


def check_destination(dest: str, options: dict) -> None:
    """Fail before any model is loaded or shard read when nothing can be written under ``dest`` (a
    read-only mount, a missing bucket, a role without write access), rather than after the first
    shard is scored. Writes an empty object under ``_runs/`` and removes it."""
    probe = join(dest, RUNS_DIR, f".write-check-{uuid.uuid4().hex}")
    try:
        fs, path = filesystem(probe, options)
        if protocol(dest) == "file":
            # only local folders: object stores have none, and s3fs's makedirs would create a missing bucket
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, b"")
    except Exception as e:
        raise StorageError(redact_text(f"output: cannot write under {dest}: {type(e).__name__}: {e}", options)) from None
    try:
        fs.rm_file(path)
    except Exception as e:  # a store may grant writes but not deletes; scoring only writes
        log.warning("%s", redact_text(f"could not remove {probe}: {type(e).__name__}: {e}", options))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- summary -------------------------------------------------------------------------------------------

@dataclass
class RunSummary:
    run_id: str
    output: str
    started_at: str
    models: list[dict]
    storage: dict
    planned: int = 0
    skipped: int = 0
    sample: dict | None = None           # a dry run's sample_fraction, seed and shards left out
    done: list[ShardResult] = field(default_factory=list)
    failed: list[ShardResult] = field(default_factory=list)
    duration_s: float = 0.0
    startup_s: float | None = None       # from start to the first committed shard
    steady_images_per_s: float | None = None
    aborted: str | None = None           # why the run stopped before the end, if it did

    @property
    def ok(self) -> bool:
        return not self.failed and self.aborted is None

    def to_dict(self) -> dict:
        errors: Counter = Counter()
        for r in self.done:
            errors.update(r.errors)
        ok = sum(r.ok for r in self.done)
        rows = sum(r.rows for r in self.done)
        return {
            "run_id": self.run_id, "package_version": __version__, "output": self.output,
            "started_at": self.started_at, "duration_s": round(self.duration_s, 3),
            "startup_s": None if self.startup_s is None else round(self.startup_s, 3),
            "sample": self.sample,
            "shards": {"planned": self.planned, "done": len(self.done), "skipped": self.skipped,
                       "failed": len(self.failed)},
            "failed_shards": [{"shard": r.shard, "reason": r.failed.split(":", 1)[0], "message": r.failed}
                              for r in self.failed],
            "samples": {"total": rows, "ok": ok, "error": rows - ok, "errors_by_reason": dict(errors)},
            "images_per_s": round(rows / self.duration_s, 2) if self.duration_s else None,
            "steady_images_per_s": None if self.steady_images_per_s is None else round(self.steady_images_per_s, 2),
            "aborted": self.aborted,
            "outputs": [r.output for r in self.done],
            "models": self.models, "storage": self.storage,
        }


def write_summary(summary: RunSummary, options: dict) -> str:
    path = join(summary.output, RUNS_DIR, f"{summary.run_id}.json")
    try:
        fs, p = filesystem(path, options)
        if protocol(path) == "file":        # as in check_destination: object stores have no folders
            fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(p, json.dumps(summary.to_dict(), indent=2).encode())
    except Exception as e:
        raise storage_error("write the run summary", path, e, options) from None
    return path


# --- the job: all Ray wiring is here -------------------------------------------------------------------

def run_score(cfg: ScoreConfig, progress: Callable[[str], None] = log.info) -> RunSummary:
    """Score every shard ``cfg.input`` names that is not yet committed under ``cfg.output``."""
    cfg.validate()
    started = time.perf_counter()
    options = storage_options(cfg.storage)
    check_destination(cfg.output, options)
    models = [ModelSpec.resolve(m, options) for m in cfg.models]
    check_columns(models)
    plan = plan_shards(cfg, options)
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    summary = RunSummary(run_id=run_id, output=cfg.output, started_at=_now(),
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
                                   "decode": cfg.decode},
                        num_cpus=cfg.cpus_per_reader,
                        # A read task holds a whole shard. Reserving memory for it also keeps Ray
                        # Data from fusing this stage into the model actors (it fuses stages with
                        # equal resources), where decoding would run on a few actors instead of
                        # on every CPU of the cluster.
                        memory=cfg.reader_memory_mb * 2**20)
    ds = ds.map_batches(ModelActor, batch_size=cfg.batch_size, batch_format="numpy",
                        fn_constructor_args=([(m.name, m.ref) for m in models], crops_index, threads, options,
                                             preprocessing, cfg.max_pixels),
                        compute=ray.data.ActorPoolStrategy(size=actors,
                                                           max_tasks_in_flight_per_actor=cfg.batches_in_flight),
                        num_gpus=gpus_per_actor, num_cpus=cfg.cpus_per_actor)
    return ds


def _execute(cfg: ScoreConfig, plan: Plan, models: list[ModelSpec], options: dict, summary: RunSummary,
             started: float, progress: Callable[[str], None]) -> None:
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        # no address and no RAY_ADDRESS: ray.init starts a local cluster, the embedded default
        ray.init(address=cfg.address, num_cpus=cfg.num_cpus, include_dashboard=False)
    try:
        ds = score_dataset(cfg, plan.todo, models, options)

        writer = ScoreWriter(cfg.output, options, models, summary.run_id, cfg.overwrite)
        first_at, first_rows, rows = None, 0, 0
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for result in writer.add(block):
                (summary.failed if result.failed else summary.done).append(result)
                rows += result.rows
                if first_at is None and result.rows:     # start-up: until the first shard is committed
                    first_at, first_rows = time.perf_counter(), rows
                    summary.startup_s = first_at - started
                done = len(summary.done) + len(summary.failed)
                elapsed = time.perf_counter() - started
                status = f"FAILED {result.failed}" if result.failed else \
                    f"{result.rows} rows, {sum(result.errors.values())} errors"
                progress(f"[{done}/{len(plan.todo)}] {shard_name(result.shard)}: {status} "
                         f"({rows / elapsed:.1f} images/s)")
        if first_at is not None and rows > first_rows:
            summary.steady_images_per_s = (rows - first_rows) / max(time.perf_counter() - first_at, 1e-9)
        lost = writer.pending()
        if lost:
            raise RuntimeError(f"shards with missing rows at the end of the run: {', '.join(lost)}")
    finally:
        if started_ray:
            ray.shutdown()
