"""A scored DEST read back, and how its scores are spread: quantiles per score column, the share of each
class, and the share of samples a keep-expression would keep, so a threshold can be picked before a
filter runs.

Only committed tables count: a shard's Parquet is part of the result when its marker exists (the
score job's commit protocol, ``commit.py``), so a table a crashed run left behind is never reported on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from perceptclip.core.schema import METADATA_KEY
from perceptclip.core.storage import filesystem, join, read_parquet
from perceptclip.output.layout import MARKERS_DIR, RUNS_DIR, committed_names, json_files, shard_of

DEFAULT_LEVELS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


@dataclass
class ScoreSet:
    """Every committed score table under ``dest`` as one table, the models that wrote them (from the
    tables' metadata, in column order) and the run summaries (oldest first)."""

    dest: str
    table: pa.Table
    models: list[dict]
    files: list[str]
    runs: list[dict] = field(default_factory=list)
    uncommitted: list[str] = field(default_factory=list)    # Parquet without a marker: left out

    @property
    def ok(self) -> np.ndarray:
        return np.asarray(self.table["status"].to_numpy(zero_copy_only=False) == "ok")

    def score_columns(self) -> list[str]:
        """The float columns: a regression model's score, a classifier's class probabilities."""
        return [c for m in self.models for c in m["columns"] if not (m.get("labels") and c == m["name"])]

    def values(self, column: str) -> np.ndarray:
        """The column's scores over the rows that have one (error rows have none), as float64."""
        return self.table[column].drop_null().to_numpy().astype(np.float64)


def read_scores(dest: str, options: dict | None = None,
                progress: Callable[[str], None] = lambda _: None) -> ScoreSet:
    """Read the committed score tables of a ``perceptclip score`` output. Raises ``ValueError`` naming
    the file at fault and what to do."""
    options = options or {}
    fs, root = filesystem(dest, options)
    try:
        entries = sorted(fs.ls(root, detail=False))
    except FileNotFoundError:
        raise ValueError(f"{dest}: no such folder; give --scores the --output of a perceptclip score run") from None
    # file names joined to ``dest`` as given, so messages name s3://bucket/... rather than bucket/...
    parquet = [join(dest, e.rsplit("/", 1)[-1]) for e in entries if e.endswith(".parquet")]
    committed = committed_names(dest, options)
    files = [p for p in parquet if shard_of(p) in committed]
    if not files:
        raise ValueError(f"{dest}: no committed score tables (a <shard>.parquet with a marker in {MARKERS_DIR}/); "
                         f"run perceptclip score --output {dest} first")
    tables, models = [], {}
    for i, path in enumerate(files, 1):
        progress(f"reading score tables [{i}/{len(files)}] {path.rsplit('/', 1)[-1]}")
        try:
            with fs.open(join(root, path.rsplit("/", 1)[-1]), "rb") as f:
                table = read_parquet(f)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable Parquet table ({e}); delete its marker under "
                             f"{MARKERS_DIR}/ and rerun perceptclip score to rewrite it") from None
        raw = (table.schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path}: not a perceptclip score table (no {METADATA_KEY.decode()!r} key in its "
                             f"Parquet metadata); move it out of {dest}")
        for model in json.loads(raw)["models"]:
            models.setdefault(model["name"], model)
        tables.append(table)
    # Shards scored by different runs may carry different models: missing columns become nulls.
    table = pa.concat_tables(tables, promote_options="default").replace_schema_metadata(None)
    return ScoreSet(dest=dest, table=table, models=list(models.values()), files=files,
                    runs=_read_runs(dest, options),
                    uncommitted=[p for p in parquet if p not in files])


def _read_runs(dest: str, options: dict) -> list[dict]:
    fs, paths = json_files(join(dest, RUNS_DIR), options)
    runs = []
    for path in paths:
        try:
            runs.append(json.loads(fs.cat_file(path)))
        except ValueError as e:
            name = join(dest, RUNS_DIR, path.rsplit("/", 1)[-1])
            raise ValueError(f"{name}: not a readable run summary ({e}); move it out of {join(dest, RUNS_DIR)}") from None
    return sorted(runs, key=lambda r: r.get("started_at") or "")


# --- distributions ------------------------------------------------------------------------------------

def quantiles(scores: ScoreSet, levels=DEFAULT_LEVELS) -> dict[str, dict]:
    """Per score column: how many rows have a score, their mean, and the value at each level
    (numpy's default, linear interpolation); None throughout for a column with no scores."""
    out = {}
    for column in scores.score_columns():
        values = scores.values(column)
        if len(values):
            at = np.quantile(values, levels)
            out[column] = {"count": len(values), "mean": float(values.mean()),
                           "quantiles": {_level(q): float(v) for q, v in zip(levels, at)}}
        else:
            out[column] = {"count": 0, "mean": None, "quantiles": {_level(q): None for q in levels}}
    return out


def class_shares(scores: ScoreSet) -> dict[str, dict[str, dict]]:
    """Per classifier: each label's count and share of the rows that have a label, in label order."""
    import pyarrow.compute as pc

    out = {}
    for model in scores.models:
        if not model.get("labels"):
            continue
        counted = pc.value_counts(scores.table[model["name"]].drop_null()).to_pylist()
        found = {c["values"]: c["counts"] for c in counted}
        total = sum(found.values())
        out[model["name"]] = {label: {"count": found.get(label, 0),
                                      "share": found.get(label, 0) / total if total else None}
                              for label in model["labels"]}
    return out


def _level(q: float) -> str:
    return f"{q:g}"


# --- what ``perceptclip quantiles`` prints ---------------------------------------------------------------

def where_share(scores: ScoreSet, text: str) -> dict:
    """How many samples ``perceptclip filter --where text`` would keep: the filter's own parser and
    evaluator, so the share printed here is the share the filter keeps."""
    from perceptclip.curation.expression import kept_rows, parse_expression

    expression = parse_expression(text)
    expression.check(scores.table.schema, {m["name"]: m["labels"] for m in scores.models if m.get("labels")})
    kept = kept_rows(scores.table, expression).num_rows
    total, ok = scores.table.num_rows, int(scores.ok.sum())
    return {"expression": text, "kept": kept, "samples": total, "share": kept / total if total else None,
            "scored": ok, "share_of_scored": kept / ok if ok else None}


def describe_scores(scores: ScoreSet, levels=DEFAULT_LEVELS, where: str | None = None) -> dict:
    """The JSON ``perceptclip quantiles --json`` prints. ``where``: also what that expression keeps."""
    ok = int(scores.ok.sum())
    out = {"scores_dest": scores.dest, "tables": len(scores.files),
           "samples": {"total": scores.table.num_rows, "ok": ok, "error": scores.table.num_rows - ok},
           "levels": list(levels), "quantiles": quantiles(scores, levels), "classes": class_shares(scores)}
    if where is not None:
        out["where"] = where_share(scores, where)
    return out


def format_description(description: dict) -> str:
    """``describe_scores`` as a table for people: one line per score column, one column per level."""
    levels = [_level(q) for q in description["levels"]]
    samples = description["samples"]
    stats = description["quantiles"]
    name_w = max([len("score")] + [len(c) for c in stats])
    lines = [f"{description['scores_dest']}: {samples['total']} samples in {description['tables']} tables, "
             f"{samples['ok']} scored, {samples['error']} errors", ""]
    lines.append(f"{'score':<{name_w}} {'n':>8} {'mean':>9} " + " ".join(f"{'q' + q:>9}" for q in levels))
    for column, s in stats.items():
        cells = [_cell(s["quantiles"][q]) for q in levels]
        lines.append(f"{column:<{name_w}} {s['count']:>8} {_cell(s['mean'])} " + " ".join(cells))
    for name, shares in description["classes"].items():
        ordered = sorted(shares.items(), key=lambda item: -item[1]["count"])
        lines += ["", f"{name}: " + ", ".join(
            f"{label} {s['count']} ({_percent(s['share'])})" for label, s in ordered)]
    where = description.get("where")
    if where is not None:
        lines += ["", f"--where {where['expression']!r} keeps {where['kept']} of {where['samples']} samples "
                      f"({_percent(where['share'])}), {where['kept']} of {where['scored']} scored "
                      f"({_percent(where['share_of_scored'])})"]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{'-' if value is None else format(value, '.4g'):>9}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"
