"""The scoring job's output, committed by the driver, and the one place that knows its layout:

    DEST/<shard>.parquet          one score table per input shard, named after it so scores join back to it
    DEST/_markers/<shard>.json    the shard's marker, written after its table: a shard is done only when its
                                  marker exists (object stores have no rename, so nothing depends on one)
    DEST/_runs/<run_id>.json      each run's summary: shards, samples, errors by reason, images/s

``ScoreWriter`` gathers each shard's score rows and commits the shard once all of them have arrived;
``committed_names`` is how a rerun, ``describe``, ``report`` and ``filter`` tell which shards are done.
A curated output (``perceptclip filter``) keeps its markers the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa

from perceptclip import __version__
from perceptclip.shards import shard_name
from perceptclip.storage import StorageError, filesystem, join, protocol, redact_text, storage_error

if TYPE_CHECKING:
    from perceptclip.score import ModelSpec

log = logging.getLogger(__name__)

MARKERS_DIR = "_markers"
RUNS_DIR = "_runs"
METADATA_KEY = b"perceptclip"     # the score table's Parquet metadata key: its run, shard and models
BASE_COLUMNS = ("key", "shard", "status", "error", "width", "height", "url", "caption")
SHARD_ROW = "shard"          # status of a shard's control row; never written to a table


# --- layout --------------------------------------------------------------------------------------------

def table_path(dest: str, name: str) -> str:
    """Where the score table of the shard called ``name`` lives under ``dest``."""
    return join(dest, f"{name}.parquet")


def marker_path(dest: str, name: str) -> str:
    """Where the marker of the shard called ``name`` lives under ``dest``."""
    return join(dest, MARKERS_DIR, f"{name}.json")


def shard_of(table: str) -> str:
    """The name of the shard a score table was written for: ``.../shard-000012.parquet`` -> ``shard-000012``."""
    return table.rsplit("/", 1)[-1].removesuffix(".parquet")


def committed_names(dest: str, options: dict) -> set[str]:
    """Names of the shards with a marker under ``dest``: one listing, no reads."""
    fs, root = filesystem(join(dest, MARKERS_DIR), options)
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return set()
    return {e.rsplit("/", 1)[-1].removesuffix(".json") for e in entries if e.endswith(".json")}


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
            if self.overwrite:
                self.uncommit(shard)
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
        output = table_path(self.root, name)
        marker = marker_path(self.root, name)
        statuses = Counter(table["status"].to_pylist())
        errors = Counter(e.split(":", 1)[0] for e in table["error"].to_pylist() if e is not None)
        result = ShardResult(shard=shard, rows=table.num_rows, ok=statuses["ok"], errors=errors,
                             output=table_path(self.dest, name))
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
                "committed_at": utc_now(),
            }, indent=2).encode())
        except Exception as e:  # after the client's own retries: an outage or a revoked permission
            raise storage_error(f"commit {name}", self.dest, e, self.options) from None
        return result

    def uncommit(self, shard: str) -> None:
        """An --overwrite run could not read a shard committed earlier: its old scores no longer describe
        it, so its marker goes and the next run retries it (the table left behind is an orphan, which
        that run overwrites)."""
        marker = marker_path(self.root, shard_name(shard))
        try:
            if self.fs.exists(marker):
                self.fs.rm_file(marker)
        except Exception as e:
            raise storage_error(f"uncommit {shard_name(shard)}", self.dest, e, self.options) from None

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


def utc_now() -> str:
    """The time as markers and run summaries record it."""
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

