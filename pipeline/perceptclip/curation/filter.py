"""Curation: keep the samples whose scores pass an expression, as new shards of the kind they came from.

    perceptclip filter --scores s3://b/scores --where 'iqa > 0.6 and emotion != "fear"' --output s3://b/curated

The expression (``perceptclip.curation.expression``) is checked against every score table before anything is
written. Only scored samples (status ``ok``) can be kept. What a curated shard is, by input kind:

    tars                      a tar: each kept sample unchanged, its models' scores added to its ``.json``
    Parquet with the images   a Parquet file of the kept rows, every column of theirs, score columns added
    tables, image files       a Parquet table of the kept images' locations (``url``) and scores
    ``form="webdataset"``     a tar from any kind: ``key.<format>`` and ``key.json`` (the key as scored,
                              where the image was read from, the scores); a tar key has no dots (``_``)

A curated shard is named after the input shard (``.tar`` or ``.parquet``). Per shard: the curated
file, then a marker recording the expression. The output is opened through ``output.destination``: it
must lie apart from the score tables, the inputs they were scored from and the input shards (a curation
never overwrites what it reads), and a rerun with another expression or format is refused;
``--overwrite`` removes the earlier curation's files and redoes every shard. A rerun skips shards with
a marker.

Nothing is ever written outside the output, whatever the shards and keys say. A curated shard's path
is the output folder plus the input shard's file name, refused (``unsafe_name``, the shard fails)
unless it is a plain file name. A kept sample whose file names in the new tar would be unsafe to
extract (absolute, a ``..`` segment, a drive letter, a NUL) is not written but refused, and so is one
whose ``.json`` cannot be read to add the scores (``unreadable_json``): the marker and the summary
count refused samples by reason, so ``of = kept + refused + not selected``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from perceptclip.core.schema import METADATA_KEY
from perceptclip.core.storage import filesystem, join, read_parquet, redact_text
from perceptclip.curation.expression import KeepExpression, kept_rows, parse_expression
from perceptclip.inputs.shards import ShardError, parse_json, shard_bytes, shard_name
from perceptclip.output.destination import Destination, made_from
from perceptclip.output.layout import MARKERS_DIR, committed_names, json_files, marker_path, read_markers, table_path

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
    fs, paths = json_files(join(scores, MARKERS_DIR), options)
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


CURATED_FORMATS = ("auto", "webdataset")   # auto: tars from tars, Parquet from the rest
_EXTENSIONS = {"JPEG": "jpg", "TIFF": "tif", "JPEG2000": "jp2"}


def filter_shard(marker: dict, scores: str, expression: KeepExpression, output: str, options: dict,
                 form: str = "auto") -> dict:
    """Write one curated shard and its marker; returns the marker."""
    from perceptclip.inputs.base import InputSpec
    from perceptclip.inputs.kinds import open_shard
    from perceptclip.inputs.parquet import ParquetReader
    from perceptclip.inputs.tar import TarReader

    name = output_name(marker["shard"])
    # the table sits next to its marker, wherever the scores folder has been moved since
    fs, path = filesystem(table_path(scores, name), options)
    with fs.open(path, "rb") as f:
        table = read_parquet(f)
    models = json.loads(table.schema.metadata[METADATA_KEY])["models"]
    score_columns = [c for m in models for c in m["columns"]]
    with open_shard(marker["shard"], InputSpec(), options, check=True) as reader:
        if isinstance(reader, TarReader) or form == "webdataset":
            samples = input_samples(reader, table, expression, options)
            whole = isinstance(reader, (TarReader, ParquetReader))        # every sample, not only the kept
            if whole and [s["__key__"] for s in samples] != table["key"].to_pylist():
                raise ShardError("changed", f"{marker['shard']}: its samples differ from those scored in {path}")
            data, kept, refused = curated_tar(samples, table, expression, score_columns)
            suffix = ".tar"
        elif isinstance(reader, ParquetReader):
            data, kept = curated_parquet(reader, table, expression, score_columns, path)
            refused, suffix = Counter(), ".parquet"
        else:               # a table of locations, a folder of image files: where the kept images are, and scores
            kept_table = kept_rows(table, expression).drop_columns(["status", "error"])
            data, kept, refused, suffix = parquet_bytes(kept_table), kept_table.num_rows, Counter(), ".parquet"
    out_fs, root = filesystem(output, options)
    out_fs.makedirs(join(root, MARKERS_DIR), exist_ok=True)
    out_fs.pipe_file(join(root, f"{name}{suffix}"), data)
    done = {"shard": marker["shard"], "output": join(output, f"{name}{suffix}"), "kept": kept,
            "refused": dict(refused), "of": table.num_rows, "where": expression.text,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    out_fs.pipe_file(marker_path(root, name), json.dumps(done, indent=2).encode())
    return done


def input_samples(reader, table: pa.Table, expression: KeepExpression, options: dict) -> list[dict]:
    """The samples to write as a tar: a tar's or a Parquet file's own (every one, in order); for a table of
    locations or a folder of image files, only the kept images, fetched from where they were read."""
    from perceptclip.inputs.parquet import ParquetReader
    from perceptclip.inputs.tables import fetch_images
    from perceptclip.inputs.tar import TarReader

    if isinstance(reader, TarReader):
        return reader.samples
    if isinstance(reader, ParquetReader):
        return [s for block in reader.blocks(256) for s in block]
    located = ({"__key__": r["key"], "__url__": r["url"]} for r in kept_rows(table, expression).to_pylist())
    return list(fetch_images(located, options, workers=16, timeout=60.0))


def curated_tar(samples: list[dict], table: pa.Table, expression: KeepExpression,
                score_columns: list[str]) -> tuple[bytes, int, Counter]:
    """The kept samples as a tar, each with its scores added to its ``.json``; and the refused, by reason."""
    kept = {row["key"]: row for row in kept_rows(table, expression).select(["key", *score_columns]).to_pylist()}
    out_samples, refused, names = [], Counter(), set()
    for sample in samples:
        row = kept.get(sample["__key__"])
        if row is None:
            continue
        sample, problem = as_tar_sample(sample)
        if problem is None and not all(safe_member_name(f"{sample['__key__']}.{ext}") for ext in sample
                                       if not ext.startswith("__")):
            problem = "unsafe_name"
        if problem is None and sample["__key__"] in names:
            problem = "duplicate_key"          # two keys that differ only by a dot, once written as a tar key
        if problem is None:
            try:
                meta = parse_json(sample["json"]) if isinstance(sample.get("json"), bytes) else {}
                meta = meta if isinstance(meta, dict) else {"json": meta}
                meta.update({c: row[c] for c in score_columns})
                sample = {**sample, "json": json.dumps(meta).encode()}
            except (ValueError, RecursionError):     # invalid, or nested deeper than json can write back
                problem = "unreadable_json"
        if problem is not None:
            refused[problem] += 1
            continue
        names.add(sample["__key__"])
        out_samples.append(sample)
    return shard_bytes(out_samples), len(out_samples), refused


def as_tar_sample(sample: dict) -> tuple[dict, str | None]:
    """A sample as a tar holds it. One read from Parquet, a table or a folder becomes ``key.<format>`` and
    ``key.json`` (its own key and where it was read from); a tar key has no dots, so they become ``_``."""
    if "__image__" not in sample:
        return sample, None
    if sample.get("__error__") or sample.get("__image__") is None:       # gone, or changed, since it was scored
        return sample, (sample.get("__error__") or "no_image:").split(":", 1)[0]
    from PIL import Image

    try:
        with Image.open(io.BytesIO(sample["__image__"])) as img:
            ext = _EXTENSIONS.get(img.format, str(img.format).lower())
    except Exception:
        return sample, "not_an_image"
    meta = {"key": sample["__key__"], "url": sample.get("__url__")}
    return {"__key__": sample["__key__"].replace(".", "_"), ext: sample["__image__"],
            "json": json.dumps(meta).encode()}, None


def curated_parquet(reader, table: pa.Table, expression: KeepExpression, score_columns: list[str],
                    path: str) -> tuple[bytes, int]:
    """The kept rows of a Parquet file with the images inside, every column of theirs, scores added."""
    rows = reader.parquet.read()
    keys = [str(k) for k in rows[reader.key].to_pylist()] if reader.key else [str(i) for i in range(rows.num_rows)]
    if keys != table["key"].to_pylist():
        raise ShardError("changed", f"{reader.url}: its rows differ from those scored in {path}")
    clash = sorted(set(score_columns) & set(rows.column_names))
    if clash:
        raise ShardError("column_clash", f"{reader.url}: already has the score columns {', '.join(clash)}")
    numbered = table.append_column("__row__", pa.array(range(table.num_rows), pa.int64()))
    kept = kept_rows(numbered, expression)
    out = rows.take(kept["__row__"])
    for column in score_columns:
        out = out.append_column(column, kept[column])
    return parquet_bytes(out), out.num_rows


def parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


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


def legacy_curation(output: str, form: str, options: dict) -> dict | None:
    """A curation written before outputs had records: the expression its markers record."""
    wheres = {m.get("where") for m in read_markers(output, options)}
    return {"where": sorted(wheres, key=str)[0] if len(wheres) == 1 else sorted(map(str, wheres)),
            "format": form} if wheres else None


def run_filter(scores: str, where: str, output: str, options: dict, overwrite: bool = False, workers: int = 4,
               progress: Callable[[str], None] = lambda line: None, form: str = "auto") -> FilterSummary:
    """Curate every committed score table under ``scores`` into ``output``. The expression is parsed and
    checked against the scores' schema before anything is read or written."""
    started = time.perf_counter()
    if form not in CURATED_FORMATS:
        raise ValueError(f"--format: one of {', '.join(CURATED_FORMATS)}, not {form!r}")
    expression = parse_expression(where)
    markers = committed_scores(scores, options)
    settings = {"where": expression.text, "format": form}
    dest = Destination.open(output, "filter", options, overwrite=overwrite, settings=settings,
                            earlier=lambda: legacy_curation(output, form, options),
                            inputs={"the score tables folder": [scores], "the scored inputs": made_from(scores, options),
                                    "input shards": [m["shard"] for m in markers]},
                            made_from=[{"url": scores, "kind": "scores"}])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda m: check_table(expression, scores, m, options), markers))
    summary = FilterSummary(scores=scores, output=output, where=where)
    dest.begin()
    done_names = set() if overwrite else committed_names(output, options)
    todo = [m for m in markers if shard_name(m["shard"]) not in done_names]
    summary.skipped = len(markers) - len(todo)

    def one(marker):
        try:
            return filter_shard(marker, scores, expression, output, options, form), None
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
