"""What a long run (``perceptclip score``, ``perceptclip train``) prints on stderr for a person, and where
the libraries' own output goes meanwhile.

    Console      the run's progress: on a terminal one bar of our own, redrawn in place; in a log (no
                 terminal) a line when the first unit (shard, epoch) is done, then one every ``interval``
                 seconds, and the last. Messages (a failed shard, an epoch's scores) always print, each on
                 its own line.
    ShardTally   a scoring run's rows and shards, as the console shows them
    ray_output   while Ray runs in this process: what Ray's Python loggers and its C++ core print on the
                 driver's stderr goes to a file in the Ray session's logs, where its workers' output and
                 Ray Data's log already are; the workers' output is not forwarded to the driver. Verbose
                 (``-v``): all of it prints, as Ray prints it.

Nothing here starts when imported; the library's jobs use both only when a caller hands them a
``Console`` (the command line does).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

BAR_WIDTH = 24
TICK_S = 0.5                # how often the clock on the bar moves, and a log's interval is checked
REDRAW_S = 0.1              # the bar is redrawn at most this often on updates


@dataclass(frozen=True)
class Tally:
    """Where a run stands: units (shards, epochs) done of the total, items (images) seen so far."""

    done: int                # units finished, the failed ones included
    total: int
    items: int = 0
    errors: int = 0          # items that ended as error rows
    failed: int = 0          # units that failed
    note: str = ""           # anything else worth a glance, e.g. the best epoch so far


class Console:
    """A run's messages and progress on ``stream`` (stderr). Call it with a line to print a message;
    ``show`` a ``Tally`` as the run advances. Use it as a context manager: entering starts the clock
    (and a thread that keeps the bar's clock, or a log's interval lines, moving); leaving prints the
    final state. ``verbose``: libraries print as they like, so progress goes as lines, never a bar."""

    def __init__(self, stream: TextIO | None = None, unit: str = "shards", item: str | None = "images",
                 verbose: bool = False, interval: float = 30.0, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.unit, self.item, self.verbose, self.interval, self.clock = unit, item, verbose, interval, clock
        self.bar = (_isatty(self.stream) if tty is None else tty) and not verbose
        self.lock = threading.RLock()
        self.started = clock()
        self.tally: Tally | None = None
        self.base: int | None = None                      # units done before this run (a resumed one)
        self.first_item: tuple[float, int] | None = None   # when the first items were seen, and how many
        self.first_done: tuple[float, int] | None = None   # when the first units were done, and how many
        self.ended: float | None = None                   # when the last unit was done: the clock stops
        self.drawn_at = float("-inf")                     # the bar's last redraw
        self.line_at: float | None = None                 # when a log's last progress line was printed
        self.last_line = ""
        self.stop = threading.Event()
        self.ticker: threading.Thread | None = None

    # --- the run's side --------------------------------------------------------------------------------

    def __call__(self, line: str) -> None:
        """A message: printed whole, on a line of its own (above the bar)."""
        with self.lock:
            if self.bar and self.tally is not None:
                self._write("\r\x1b[K" + line + "\n")
                self._draw()
            else:
                self._write(line + "\n")

    def show(self, tally: Tally) -> None:
        with self.lock:
            now = self.clock()
            self.base = tally.done if self.base is None else self.base
            if self.first_item is None and tally.items:
                self.first_item = (now, tally.items)
            moving = self.first_done is None and tally.done > self.base
            if moving:
                self.first_done = (now, tally.done)
            self.tally = tally
            if self.ended is None and tally.done >= tally.total:
                self.ended = now
            if self.bar:
                if now - self.drawn_at >= REDRAW_S or tally.done == tally.total:
                    self._draw()
            elif moving:                  # the first unit done: start-up is over, the run is moving
                self._line(now)

    def tick(self) -> None:
        """Move the bar's clock; in a log, print the progress line when ``interval`` has passed."""
        with self.lock:
            now = self.clock()
            if self.tally is None:
                return
            if self.bar:
                self._draw()
            elif now - (self.line_at if self.line_at is not None else self.started) >= self.interval:
                self._line(now)

    def __enter__(self) -> Console:
        self.started = self.clock()
        self.ticker = threading.Thread(target=self._tick_until_stopped, name="console", daemon=True)
        self.ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the clock and print where the run ended: the bar's final state, or a last line."""
        self.stop.set()
        if self.ticker is not None and self.ticker is not threading.current_thread():
            self.ticker.join()
        with self.lock:
            if self.tally is None:
                return
            if self.bar:
                self._draw()
                self._write("\n")
            else:
                self._line(self.clock(), again=False)
            self.tally = None

    # --- what is printed -------------------------------------------------------------------------------

    def describe(self, now: float) -> str:
        """The tally in words: ``2,112 images (4 errors), 96.1 images/s, 0:21 elapsed, ETA 0:49``."""
        t = self.tally
        now = min(now, self.ended) if self.ended is not None else now
        parts = []
        if self.item is not None:
            errors = f" ({t.errors:,} error{'s' * (t.errors > 1)})" if t.errors else ""
            parts.append(f"{t.items:,} {self.item}{errors}")
        if t.failed:
            parts.append(f"{t.failed} failed")
        rate = self._rate(now)
        if rate is not None:
            parts.append(f"{rate:,.1f} {self.item}/s" if rate < 100 else f"{rate:,.0f} {self.item}/s")
        if t.note:
            parts.append(t.note)
        parts.append(f"{clock_time(now - self.started)} elapsed")
        eta = self._eta(now)
        if eta is not None and t.done < t.total:
            parts.append(f"ETA {clock_time(eta)}")
        return ", ".join(parts)

    def _rate(self, now: float) -> float | None:
        """Items a second since the first were seen (the start-up left out) once more have come over at
        least a second; until then over the whole run."""
        if self.item is None or not self.tally.items:
            return None
        since, before = self.first_item
        if now - since >= 1.0 and self.tally.items > before:
            return (self.tally.items - before) / (now - since)
        return self.tally.items / max(now - self.started, 1e-9)

    def _eta(self, now: float) -> float | None:
        """Seconds left at the pace of the units done since the first one. Before a second is done, a bar
        shows the pace of the first (its start-up included, so rather too long than too short, and
        redrawn soon); a log line, which stays, shows none: a start-up of seconds would read as minutes."""
        t = self.tally
        left = t.total - t.done
        if self.first_done is None:
            return None
        if t.done > self.first_done[1]:
            return left * (now - self.first_done[0]) / (t.done - self.first_done[1])
        return left * (now - self.started) / (t.done - self.base) if self.bar else None

    def _line(self, now: float, again: bool = True) -> None:
        """The progress line; ``again=False``: not if it would repeat the last one word for word."""
        t = self.tally
        line = f"[{t.done}/{t.total}] {self.unit}, {self.describe(now)}"
        if again or line != self.last_line:
            self._write(line + "\n")
        self.line_at, self.last_line = now, line

    def _draw(self) -> None:
        t, now = self.tally, self.clock()
        filled = BAR_WIDTH * t.done // max(t.total, 1)
        bar = "█" * filled + "░" * (BAR_WIDTH - filled)
        text = f"{bar} {t.done}/{t.total} {self.unit}, {self.describe(now)}"
        width = shutil.get_terminal_size((100, 24)).columns
        self._write("\r\x1b[K" + text[:max(width - 1, 20)])
        self.drawn_at = now

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _tick_until_stopped(self) -> None:
        while not self.stop.wait(TICK_S):
            self.tick()


class ShardTally:
    """A scoring run on a ``Console``: the sample and error rows as their blocks reach the driver
    (``block``), the shards as they finish (called with the run's summary, by ``RunProgress``). A
    failed shard is said, with why; the others only move the bar."""

    def __init__(self, console: Console, todo: int):
        self.console, self.todo = console, todo
        self.rows = self.errors = self.done = self.failed = 0
        console.show(Tally(0, todo))

    def block(self, statuses: list[str]) -> None:
        """The ``status`` column of a block of score rows (``ok``, ``error``, or a shard's control row)."""
        self.rows += sum(status in ("ok", "error") for status in statuses)
        self.errors += sum(status == "error" for status in statuses)
        self._show()

    def say(self, line: str) -> None:
        """Where ``RunProgress`` says each shard: nowhere, the bar stands for them (and ``__call__`` says a
        failed one)."""

    def __call__(self, summary) -> None:
        self.done = len(summary.done) + len(summary.failed)
        for result in summary.failed[self.failed:]:
            self.console(f"[{self.done}/{self.todo}] {result.name}: FAILED {result.failed}")
        self.failed = len(summary.failed)
        self._show()

    def _show(self) -> None:
        self.console.show(Tally(self.done, self.todo, self.rows, self.errors, self.failed))


def clock_time(seconds: float) -> str:
    """``75`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


# --- Ray's own output ---------------------------------------------------------------------------------

class RayOutput:
    """Where Ray's own output goes while a job runs Ray in this process (``ray_output``). ``shown``: it
    goes to stderr as Ray prints it (pass as ``ray.init(log_to_driver=...)``); else to ``path``."""

    def __init__(self, console: Console | None):
        self.console = console
        self.shown = console is None or console.verbose
        self.path: str | None = None
        self.saved_fd: int | None = None
        self.restore: list[Callable[[], None]] = []

    def __enter__(self) -> RayOutput:
        if self.console is None:
            return self          # a library caller: Ray prints as it always does
        import ray.data

        # our own bar replaces Ray Data's (its bars on a terminal, its progress lines every 10 s in a log)
        context = ray.data.DataContext.get_current()
        self.restore.append(lambda bars=context.enable_progress_bars: setattr(context, "enable_progress_bars", bars))
        context.enable_progress_bars = False
        if self.shown:
            return self
        fd, self.path = tempfile.mkstemp(prefix="perceptclip-driver-", suffix=".err")
        console = self.console
        with console.lock:                  # the console's clock thread writes nothing meanwhile
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            self.saved_fd = os.dup(2)
            os.dup2(fd, 2)                  # the C++ core writes to fd 2 itself: only a redirect catches it
            os.close(fd)
            if _fileno(console.stream) == 2:    # the console itself must still reach the terminal
                original = console.stream
                console.stream = os.fdopen(os.dup(self.saved_fd), "w", buffering=1,
                                           encoding=getattr(original, "encoding", None), errors="backslashreplace")
                self.restore.append(lambda: (console.stream.close(), setattr(console, "stream", original)))
            # our own log records (a warning of the run) go through the console, not into Ray's file
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and _fileno(handler.stream) == 2:
                    previous = handler.setStream(_Lines(console))
                    self.restore.append(lambda handler=handler, previous=previous: handler.setStream(previous))
        return self

    def keep_in_session(self) -> None:
        """Once Ray is connected: move the file into the Ray session's logs, beside Ray's own files.
        Where that cannot be done it stays where it is (and the console names it if the run fails)."""
        if self.path is None:
            return
        try:
            # Ray has no public call for the session's folder; ray.init's returned context has it only
            # when this process started Ray
            from ray._private.worker import _global_node

            logs = os.path.join(_global_node.get_session_dir_path(), "logs")
            target = os.path.join(logs, f"perceptclip-driver-{os.getpid()}.err")
            os.replace(self.path, target)
            self.path = target
        except (ImportError, AttributeError, OSError):
            pass

    def __exit__(self, kind, error, traceback) -> None:
        if self.console is None:
            return
        with self.console.lock:
            if self.saved_fd is not None:
                sys.stderr.flush()
                os.dup2(self.saved_fd, 2)
                os.close(self.saved_fd)
                self.saved_fd = None
            for undo in reversed(self.restore):
                undo()
        if self.path is None:
            return
        if kind is not None and os.path.getsize(self.path):
            self.console(f"Ray's own output of this run is in {self.path}")
        elif not os.path.getsize(self.path) and os.path.dirname(self.path) == tempfile.gettempdir():
            os.remove(self.path)


def ray_output(console: Console | None) -> RayOutput:
    """A context manager for the time Ray runs in this process; see ``RayOutput``."""
    return RayOutput(console)


class _Lines(io.TextIOBase):
    """A text stream whose lines become console messages."""

    def __init__(self, console: Console):
        self.console, self.pending = console, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.console(line)
        return len(text)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return None


class ThrottledLines:
    """Progress lines through ``write``, at most one a ``interval_s``; ``done`` writes the last line held
    back, so the final state always shows."""

    def __init__(self, write, interval_s: float = 1.0):
        self.write, self.interval_s = write, interval_s
        self.shown_at = float("-inf")
        self.held: str | None = None

    def __call__(self, line: str) -> None:
        now = time.monotonic()
        if now - self.shown_at >= self.interval_s:
            self.write(line)
            self.shown_at, self.held = now, None
        else:
            self.held = line

    def done(self) -> None:
        if self.held is not None:
            self.write(self.held)
            self.held = None
