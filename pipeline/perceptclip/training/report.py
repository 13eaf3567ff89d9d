"""What a training run says while it goes on: each epoch as rank 0 records it, and the run's progress."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from perceptclip.core.console import Tally
from perceptclip.core.storage import filesystem
from perceptclip.training.validation import run_metric
from perceptclip.training.worker import WorkerPlan


class EpochReport:
    """While the run goes on, a thread on the driver reads the history rank 0 rewrites after every epoch
    (DEST/metrics.json), says each new epoch and ``show``s the run's ``Tally`` (epochs, the best so far)."""

    def __init__(self, plan: WorkerPlan, say: Callable[[str], None], show: Callable | None = None,
                 every: float = 2.0):
        self.plan, self.say, self.show, self.every = plan, say, show or (lambda tally: None), every
        self.metric = run_metric({head: plan.artifact.task_of(head) for head in plan.train})
        self.said = 0                   # epochs of the history already said, or there before this run
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="epochs", daemon=True)

    def __enter__(self) -> EpochReport:
        self.said = len(self._history() or [])    # a resumed run's earlier epochs are not said again
        self.show(Tally(self.said, self.plan.epochs))
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._report()

    def _watch(self) -> None:
        while not self.stop.wait(self.every):
            self._report()

    def _history(self) -> list[dict] | None:
        try:     # none yet, read while rank 0 rewrites it, the store out for a moment: the next look tells
            fs, path = filesystem(self.plan.metrics_url, self.plan.storage_options)
            return [r for r in json.loads(fs.cat_file(path)) if not r.get("failure")]   # the driver raises those
        except (OSError, ValueError):
            return None

    def _report(self) -> None:
        history = self._history()
        if not history:
            return
        for n, r in enumerate(history[self.said:], start=self.said + 1):
            score = "undefined" if r["score"] is None else f"{r['score']:.4f}"
            resumed = f"; resumed after epoch {r['resumed_after_epoch']}" if "resumed_after_epoch" in r else ""
            self.say(f"[{n}/{self.plan.epochs}] epoch {r['epoch']}: {self.metric} {score}, train loss "
                     f"{r['train_loss']:.4f}, {r['train_samples']} samples ({r['train_errors']} unusable), "
                     f"{r['seconds']:.1f} s{resumed}")
        self.said = max(self.said, len(history))
        best = [r for r in history if r["epoch"] == history[-1]["best_epoch"]]
        note = f"best {self.metric} {best[0]['score']:.4f} (epoch {best[0]['epoch']})" if best else ""
        self.show(Tally(len(history), self.plan.epochs, note=note))
