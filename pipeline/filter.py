"""Curation: keep the samples whose scores pass an expression, as new WebDataset shards.

    perceptclip filter --scores s3://b/scores --where 'iqa > 0.6 and emotion != "fear"' --output s3://b/curated

The expression (``perceptclip.expression``) is checked against every score table before anything is
written. Only scored samples (status ``ok``) can be kept. Each kept sample is copied unchanged into a
shard of the same name under the output, with its models' score columns added to its ``.json``. Per
shard: the tar, then a marker recording the expression; a rerun skips shards with a marker and refuses
to mix in another expression (``--overwrite`` redoes every shard). The output must lie apart from the
score tables and the input shards: a curation never overwrites what it reads.

Nothing is ever written outside the output, whatever the shards and keys say. A curated shard's path
is the output folder plus the input shard's file name, refused (``unsafe_name``, the shard fails)
unless it is a plain file name. A kept sample whose file names in the new tar would be unsafe to
extract (absolute, a ``..`` segment, a drive letter, a NUL) is not written but refused, and so is one
whose ``.json`` cannot be read to add the scores (``unreadable_json``): the marker and the summary
count refused samples by reason, so ``of = kept + refused + not selected``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from perceptclip.commit import MARKERS_DIR, METADATA_KEY, committed_names, marker_path, table_path
from perceptclip.expression import KeepExpression, kept_rows, parse_expression
from perceptclip.shards import ShardError, parse_json, read_shard, shard_bytes, shard_name
from perceptclip.storage import check_apart, filesystem, holds, join, redact_text

_DRIVE = re.compile(r"^[A-Za-z]:")


# --- the job -------------------------------------------------------------------------------------------

@dataclass
class FilterSummary:
    scores: str
    output: str
    where: str
    done: list[dict] = field(default_factory=list)
    skipped: int = 0
    failed: list[dict] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        refused: Counter = Counter()
        for d in self.done:
            refused.update(d["refused"])
        return {"scores": self.scores, "output": self.output, "where": self.where,
                "shards": {"planned": len(self.done) + self.skipped + len(self.failed), "done": len(self.done),
                           "skipped": self.skipped, "failed": len(self.failed)},
                "samples": {"seen": sum(d["of"] for d in self.done), "kept": sum(d["kept"] for d in self.done)},
                "refused_by_reason": dict(refused),
                "failed_shards": self.failed, "duration_s": round(self.duration_s, 3)}


def committed_scores(scores: str, options: dict) -> list[dict]:
    """The markers of every committed score table under ``scores``, in name order."""
    fs, root = filesystem(join(scores, MARKERS_DIR), options)
    try:
        paths = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        paths = []
    if not paths:
        raise ValueError(f"--scores: no committed score tables under {scores}")
    return [json.loads(fs.cat_file(p)) for p in paths]


def output_name(shard: str) -> str:
    """The curated shard's file name (without .tar): the input shard's own, if it is a plain name."""
    name = shard_name(shard)
    if name in ("", ".", "..") or any(c in name for c in "/\\\0") or _DRIVE.match(name):
        raise ShardError("unsafe_name", f"{shard}: {name!r} is not a plain file name to write under the output")
    return name


def safe_member_name(name: str) -> bool:
    """Whether ``tar -x`` (or any extractor) would write ``name`` inside the folder it extracts into."""
    parts = re.split(r"[/\\]", name)
    return not (name.startswith(("/", "\\")) or ".." in parts or "\0" in name or _DRIVE.match(name))


def filter_shard(marker: dict, scores: str, expression: KeepExpression, output: str, options: dict) -> dict:
    """Write one curated shard and its marker; returns the marker."""
    import pyarrow.parquet as pq

    name = output_name(marker["shard"])
    # the table sits next to its marker, wherever the scores folder has been moved since
    fs, path = filesystem(table_path(scores, name), options)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    models = json.loads(table.schema.metadata[METADATA_KEY])["models"]
    score_columns = [c for m in models for c in m["columns"]]
    samples = read_shard(marker["shard"], options)
    if [s["__key__"] for s in samples] != table["key"].to_pylist():
        raise ShardError("changed", f"{marker['shard']}: its samples differ from those scored in {path}")
    kept = {row["key"]: row for row in kept_rows(table, expression).select(["key", *score_columns]).to_pylist()}
    out_samples, refused = [], Counter()
    for sample in samples:
        row = kept.get(sample["__key__"])
        if row is None:
            continue
        if not all(safe_member_name(f"{sample['__key__']}.{ext}") for ext in sample if not ext.startswith("__")):
            refused["unsafe_name"] += 1
            continue
        try:
            meta = parse_json(sample["json"]) if isinstance(sample.get("json"), bytes) else {}
            meta = meta if isinstance(meta, dict) else {"json": meta}
            meta.update({c: row[c] for c in score_columns})
            text = json.dumps(meta)
        except (ValueError, RecursionError):     # invalid, or nested deeper than json can write back
            refused["unreadable_json"] += 1
            continue
        out_samples.append({**sample, "json": text.encode()})
    data = shard_bytes(out_samples)
    out_fs, root = filesystem(output, options)
    out_fs.makedirs(join(root, MARKERS_DIR), exist_ok=True)
    out_fs.pipe_file(join(root, f"{name}.tar"), data)
    done = {"shard": marker["shard"], "output": join(output, f"{name}.tar"), "kept": len(out_samples),
            "refused": dict(refused), "of": len(samples), "where": expression.text,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    out_fs.pipe_file(marker_path(root, name), json.dumps(done, indent=2).encode())
    return done


def check_table(expression: KeepExpression, scores: str, marker: dict, options: dict) -> None:
    """The expression against one score table's columns and classes (tables of one folder may differ:
    a nightly run can add shards scored with other models)."""
    import pyarrow.parquet as pq

    name = shard_name(marker["shard"])
    fs, path = filesystem(table_path(scores, name), options)
    try:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(redact_text(f"--scores: cannot read the score table of {name} ({e})", options)) from None
    expression.check(schema, where=f"the score table of {name}")


def check_same_curation(output: str, where: str, options: dict) -> None:
    """A rerun into an output must finish the same curation, not mix a second one into it."""
    fs, root = filesystem(join(output, MARKERS_DIR), options)
    try:
        paths = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return
    for path in paths:
        try:
            earlier = json.loads(fs.cat_file(path)).get("where")
        except (ValueError, OSError):
            earlier = None
        if earlier != where:
            raise ValueError(f"--output: {output} holds shards curated with --where {earlier!r}, not {where!r}; "
                             f"choose another output, or --overwrite to redo every shard with the new expression")


def run_filter(scores: str, where: str, output: str, options: dict, overwrite: bool = False, workers: int = 4,
               progress: Callable[[str], None] = lambda line: None) -> FilterSummary:
    """Curate every committed score table under ``scores`` into ``output``. The expression is parsed and
    checked against the scores' schema before anything is read or written."""
    started = time.perf_counter()
    expression = parse_expression(where)
    markers = committed_scores(scores, options)
    check_apart("--output", output, {"the score tables": [scores], "input shards": [m["shard"] for m in markers]})
    if holds(scores, output):
        raise ValueError(f"--output: {output} lies inside --scores {scores}; write the curated shards elsewhere")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda m: check_table(expression, scores, m, options), markers))
    summary = FilterSummary(scores=scores, output=output, where=where)
    if not overwrite:
        check_same_curation(output, expression.text, options)
    done_names = set() if overwrite else committed_names(output, options)
    todo = [m for m in markers if shard_name(m["shard"]) not in done_names]
    summary.skipped = len(markers) - len(todo)

    def one(marker):
        try:
            return filter_shard(marker, scores, expression, output, options), None
        except ShardError as e:
            return None, {"shard": marker["shard"], "reason": e.reason, "message": e.message}
        except OSError as e:
            return None, {"shard": marker["shard"], "reason": "unreadable",
                          "message": redact_text(f"{type(e).__name__}: {e}", options)}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, failed in pool.map(one, todo):
            if failed:
                summary.failed.append(failed)
                progress(f"{shard_name(failed['shard'])}: FAILED {failed['reason']}: {failed['message']}")
            else:
                summary.done.append(done)
                progress(f"{shard_name(done['shard'])}: kept {done['kept']} of {done['of']}")
    summary.duration_s = time.perf_counter() - started
    return summary
