"""The scoring job's output, committed by the driver, and the one place that knows its layout:

    DEST/<shard>.parquet          one score table per input shard, named after it so scores join back to it
    DEST/_markers/<shard>.json    the shard's marker, written after its table: a shard is done only when its
                                  marker exists (object stores have no rename, so nothing depends on one)
    DEST/_runs/<run_id>.json      each run's summary: shards, samples, errors by reason, images/s

``ScoreWriter`` commits each shard once all its rows have arrived, many at once while the driver goes on
pulling rows; ``committed_names`` is how a rerun, ``describe``, ``report`` and ``filter`` (whose curated
outputs keep markers the same way) tell which shards are done.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
from collections import Counter, defaultdict, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from perceptclip.core.clock import utc_now
from perceptclip.core.schema import BASE_COLUMNS, FILLED_BY_INPUT, METADATA_KEY, SHARD_ROW
from perceptclip.core.storage import filesystem, join, storage_error
from perceptclip.core.version import __version__
from perceptclip.inputs.base import carried_columns
from perceptclip.inputs.shards import shard_name
from perceptclip.output.layout import MARKERS_DIR, marker_path, table_path

if TYPE_CHECKING:
    from perceptclip.model.reference import ModelSpec

log = logging.getLogger(__name__)

# Shards committed at once: a commit is two requests, one after the other (table, then marker), so in line
# a run at 50 ms a request would commit 10 shards a second; 32 at once allow 320, and the driver's CPU is the
# limit before that (benchmarks/commits.py). Each holds one shard's rows (~200 bytes a row).
COMMIT_WORKERS = 32
# Threads that encode the tables when the store's client is asynchronous (s3fs): the requests then wait on
# its event loop, not on threads. A 1,000-row table takes about 2 ms, so two threads encode 1,000 shards a
# second; on 2 cores, 4 threads committed fewer shards a second than 2 (benchmarks/commits.py)
ENCODE_THREADS = 2


# --- commit (driver) -----------------------------------------------------------------------------------

@dataclass
class ShardResult:
    shard: str
    rows: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    failed: str | None = None           # why the shard could not be read
    output: str | None = None

    @property
    def name(self) -> str:
        return shard_name(self.shard)


@dataclass
class StagedShard:
    """A shard ready to store: its result, its Parquet bytes, and the paths of its table and marker."""
    result: ShardResult
    data: bytes
    sha256: str                 # of ``data``, taken while encoding (not on the client's event loop)
    output: str
    marker: str
    run_id: str
    models: list

    def marker_json(self) -> bytes:
        """The marker, written once the table is stored: what it holds, and when it was committed."""
        r = self.result
        return json.dumps({
            "shard": r.shard, "output": r.output, "rows": r.rows, "ok": r.ok,
            "errors": sum(r.errors.values()), "errors_by_reason": dict(r.errors),
            "models": [{"name": m.name, "ref": m.given or m.ref, "weights_sha256": m.meta.weights_sha256}
                       for m in self.models],
            "sha256": self.sha256, "bytes": len(self.data), "run_id": self.run_id,
            "committed_at": utc_now(),
        }, indent=2).encode()


class ScoreWriter:
    """Gathers score rows per shard on the driver and commits each shard once all its rows are in:
    Parquet first, then the marker. A shard is done only when its marker exists; object stores have
    no rename, so nothing here depends on one. A rerun overwrites any Parquet left without a marker.

    With ``workers``, up to that many commits run at once while the caller goes on adding rows; when that
    many are in flight, ``add`` waits for one (so at most ``workers`` shards' rows wait to be stored). Into
    an object store whose client is asynchronous (s3fs), a commit encodes its table on one of a few threads
    and makes its two requests on the client's event loop; otherwise it runs whole on one of ``workers``
    threads. Call ``finish`` once every row is in, and ``close`` in any case (after an error: commits in
    flight settle). Without workers, ``add`` commits in line."""

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
        self.described = [entry for m in models for entry in m.describe().get("heads", [m.describe()])]
        # Parquet dictionaries for the columns of few distinct values only: for keys, URLs and scores one is
        # built and then dropped (40% of the write)
        self.few_values = ["shard", "status", "error"] + [name for m in models for _, name, task in m.scored_heads
                                                           if task.is_classification]
        self.workers = workers
        self.loop = self.fs.loop if workers and getattr(self.fs, "async_impl", False) else None
        threads = ENCODE_THREADS if self.loop is not None else workers
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="commit") if workers else None
        self.commits: set[Future] = set()        # being committed
        self.done: deque[Future] = deque()       # committed or failed, not yet collected
        self.ready: list[ShardResult] = []       # finished shards not yet handed back

    def add(self, table: pa.Table) -> list[ShardResult]:
        """Take one block of score rows; returns the shards finished since the last call (committed, or
        failed to read). A failed commit raises its ``StorageError``."""
        # a block is a few dozen rows, mostly of one shard: runs of one shard are found in Python and sliced
        # (no copy); Arrow's compute calls cost more per call than this whole loop
        shards, status = table.column("shard").to_pylist(), table.column("status").to_pylist()
        start, touched = 0, []
        for i in range(1, len(shards) + 1):
            if (i < len(shards) and shards[i] == shards[start] and status[i] != SHARD_ROW
                    and status[start] != SHARD_ROW):
                continue
            shard = shards[start]
            if shard not in touched:
                touched.append(shard)
            if status[start] != SHARD_ROW:
                self._gather(shard, table.slice(start, i - start))
            elif (error := table.column("error")[start].as_py()) is not None:
                self.failed[shard] = error
            else:
                self.expected[shard] = table.column("shard_rows")[start].as_py()
            start = i
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
        self._collect(wait(self.commits).done)
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
        while len(self.commits) >= self.workers:      # as many in flight as allowed: wait for one, rows stay bounded
            self._collect(wait(self.commits, return_when=FIRST_COMPLETED).done)
        if self.loop is not None:
            future = asyncio.run_coroutine_threadsafe(self.commit_async(shard, parts), self.loop)
        else:
            future = self.pool.submit(self.commit, shard, parts)
        self.commits.add(future)
        future.add_done_callback(self.done.append)

    def _collect(self, finished: set[Future] | frozenset = frozenset()) -> None:
        """Results of the commits that have finished (``finished``, and those their callbacks announced) to
        ``ready``. A failed one stops the run: its error is raised here, on the caller's thread (``close``
        then lets the others in flight finish, and counts them)."""
        done = set(finished)
        while self.done:        # filled by the commits' callbacks: a call with nothing new costs nothing
            done.add(self.done.popleft())
        done &= self.commits    # a callback may run after ``wait`` has already returned its future
        self.commits -= done
        errors = [f.exception() for f in done if f.exception() is not None]
        self.ready += [f.result() for f in done if f.exception() is None]
        for other in errors[1:]:
            log.warning("%s", other)
        if errors:
            raise errors[0]

    def _settle(self) -> list[BaseException]:
        """Wait for every commit in flight; their results to ``ready``; returns their errors."""
        wait(self.commits)
        done, self.commits = self.commits, set()
        self.ready += [f.result() for f in done if f.exception() is None]
        return [f.exception() for f in done if f.exception() is not None]

    def _hand_back(self) -> list[ShardResult]:
        results, self.ready = self.ready, []
        return results

    def table(self, shard: str, parts: list[pa.Table]) -> pa.Table:
        columns = list(BASE_COLUMNS) + [c for m in self.models for c in m.columns]
        if parts:
            table = in_order(parts)
        else:
            table = self.empty_table()
        carried = carried_columns(table, [c for c in columns if c not in FILLED_BY_INPUT])
        table = table.select(columns)
        for name in [n for n in FILLED_BY_INPUT if n in carried]:     # asked for by name: the input's own wins
            values = carried.pop(name)
            text = values if pa.types.is_string(values.type) else pa.array(
                [None if v is None else str(v) for v in values.to_pylist()], pa.string())
            table = table.set_column(columns.index(name), name, pc.coalesce(text, table[name]))
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
            for _, name, task in m.scored_heads:
                fields += [pa.field(c, pa.string() if task.is_classification and c == name else pa.float32())
                           for c in task.columns(name)]
        return pa.schema(fields).empty_table()

    def commit(self, shard: str, parts: list[pa.Table]) -> ShardResult:
        """Store the shard's table, then its marker; in line, or on a commit thread."""
        staged = self.stage(shard, parts)
        try:
            if self.overwrite and self.fs.exists(staged.marker):
                self.fs.rm_file(staged.marker)     # the shard is not done while its Parquet is being replaced
            self.fs.pipe_file(staged.output, staged.data)
            # only once the whole table is stored (one put: a failed put leaves no part of it visible)
            self.fs.pipe_file(staged.marker, staged.marker_json())
        except Exception as e:  # after the client's own retries: an outage or a revoked permission
            raise storage_error(f"commit {shard_name(shard)}", self.dest, e, self.options) from None
        return staged.result

    async def commit_async(self, shard: str, parts: list[pa.Table]) -> ShardResult:
        """``commit`` on the object store client's event loop: the table is encoded on a thread, then the
        two requests are made on the loop, so a commit waiting on the store holds no thread."""
        staged = await asyncio.get_running_loop().run_in_executor(self.pool, self.stage, shard, parts)
        try:
            if self.overwrite and await self.fs._exists(staged.marker):
                await self.fs._rm_file(staged.marker)
            await self.fs._pipe_file(staged.output, staged.data)
            await self.fs._pipe_file(staged.marker, staged.marker_json())
        except Exception as e:
            raise storage_error(f"commit {shard_name(shard)}", self.dest, e, self.options) from None
        return staged.result

    def stage(self, shard: str, parts: list[pa.Table]) -> StagedShard:
        """The shard's table encoded as Parquet, its counts and where it goes."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        name = shard_name(shard)
        table = self.table(shard, parts)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", use_dictionary=self.few_values)
        # counted in Arrow: commits run on threads, and Python objects for every row would hold the GIL
        ok = pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
        errors = Counter(e.split(":", 1)[0] for e in pc.drop_null(table["error"]).to_pylist())
        result = ShardResult(shard=shard, rows=table.num_rows, ok=ok, errors=errors,
                             output=table_path(self.dest, name))
        data = buf.getvalue()
        return StagedShard(result, data, hashlib.sha256(data).hexdigest(), table_path(self.root, name),
                           marker_path(self.root, name), self.run_id, self.models)

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


def in_order(parts: list[pa.Table]) -> pa.Table:
    """One shard's rows in the order of its samples. Each part is a run of one block, in order; the parts
    arrive in the order the model actors finished them, so they are put in order by their first sample, and
    only rows out of order after that (never seen, but not ruled out) cost a full sort."""
    import numpy as np

    table = pa.concat_tables(sorted(parts, key=lambda part: part["ordinal"][0].as_py()))
    ordinal = table["ordinal"].to_numpy()
    return table if bool(np.all(ordinal[1:] > ordinal[:-1])) else table.sort_by("ordinal")
