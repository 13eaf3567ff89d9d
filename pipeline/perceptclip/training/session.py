"""Where a training worker runs: what ``training.worker`` asks of its surroundings, in two forms.

    RaySession     a Ray Train worker: its rank in the group, DDP, the shards read by Ray Data tasks,
                   checkpoints handed to Ray Train (DEST/checkpoints, resumed and restarted by it)
    LocalSession   this process, alone (``scaling.in_process``): no Ray, the shards read here one after
                   the other, checkpoints written to DEST/checkpoints/epoch-NNNN by the session itself

Both give a worker the same rows in the same order (``read``: one chunk of rows per shard or block, in
the order of the items; ``training.data.shuffled_batches`` makes batches of them whatever the chunks),
so a run in this process trains what a Ray Train run of one worker trains.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "epoch-"
STATE_FILE = "state.json"       # in every checkpoint (training.worker writes it)
CHUNK_ROWS = 64                 # rows per chunk read from Ray Data (any size gives the same batches)


def checkpoint_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def ray_read(items: list[dict], rows: Callable[[dict], list[dict]]) -> Iterator[dict]:
    """``rows`` of each item, read by Ray Data tasks, as chunks of columns in the items' order (when the
    DataContext preserves it, as a worker sets it)."""
    import ray.data

    if not items:
        return iter(())
    ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(rows)
    return ds.iter_batches(batch_size=CHUNK_ROWS, batch_format="numpy")


def local_read(items: list[dict], rows: Callable[[dict], list[dict]]) -> Iterator[dict]:
    """``rows`` of each item, read here in turn: one chunk of columns per item that has rows."""
    for item in items:
        found = rows(item)
        if found:
            yield {name: np.stack([row[name] for row in found]) for name in found[0]}


class RaySession:
    """A worker of Ray Train's group."""

    def __init__(self):
        import ray.data
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        # rows reach the worker in the order of their shards, not in the order the data tasks finish: with
        # seeded shard orders and crops, an epoch then gives the same batches however often it runs
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        # the driver reports the epochs; Ray Data's progress bars would fill this worker's log with redraws
        ray.data.DataContext.get_current().enable_progress_bars = False

    def read(self, items: list[dict], rows: Callable[[dict], list[dict]]) -> Iterator[dict]:
        return ray_read(items, rows)

    def prepare(self, model: torch.nn.Module, find_unused: bool) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": find_unused})

    @contextlib.contextmanager
    def latest(self) -> Iterator[str | None]:
        """The directory of Ray Train's latest checkpoint, if there is one."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d

    def report(self, metrics: dict, directory: str | None = None, epoch: int = 0) -> None:
        import ray.train
        from ray.train import Checkpoint

        if directory is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory),
                             checkpoint_dir_name=checkpoint_name(epoch))

    def note(self, text: str) -> None:
        """A line for the worker's log (Ray keeps it; the driver says the epochs)."""
        print(text, flush=True)


class LocalSession:
    """This process alone: rank 0 of 1, on the GPU if ``use_gpu``, its checkpoints under ``root``
    (DEST/checkpoints), the ``keep`` latest kept."""

    rank, world = 0, 1

    def __init__(self, root: str, storage_options: dict, keep: int, use_gpu: bool = False):
        from perceptclip.core.storage import filesystem

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.fs, self.root = filesystem(root, storage_options)
        self.keep = keep

    def read(self, items: list[dict], rows: Callable[[dict], list[dict]]) -> Iterator[dict]:
        return local_read(items, rows)

    def prepare(self, model: torch.nn.Module, find_unused: bool) -> torch.nn.Module:
        return model

    def _saved(self) -> list[str]:
        """The checkpoints written whole: their ``state.json``, written last, is there."""
        if not self.fs.exists(self.root):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        return sorted(n for n in names if n.startswith(CHECKPOINT_PREFIX)
                      and self.fs.exists(posixpath.join(self.root, n, STATE_FILE)))

    @contextlib.contextmanager
    def latest(self) -> Iterator[str | None]:
        """A local copy of the latest checkpoint this session wrote, if there is one."""
        saved = self._saved()
        if not saved:
            yield None
            return
        with tempfile.TemporaryDirectory() as d:
            for path in self.fs.ls(posixpath.join(self.root, saved[-1]), detail=False):
                self.fs.get_file(path, os.path.join(d, posixpath.basename(path)))
            yield d

    def report(self, metrics: dict, directory: str | None = None, epoch: int = 0) -> None:
        """Save ``directory`` as the epoch's checkpoint, ``state.json`` last (a checkpoint without it
        was cut short and does not count), and remove all but the ``keep`` latest."""
        if directory is None:
            return
        name = checkpoint_name(epoch)
        folder = posixpath.join(self.root, name)
        if self.fs.exists(folder):
            self.fs.rm(folder, recursive=True)
        files = sorted(os.listdir(directory), key=lambda f: f == STATE_FILE)
        self.fs.makedirs(folder, exist_ok=True)
        for file in files:
            self.fs.put_file(os.path.join(directory, file), posixpath.join(folder, file))
        for old in self._saved()[:-self.keep]:
            self.fs.rm(posixpath.join(self.root, old), recursive=True)
        log.debug("checkpoint %s: %s", name, json.dumps(metrics))

    def note(self, text: str) -> None:
        """A line for the log: in this process, stdout is the command's."""
        log.debug("%s", text)
