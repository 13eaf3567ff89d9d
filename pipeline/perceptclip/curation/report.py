"""``perceptclip report``: one self-contained HTML page about a scored DEST, to explore it and pick a filter.

    read       the committed score tables and run summaries (``curation.quantiles``)
    plan       the explorer (``curation.explorer``): a threshold per regression score, cut into steps of one
               round width, with the 3 lowest and 3 highest samples of every step held as its neighbours;
               class toggles per classifier; the scores of every scored sample up to ``EXACT_LIMIT`` (exact
               counts), else of a uniform sample of that many (estimated counts, with a 95% interval)
    rank       per model: the top and bottom k samples (a classifier: by the confidence of its label)
    fetch      thumbnails of only those samples, the neighbours and the ranked, from their shards (tars,
               Parquet) or from where they were read (tables of locations, folders of image files), shrunk
               (``curation.thumbnails``)
    render     HTML with inline CSS, inline SVG charts, data: URI thumbnails, and the explorer's data and
               script inline (``curation.page``)

The page references nothing outside itself, so it opens offline and can be mailed around. Without
JavaScript it reads as a static report; with it, the controls select samples, the bar on top says what
the selection keeps in the words of ``perceptclip quantiles --where`` (the same numbers when exact),
gives the expression and the ``perceptclip filter`` command, and keeps it in the address
(``#where=<expression, URL-encoded>``): opening a link restores the selection; an expression the
controls cannot show (``or``, ``not``, two conditions on one score, a column without a control) is shown
as such, never approximated. Thumbnails: why this choice holds a neighbour within one step of any
threshold is in ``curation.explorer``; how many the page holds, it says itself.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from perceptclip.core.storage import filesystem
from perceptclip.curation.explorer import EXACT_LIMIT, STRIP_SIZE, explorer_json, plan_explorer
from perceptclip.curation.page import render
from perceptclip.curation.quantiles import ScoreSet, read_scores
from perceptclip.curation.thumbnails import THUMB_SIZE, fetch_thumbnails, shard_locations
from perceptclip.output.destination import check_apart


@dataclass
class ReportResult:
    output: str
    bytes: int
    thumbnails: int
    unavailable: int


def write_report(scores_dest: str, output: str, shards: str | list[str] | None = None, top_k: int = 12,
                 options: dict | None = None, progress: Callable[[str], None] = lambda _: None,
                 exact_limit: int = EXACT_LIMIT) -> ReportResult:
    """Read ``scores_dest``, render the report and write it to ``output`` (local path or fsspec URL).
    ``shards``: where the shards live now, as any shard spec; by default the URLs in the tables.
    ``exact_limit``: the most scored samples whose scores the page holds (above it, a uniform sample)."""
    if top_k < 0:
        raise ValueError(f"top_k: must be >= 0, got {top_k}")
    options = options or {}
    check_apart("--output", output, {"the score tables folder": [scores_dest]})       # a file: no record
    scores = read_scores(scores_dest, options, progress)
    explorer = plan_explorer(scores, exact_limit)
    picks = {m["name"]: ranked(scores, m, top_k) for m in scores.models}
    wanted: dict[str, dict[str, str | None]] = defaultdict(dict)     # shard -> key -> where the image was read from
    sizes: dict[tuple[str, str], int] = {}
    held = scores.table.select(["key", "shard", "url"]).take(explorer.held_rows()).to_pylist()
    for row, size in [(r, STRIP_SIZE) for r in held] + [(r, THUMB_SIZE) for p in picks.values() for r in p[0] + p[1]]:
        wanted[row["shard"]][row["key"]] = row["url"]
        sizes[(row["shard"], row["key"])] = max(size, sizes.get((row["shard"], row["key"]), 0))
    progress(f"thumbnails of {len(sizes)} samples from {len(wanted)} shards")
    locations = shard_locations(list(wanted), shards, options)
    thumbs = fetch_thumbnails(wanted, locations, options, progress, sizes=sizes)
    command = {"scores": scores_dest}
    page = render(scores, picks, thumbs, explorer, explorer_json(explorer, scores, thumbs, command))
    data = page.encode("utf-8")
    try:
        fs, path = filesystem(output, options)
        fs.pipe_file(path, data)
    except OSError as e:
        raise ValueError(f"{output}: cannot write the report ({e}); give --output a writable path") from None
    return ReportResult(output=output, bytes=len(data), thumbnails=sum(t.uri is not None for t in thumbs.values()),
                        unavailable=sum(t.uri is None for t in thumbs.values()))


def ranked(scores: ScoreSet, model: dict, k: int) -> tuple[list[dict], list[dict]]:
    """The ``k`` highest and ``k`` lowest rows by the model's score (a classifier: the probability of
    the label it chose), best first and worst first. Rows without a score take no part."""
    table = scores.table
    if model.get("labels"):
        probs = np.stack([table[c].to_numpy(zero_copy_only=False) for c in model["columns"][1:]], axis=1)
        rank = np.asarray(probs, dtype=np.float64).max(axis=1)        # NaN where the row has no scores
    else:
        rank = np.asarray(table[model["name"]].to_numpy(zero_copy_only=False), dtype=np.float64)
    have = np.flatnonzero(scores.ok & ~np.isnan(rank))
    order = have[np.argsort(rank[have], kind="stable")]
    columns = ["key", "shard", "url", "caption", model["name"]]

    def rows(index):
        picked = table.select(columns).take(index).to_pylist()
        for row, i in zip(picked, index):
            row["rank"] = float(rank[i])
        return picked

    return rows(order[::-1][:k]), rows(order[:k])
