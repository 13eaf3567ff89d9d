"""A score output (DEST) written without Ray, for quick tests of what reads one (quantiles, report,
curation): the scoring job's own stages, run one after another in this process, a loop in place of
Ray Data. The job itself, on a local Ray cluster, is tested in the slow tier."""

from __future__ import annotations


def score_here(shards: list[str], models: list[str], dest: str, block_rows: int = 8, inputs=None) -> list:
    """Score local ``shards`` with ``models`` (as ``--model`` takes them) into local ``dest`` through
    the job's stages: ``read_and_decode``, ``score_block``, ``ScoreWriter``. Returns each shard's
    ``ShardResult``; writes no run summary. ``inputs``: the shards' ``perceptclip.inputs.readers.InputSpec``."""
    import numpy as np

    from perceptclip.model.preprocess import DEFAULT_MAX_PIXELS
    from perceptclip.model.reference import ModelSpec, distinct_preprocessing
    from perceptclip.model.scorer import Scorer
    from perceptclip.output.commit import ScoreWriter
    from perceptclip.scoring.actor import score_block
    from perceptclip.scoring.decode import read_and_decode

    specs = [ModelSpec.resolve(m) for m in models]
    preprocessing, crops_index = distinct_preprocessing(specs)
    scorers = [Scorer.load(s.ref, name=s.name) for s in specs]
    writer = ScoreWriter(dest, {}, specs, run_id="in-process", overwrite=False)
    blocks = read_and_decode({"shard": np.array(shards, dtype=object)}, preprocessing, {}, block_rows,
                             DEFAULT_MAX_PIXELS, inputs=inputs)
    return [result for block in blocks for result in writer.add(score_block(block, scorers, crops_index))]
