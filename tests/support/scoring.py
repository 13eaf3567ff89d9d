"""A score output written without Ray, for tests of what reads one (quantiles, report, curation) and of
the destination: the scoring job's own steps, run one after another in this process, a loop in place of
Ray Data (``score_here``), and the run summary the job writes at its end (``run_here``). The job itself,
on a local Ray cluster, is tested in the slow tier."""

from __future__ import annotations


def score_here(shards: list[str], models: list[str], dest: str, block_rows: int = 8, inputs=None,
               **settings) -> list:
    """Score local ``shards`` (any input the job takes, and virtual shards of image files planned before)
    with ``models`` (as ``--model`` takes them) into local ``dest`` through the job's steps: the destination
    (``open_output``), then ``read_and_decode``, ``score_block`` and ``ScoreWriter``. Returns each
    shard's ``ShardResult``; writes no run summary. ``inputs``: the shards' ``InputSpec``;
    ``settings``: other ``ScoreConfig`` fields."""
    import numpy as np

    from perceptclip.inputs.files import virtual_shards
    from perceptclip.inputs.shards import VIRTUAL_SHARD
    from perceptclip.model.preprocess import DEFAULT_MAX_PIXELS
    from perceptclip.model.reference import ModelSpec, check_columns, distinct_preprocessing
    from perceptclip.model.scorer import Scorer
    from perceptclip.output.commit import ScoreWriter
    from perceptclip.output.layout import listings_dir
    from perceptclip.scoring.actor import score_block
    from perceptclip.scoring.config import ScoreConfig
    from perceptclip.scoring.decode import read_and_decode
    from perceptclip.scoring.plan import Inputs, list_inputs, open_output

    if inputs is not None:
        settings = {"input_kind": inputs.kind, "image_column": inputs.image_column,
                    "key_column": inputs.key_column, "carry_columns": list(inputs.carry_columns),
                    "fetch_workers": inputs.fetch_workers, "fetch_timeout_s": inputs.fetch_timeout_s, **settings}
    virtual = [u for u in shards if VIRTUAL_SHARD.search(u)]         # planned before: under the output already
    given = [u for u in shards if u not in virtual]
    cfg = ScoreConfig(input=given or list(shards), output=dest, models=list(models), **settings)
    specs = [ModelSpec.resolve(m) for m in models]
    check_columns(specs, cfg.carry_columns)
    found = list_inputs(cfg, {}) if given else Inputs()
    open_output(cfg, found, specs, {}).begin()
    # every shard named, committed or not (a folder of image files: its virtual shards, recorded now)
    shards = found.urls + [url for src in found.sources
                           for url in virtual_shards(src, listings_dir(dest), cfg.files_per_shard, {})] + virtual
    preprocessing, crops_index = distinct_preprocessing(specs)
    scorers = [Scorer.load(s.ref, name=s.name) for s in specs]
    writer = ScoreWriter(dest, {}, specs, run_id="in-process", overwrite=cfg.overwrite)
    blocks = read_and_decode({"shard": np.array(shards, dtype=object)}, preprocessing, {}, block_rows,
                             DEFAULT_MAX_PIXELS, inputs=cfg.input_spec())
    return [result for block in blocks for result in writer.add(score_block(block, scorers, crops_index))]


def run_here(shards: list[str], models: list[str], dest: str, **kwargs):
    """``score_here`` as one run of the job: the same steps, then the run's summary counted and written as
    the job's driver does it (``RunProgress``, ``write_summary``: ``DEST/_runs/in-process.json``, whose
    failed shards and run the report shows). Returns the ``RunSummary``."""
    import time

    from perceptclip.core.clock import utc_now
    from perceptclip.model.reference import ModelSpec
    from perceptclip.output.runs import RunProgress, RunSummary, write_summary

    started = time.perf_counter()
    summary = RunSummary(run_id="in-process", output=dest, started_at=utc_now(),
                         models=[ModelSpec.resolve(m).describe() for m in models], storage={})
    results = score_here(shards, models, dest, **kwargs)
    summary.planned = len(results)
    progress = RunProgress(summary, len(results), started, say=lambda line: None)
    progress(results)
    progress.finish()
    summary.duration_s = time.perf_counter() - started
    write_summary(summary, {})
    return summary
