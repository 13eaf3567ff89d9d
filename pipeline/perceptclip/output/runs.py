"""A scoring run's summary: what it planned, committed, skipped and failed, counted as the driver learns of
each shard, and written to ``DEST/_runs/<run_id>.json`` at the end (the layout is ``commit``'s)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from perceptclip.core.storage import filesystem, join, protocol, storage_error
from perceptclip.core.version import __version__
from perceptclip.inputs.shards import shard_name
from perceptclip.output.commit import ShardResult
from perceptclip.output.layout import RUNS_DIR


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



