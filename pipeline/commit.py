"""The scoring job's output, committed by the driver, and the one place that knows its layout:

    DEST/<shard>.parquet          one score table per input shard, named after it so scores join back to it
    DEST/_markers/<shard>.json    the shard's marker, written after its table: a shard is done only when its
                                  marker exists (object stores have no rename, so nothing depends on one)
    DEST/_runs/<run_id>.json      each run's summary: shards, samples, errors by reason, images/s

``ScoreWriter`` commits each shard once all its rows have arrived, on a few threads while the driver goes on
pulling rows; ``committed_names`` is how a rerun, ``describe``, ``report`` and ``filter`` (whose curated
outputs keep markers the same way) tell which shards are done.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa

from perceptclip import __version__
from perceptclip.inputs import carried_columns
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
# Shards committed at once: a commit is two requests, one after the other (table, then marker), so in line
# a run at 50 ms a request would commit 10 shards a second; 32 threads allow 320, and the driver's CPU is the
# limit before that (benchmarks/commits.py). Each holds one shard's rows (~200 bytes a row).
COMMIT_WORKERS = 32


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
    no rename, so nothing here depends on one. A rerun overwrites any Parquet left without a marker.

    With ``workers``, commits run on that many threads while the caller goes on adding rows; when all
    are busy, ``add`` waits for one (so at most ``workers`` shards' rows wait to be stored). Call
    ``finish`` once every row is in, and ``close`` in any case (after an error: commits in flight settle).
    Without workers, ``add`` commits in line."""

    def __init__(self, dest: str, options: dict, models: list[ModelSpec], run_id: str, overwrite: bool,
                 workers: int = 0):
        self.dest, self.options, self.models, self.run_id = dest, options, models, run_id
        self.overwrite = overwrite
        self.fs, self.root = filesystem(dest, options)
        self.fs.makedirs(join(self.root, MARKERS_DIR), exist_ok=True)
        self.parts: dict[str, list[pa.Table]] = defaultdict(list)
        self.received: Counter = Counter()
        self.expected: dict[str, int] = {}
        self.failed: dict[str, str] = {}
        self.finished: set[str] = set()
        # every table's metadata: one entry per scored head, as quantiles, filter, report and the language read it
        self.described = [entry for m in models for entry in m.describe().get("outputs", [m.describe()])]
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="commit") if workers else None
        self.commits: list[Future] = []          # being committed, in the order they were started
        self.ready: list[ShardResult] = []       # finished shards not yet handed back

    def add(self, table: pa.Table) -> list[ShardResult]:
        """Take one block of score rows; returns the shards finished since the last call (committed, or
        failed to read). A failed commit raises its ``StorageError``."""
        import pyarrow.compute as pc

        touched = pc.unique(table["shard"]).to_pylist()
        if len(touched) == 1 and not pc.any(pc.equal(table["status"], SHARD_ROW)).as_py():
            self._gather(touched[0], table)         # most blocks: samples of one shard, nothing to split
        else:
            for shard in touched:
                rows = table.filter(pc.equal(table["shard"], shard))
                self._gather(shard, rows.filter(pc.not_equal(rows["status"], SHARD_ROW)))
                control = rows.filter(pc.equal(rows["status"], SHARD_ROW))
                for row in control.select(["shard_rows", "error"]).to_pylist():
                    if row["error"] is not None:
                        self.failed[shard] = row["error"]
                    else:
                        self.expected[shard] = row["shard_rows"]
        for shard in touched:
            self._maybe_finish(shard)
        self._collect()
        return self._hand_back()

    def _gather(self, shard: str, samples: pa.Table) -> None:
        if samples.num_rows:
            self.parts[shard].append(samples)
            self.received[shard] += samples.num_rows

    def finish(self) -> list[ShardResult]:
        """Wait for every commit; returns the shards finished since the last call (and raises as ``add``)."""
        wait(self.commits)
        self._collect()
        return self._hand_back()

    def close(self) -> list[ShardResult]:
        """Wait for the commits in flight (each finishes or fails whole: never a marker without its table)
        and stop the threads; returns the shards committed since the last call, so that after an error
        what was stored meanwhile is still counted. Their errors are logged: the run already stops with one."""
        for error in self._settle():
            log.warning("%s", error)
        if self.pool is not None:
            self.pool.shutdown()
        return self._hand_back()

    def _maybe_finish(self, shard: str) -> None:
        if shard in self.finished:
            raise RuntimeError(f"{shard}: rows arrived after the shard was finished")
        if shard in self.failed:
            self.parts.pop(shard, None)
            self.finished.add(shard)
            if self.overwrite:
                self.uncommit(shard)
            self.ready.append(ShardResult(shard=shard, failed=self.failed[shard]))
            return
        if shard not in self.expected or self.received[shard] < self.expected[shard]:
            return
        if self.received[shard] != self.expected[shard]:
            raise RuntimeError(f"{shard}: received {self.received[shard]} rows for {self.expected[shard]} samples")
        self.finished.add(shard)
        parts = self.parts.pop(shard, [])
        if self.pool is None:
            self.ready.append(self.commit(shard, parts))
            return
        while len(self.commits) >= self.workers:      # all threads busy: wait for one, rows stay bounded
            wait(self.commits, return_when=FIRST_COMPLETED)
            self._collect()
        self.commits.append(self.pool.submit(self.commit, shard, parts))

    def _collect(self) -> None:
        """Results of the commits that have finished to ``ready``. A failed one stops the run: its error is
        raised here, on the caller's thread (``close`` then lets the others in flight finish, and counts them)."""
        finished = [f.done() for f in self.commits]      # asked once: a commit may finish meanwhile
        done = [f for f, d in zip(self.commits, finished) if d]
        self.commits = [f for f, d in zip(self.commits, finished) if not d]
        errors = [f.exception() for f in done if f.exception() is not None]
        self.ready += [f.result() for f in done if f.exception() is None]
        for other in errors[1:]:
            log.warning("%s", other)
        if errors:
            raise errors[0]

    def _settle(self) -> list[BaseException]:
        """Wait for every commit in flight; their results to ``ready``; returns their errors."""
        wait(self.commits)
        done, self.commits = self.commits, []
        self.ready += [f.result() for f in done if f.exception() is None]
        return [f.exception() for f in done if f.exception() is not None]

    def _hand_back(self) -> list[ShardResult]:
        results, self.ready = self.ready, []
        return results

    def table(self, shard: str, parts: list[pa.Table]) -> pa.Table:
        columns = list(BASE_COLUMNS) + [c for m in self.models for c in m.columns]
        if parts:
            table = pa.concat_tables(parts).sort_by("ordinal")
        else:
            table = self.empty_table()
        carried = carried_columns(table, columns)
        table = table.select(columns)
        for i, (name, values) in enumerate(carried.items()):     # the input's own, after the base columns
            table = table.add_column(len(BASE_COLUMNS) + i, name, values)
        metadata = {
            "format": "perceptclip-scores", "format_version": 1, "package_version": __version__,
            "run_id": self.run_id, "shard": shard, "models": self.described,
        }
        return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})

    def empty_table(self) -> pa.Table:
        fields = [pa.field(c, pa.int32() if c in ("width", "height") else pa.string()) for c in BASE_COLUMNS]
        fields.append(pa.field("ordinal", pa.int64()))
        for m in self.models:
            for _, name, task in m.outputs:
                fields += [pa.field(c, pa.string() if task.is_classification and c == name else pa.float32())
                           for c in task.columns(name)]
        return pa.schema(fields).empty_table()

    def commit(self, shard: str, parts: list[pa.Table]) -> ShardResult:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        name = shard_name(shard)
        table = self.table(shard, parts)
        buf = io.BytesIO()
        # dictionaries for text only: for continuous scores one is built and then dropped (40% of the write)
        text = [f.name for f in table.schema if pa.types.is_string(f.type)]
        pq.write_table(table, buf, compression="zstd", use_dictionary=text)
        data = buf.getvalue()
        output = table_path(self.root, name)
        marker = marker_path(self.root, name)
        # counted in Arrow: commits run on threads, and Python objects for every row would hold the GIL
        ok = pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
        errors = Counter(e.split(":", 1)[0] for e in pc.drop_null(table["error"]).to_pylist())
        result = ShardResult(shard=shard, rows=table.num_rows, ok=ok, errors=errors,
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


class RunProgress:
    """Counts each finished shard into the run's summary as the driver learns of it, says one line per
    shard, hands ``show`` the summary, and times the run: start-up to the first committed shard, the rate after."""

    def __init__(self, summary: RunSummary, todo: int, started: float, say: Callable[[str], None],
                 show: Callable[[RunSummary], None] | None = None):
        self.summary, self.todo, self.started, self.say, self.show = summary, todo, started, say, show
        self.rows = 0
        self.first: tuple[float, int] | None = None     # (time, rows) when the first shard was committed

    def __call__(self, results: list[ShardResult]) -> None:
        summary = self.summary
        for result in results:
            (summary.failed if result.failed else summary.done).append(result)
            self.rows += result.rows
            now = time.perf_counter()
            if self.first is None and result.rows:
                self.first = (now, self.rows)
                summary.startup_s = now - self.started
            status = f"FAILED {result.failed}" if result.failed else \
                f"{result.rows} rows, {sum(result.errors.values())} errors"
            self.say(f"[{len(summary.done) + len(summary.failed)}/{self.todo}] {shard_name(result.shard)}: "
                     f"{status} ({self.rows / (now - self.started):.1f} images/s)")
            if self.show is not None:
                self.show(summary)

    def finish(self) -> None:
        """The steady rate: the rows after the first committed shard over the time they took."""
        if self.first is not None and self.rows > self.first[1]:
            elapsed = max(time.perf_counter() - self.first[0], 1e-9)
            self.summary.steady_images_per_s = (self.rows - self.first[1]) / elapsed


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

