"""The report's explorer: what its selection controls work on, chosen here and packed into the page.

    controls    a regression score gets a threshold on its histogram (keep >=, >, <=, <); a classifier's
                label column gets its classes as toggles (``in [...]``). The selection is their conjunction,
                written in the filter's language (``curation.expression``), and that text is the link.
    steps       a score's range cut into about ``STEPS`` steps of one round width (1, 2, 2.5 or 5 times a power
                of ten): the slider's positions and the histogram's bars.
    neighbours  from every step, its ``NEIGHBOURS`` lowest and ``NEIGHBOURS`` highest samples get a thumbnail,
                so the page holds at most ``2 * NEIGHBOURS`` per step per score. At a threshold t the page shows
                the held samples nearest to t on either side. For any t in a step [a, a + w): a sample in
                [t, t + w) lies in that step (then its highest is held and lies there too) or in the next
                (then the next step's lowest is held and lies there); below t the same with the step's lowest
                and the previous step's highest. So any threshold has a held neighbour within one step on
                each side wherever the data has one, and at a step's edge (where the slider puts a threshold)
                the ``NEIGHBOURS`` held on each side are exactly the data's nearest.
    rows        the scores of every scored sample, when there are at most ``EXACT_LIMIT``: the page's counts
                are then exact, the same numbers ``quantiles --where`` prints. Above that, a uniform sample
                of ``EXACT_LIMIT`` scored samples (seeded: the same page for the same tables), and the page
                gives its count as an estimate with a 95% interval. Error rows hold no scores and are never
                kept, so they need no sample: the page knows their number.

A value is held as the table has it (float32), and compared in the page as a double, as Arrow compares a
float32 column with a float literal, so a threshold keeps the same samples in the page and in ``filter``.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field

import numpy as np

from perceptclip.curation.quantiles import ScoreSet

STEPS = 100                 # about this many slider steps per score (between 40 and 100, of a round width)
NEIGHBOURS = 3              # thumbnails held at each end of every step
EXACT_LIMIT = 250_000       # scored samples whose scores the page holds; above: a uniform sample of this many
SAMPLE_SEED = 0
STRIP_SIZE = 84             # longest side of a neighbour's thumbnail, in pixels
CAPTION_CHARS = 80


@dataclass
class NumericControl:
    """A regression score's threshold: its steps' edges, each step's count (every scored sample), the
    held neighbours (table rows, by value)."""

    name: str
    higher_is_better: bool
    edges: np.ndarray
    counts: np.ndarray
    held: np.ndarray


@dataclass
class ClassControl:
    """A classifier's label column: its classes as toggles, each with its count of samples."""

    name: str
    labels: list[str]
    counts: list[int]


@dataclass
class Explorer:
    numeric: list[NumericControl]
    classes: list[ClassControl]
    order: list[str]              # the controls' columns in model order: the order of the expression's terms
    rows: np.ndarray              # table rows whose scores the page holds: every scored row, or a sample
    scored: int
    total: int
    limit: int = EXACT_LIMIT
    steps: int = STEPS
    neighbours: int = NEIGHBOURS
    problems: list[str] = field(default_factory=list)   # scores that get no control, and why

    @property
    def exact(self) -> bool:
        return len(self.rows) == self.scored

    def held_rows(self) -> np.ndarray:
        return np.unique(np.concatenate([c.held for c in self.numeric] + [np.zeros(0, dtype=np.int64)]))


def plan_explorer(scores: ScoreSet, limit: int = EXACT_LIMIT, neighbours: int = NEIGHBOURS) -> Explorer:
    """The controls of ``scores``, their steps and neighbours, and the rows the page holds."""
    import pyarrow.compute as pc

    if limit < 1:
        raise ValueError(f"exact_limit: must be >= 1, got {limit}")
    ok = scores.ok
    scored = np.flatnonzero(ok)
    numeric, classes, order, problems = [], [], [], []
    for model in scores.models:
        name = model["name"]
        if model.get("labels"):
            found = dict(zip(*(c.to_pylist() for c in pc.value_counts(scores.table[name].drop_null()).flatten())))
            classes.append(ClassControl(name, list(model["labels"]), [found.get(lb, 0) for lb in model["labels"]]))
            order.append(name)
            continue
        values = column_values(scores, name)
        finite = scored[np.isfinite(values[scored])]
        if not len(finite):
            problems.append(f"{name}: no scores, no threshold")
            continue
        edges = score_steps(values[finite])
        counts = np.diff(np.searchsorted(np.sort(values[finite]), edges, side="left"))
        numeric.append(NumericControl(name, bool(model.get("higher_is_better", True)), edges, counts,
                                      step_neighbours(values, finite, edges, neighbours)))
        order.append(name)
    if len(scored) > limit:
        rows = np.sort(np.random.default_rng(SAMPLE_SEED).choice(scored, size=limit, replace=False))
    else:
        rows = scored
    return Explorer(numeric, classes, order, rows, scored=len(scored), total=scores.table.num_rows, limit=limit,
                    neighbours=neighbours, problems=problems)


def column_values(scores: ScoreSet, name: str) -> np.ndarray:
    """A score column over every row, as float64 (NaN where a row has none)."""
    return np.asarray(scores.table[name].to_numpy(zero_copy_only=False), dtype=np.float64)


def score_steps(values: np.ndarray, target: int = STEPS) -> np.ndarray:
    """Edges e0 < e1 < ... of steps of one round width, each a decimal number as written, such that every
    value lies in a step [e_i, e_i+1). The width is the first of 1, 2, 2.5, 5 times a power of ten that
    cuts the range into at most ``target`` steps."""
    lo, hi = float(values.min()), float(values.max())
    raw = (hi - lo or abs(hi) or 1.0) / target
    power = 10.0 ** math.floor(math.log10(raw))
    mult = next(m for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-12))
    step = mult * power
    digits = max(0, -math.floor(math.log10(step) + 1e-12) + (1 if mult == 2.5 else 0))
    first, last = math.floor(lo / step), math.floor(hi / step) + 1

    def edge(i: int) -> float:           # the decimal i * step as written, so the page's text is round
        return float(f"{i * step:.{digits}f}")

    while edge(first) > lo:
        first -= 1
    while edge(last) <= hi:
        last += 1
    return np.array([edge(i) for i in range(first, last + 1)])


def step_neighbours(values: np.ndarray, rows: np.ndarray, edges: np.ndarray, k: int) -> np.ndarray:
    """Of ``rows`` (with finite ``values``), the ``k`` lowest and ``k`` highest of every step, by value."""
    order = rows[np.argsort(values[rows], kind="stable")]
    starts = np.searchsorted(values[order], edges, side="left")
    held = []
    for a, b in zip(starts[:-1], starts[1:]):
        held.append(order[a:b] if b - a <= 2 * k else np.concatenate([order[a:a + k], order[b - k:b]]))
    return np.concatenate(held) if held else np.zeros(0, dtype=np.int64)


# --- packed for the page ---------------------------------------------------------------------------------

def explorer_json(explorer: Explorer, scores: ScoreSet, thumbs: dict, command: dict) -> str:
    """What the page's script reads: the held rows' scores as base64 arrays (little-endian float32 as the
    tables hold them, class indices), each control's steps and neighbours, the neighbours' thumbnails. Safe inside a ``<script>``
    element: every ``<``, ``>`` and ``&`` is written as a JSON escape."""
    import pyarrow.compute as pc

    table, rows = scores.table, explorer.rows
    numeric_values = {c.name: column_values(scores, c.name) for c in explorer.numeric}
    codes = {}
    for c in explorer.classes:
        index = pc.index_in(table[c.name], value_set=_labels_array(c.labels))
        codes[c.name] = np.asarray(pc.fill_null(index, len(c.labels)).to_numpy(), dtype=_code_type(c.labels))
    held = explorer.held_rows()
    samples, uris = held_samples(scores, held, numeric_values, codes, thumbs)
    position = {int(r): i for i, r in enumerate(held)}
    data = {
        "dest": scores.dest, "total": explorer.total, "scored": explorer.scored, "rows": len(rows),
        "exact": explorer.exact, "limit": explorer.limit, "seed": SAMPLE_SEED, "neighbours": explorer.neighbours,
        "order": explorer.order, "command": command,
        "numeric": [{"name": c.name, "higher": c.higher_is_better, "edges": c.edges.tolist(),
                     "counts": c.counts.tolist(), "type": _value_type(table, c.name),
                     "data": _b64(numeric_values[c.name][rows].astype("<" + _value_type(table, c.name))),
                     "held": [position[int(r)] for r in c.held]} for c in explorer.numeric],
        "classes": [{"name": c.name, "labels": c.labels, "counts": c.counts,
                     "type": "u1" if _code_type(c.labels) == np.uint8 else "u2",
                     "data": _b64(codes[c.name][rows])} for c in explorer.classes],
        "samples": samples, "thumbs": uris,
    }
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def held_samples(scores: ScoreSet, held: np.ndarray, values: dict, codes: dict, thumbs: dict) -> tuple[list, list]:
    """Each held row as the strip shows it (key, shard, caption, its scores, its thumbnail's index or why it
    has none), and the thumbnails, each once."""
    from perceptclip.inputs.shards import shard_name

    rows = scores.table.select(["key", "shard", "caption"]).take(held).to_pylist()
    uris: list[str] = []
    index: dict[str, int] = {}
    out = []
    for r, row in zip(held, rows):
        thumb = thumbs.get((row["shard"], row["key"]))
        caption = row.get("caption") or ""
        sample = {"key": row["key"], "shard": shard_name(row["shard"]),
                  "caption": caption if len(caption) <= CAPTION_CHARS else caption[:CAPTION_CHARS - 1] + "…",
                  "values": [_finite(v[r]) for v in values.values()], "codes": [int(c[r]) for c in codes.values()]}
        if thumb is not None and thumb.uri is not None:
            sample["thumb"] = index.setdefault(thumb.uri, len(index))
            if sample["thumb"] == len(uris):
                uris.append(thumb.uri)
        else:
            sample["problem"] = thumb.problem if thumb is not None else "not fetched"
        out.append(sample)
    return out, uris


def _labels_array(labels: list[str]):
    import pyarrow as pa

    return pa.array(labels, pa.string())


def _value_type(table, name: str) -> str:
    """How the page holds a score: as the table does (float32), so that it compares as filter compares it;
    any other column as float64."""
    import pyarrow as pa

    return "f4" if pa.types.is_float32(table.schema.field(name).type) else "f8"


def _code_type(labels: list[str]):
    return np.uint8 if len(labels) < 255 else np.uint16      # one code more than labels: no label


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")
