"""The scoring job: shards in (tars, Parquet, tables, folders of images), one Parquet table of scores per
shard out. All its Ray wiring is here (``run_score``, ``score_dataset``); the stages are plain functions
and classes in their own modules.

    plan       list the shards, drop those already committed (before reading any)     driver      scoring.plan
    read       one task per shard reads it (a shard is a unit), whatever its kind     CPU tasks   inputs.kinds
    decode     bytes -> image -> uint8 crops, once per distinct preprocessing; a bad
               image becomes an error row, a broken shard one ``shard`` row with why  same tasks  scoring.decode
    score      every model on the crops, one backbone pass per model                  actor pool  scoring.actor
    commit     the driver gathers each shard's rows; when all have arrived it writes
               the Parquet, then the marker (exactly once per shard, no shuffle)      driver      output.commit
    summary    counts, errors by reason, images/s, under OUT/_runs/                   driver      output.runs

Every shard sends exactly one control row (``status == "shard"``) carrying its sample count or the
reason it could not be read, so the driver knows when a shard is complete without a shuffle and
reports a broken shard instead of losing it. Images stay in the workers; only scores reach the driver.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from perceptclip.core.clock import utc_now
from perceptclip.core.cluster import ray_cluster
from perceptclip.core.console import Console, ShardTally
from perceptclip.core.storage import StorageError, redact, redact_text, storage_options
from perceptclip.model.reference import ModelSpec, check_columns, distinct_preprocessing
from perceptclip.output.commit import COMMIT_WORKERS, ScoreWriter
from perceptclip.output.destination import check_writable
from perceptclip.output.runs import RunProgress, RunSummary, write_summary
from perceptclip.scoring.actor import ModelActor
from perceptclip.scoring.config import ScoreConfig
from perceptclip.scoring.decode import read_and_decode
from perceptclip.scoring.plan import Plan, list_inputs, open_output, plan_shards

log = logging.getLogger(__name__)


# --- the job: all Ray wiring is here -------------------------------------------------------------------

def run_score(cfg: ScoreConfig, progress: Callable[[str], None] = log.info) -> RunSummary:
    """Score every shard ``cfg.input`` names that is not yet committed under ``cfg.output``."""
    cfg.validate()
    started = time.perf_counter()
    options = storage_options(cfg.storage)
    check_writable(cfg.output, options)           # before a model is fetched or a shard listed; leaves no trace
    found = list_inputs(cfg, options)
    models = [ModelSpec.resolve(m, options, batch=cfg.model_batch) for m in cfg.models]
    check_columns(models, cfg.carry_columns)
    open_output(cfg, found, models, options).begin()     # refused: nothing was written
    plan = plan_shards(cfg, options, found)
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
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
        e.run_summary = summary           # for the caller: the command line prints it on Ctrl-C as on success
        if isinstance(progress, Console):
            progress.close()              # where the run stood, then why it stopped: the last word is the stop
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

    actors, gpus_per_actor = actor_pool(cfg.actors, cfg.gpus_per_actor)
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
                        fn_constructor_args=([m.actor_args() for m in models], crops_index, threads, options,
                                             preprocessing, cfg.max_pixels),
                        compute=ray.data.ActorPoolStrategy(size=actors,
                                                           max_tasks_in_flight_per_actor=cfg.batches_in_flight),
                        num_gpus=gpus_per_actor, num_cpus=cfg.cpus_per_actor)
    return ds


def actor_pool(actors: int | None, gpus_per_actor: float | None) -> tuple[int, float]:
    """The model actor pool of the job and of ``add_scores``: its size and each actor's GPUs. By default
    one actor per GPU of the connected cluster, else one on the CPU."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    per_actor = gpus_per_actor if gpus_per_actor is not None else (1 if gpus else 0)
    return actors or (max(1, int(gpus // per_actor)) if per_actor else 1), per_actor


def _execute(cfg: ScoreConfig, plan: Plan, models: list[ModelSpec], options: dict, summary: RunSummary,
             started: float, progress: Callable[[str], None]) -> None:
    console = progress if isinstance(progress, Console) else None
    # with a console, Ray's own output goes to the session's logs (unless verbose) and our bar replaces its
    with ray_cluster(cfg.address, console, num_cpus=cfg.num_cpus, include_dashboard=False):
        ds = score_dataset(cfg, plan.todo, models, options)

        # commits run on a few threads of the driver while it goes on pulling rows (docs/scoring.md)
        writer = ScoreWriter(cfg.output, options, models, summary.run_id, cfg.overwrite, workers=COMMIT_WORKERS)
        # with a console, the tally says a failed shard and shows the rest on the bar, not a line each
        tally = ShardTally(console, len(plan.todo)) if console else None
        report = RunProgress(summary, len(plan.todo), started, tally.say if tally else progress, show=tally)
        try:
            # prefetch_batches=0: each block as soon as it is ready. Prefetching, Ray Data hands a block over
            # only once the next one has arrived, so a finished shard's commit (or its failure) waited on
            # whatever shard came next: a slow or stuck read held back the report of every shard before it
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
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

