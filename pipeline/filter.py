"""Curation: keep the samples whose scores pass an expression, as new WebDataset shards.

    perceptclip filter --scores s3://b/scores --where 'iqa > 0.6 and emotion != "fear"' --output s3://b/curated

The expression language is small and never evaluated as Python: the text is parsed with Python's own
parser (``ast``) and only these forms are accepted, then compiled to an Arrow expression that runs
over each score table:

    column names        iqa, emotion, emotion_awe, width, height, key, ...
    literals            0.6, -1, "fear", 'awe', true, false
    comparisons         <  <=  >  >=  ==  !=   (chains too: 0.2 < iqa <= 0.9)
    membership          emotion in ["awe", "amusement"],  emotion not in ("fear",)
    logic               and, or, not, parentheses

Only scored samples (status ``ok``) can be kept. Each kept sample is copied unchanged into a shard
of the same name under the output, with its models' score columns added to its ``.json``. Per shard:
the tar, then a marker; a rerun skips shards with a marker.

Nothing is ever written outside the output, whatever the shards and keys say. A curated shard's path
is the output folder plus the input shard's file name, refused (``unsafe_name``, the shard fails)
unless it is a plain file name. A kept sample whose file names in the new tar would be unsafe to
extract (absolute, a ``..`` segment, a drive letter, a NUL) is not written but refused, and so is one
whose ``.json`` cannot be read to add the scores (``unreadable_json``): the marker and the summary
count refused samples by reason, so ``of = kept + refused + not selected``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from perceptclip.shards import ShardError, parse_json, read_shard, shard_bytes, shard_name
from perceptclip.storage import filesystem, join, redact_text

MARKERS_DIR = "_markers"
LITERAL_NAMES = {"true": True, "false": False, "True": True, "False": False}
_COMPARISONS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}
_DRIVE = re.compile(r"^[A-Za-z]:")
MAX_DEPTH = 100                 # nesting levels an expression may have


class ExpressionError(ValueError):
    """An expression that is not in the language, or that does not fit the score table."""


# --- expressions ---------------------------------------------------------------------------------------

@dataclass
class KeepExpression:
    text: str
    tree: ast.expr

    @property
    def columns(self) -> set[str]:
        return {n.id for n in ast.walk(self.tree) if isinstance(n, ast.Name) and n.id not in LITERAL_NAMES}

    def check(self, schema: pa.Schema) -> None:
        """Every column exists and every comparison compares like with like."""
        for name in sorted(self.columns):
            if name not in schema.names:
                raise ExpressionError(f"--where: no column {name!r} in the scores; columns: {', '.join(schema.names)}")
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                for op, left, right in zip(node.ops, operands, operands[1:]):
                    _check_types(op, left, right, schema)

    def to_arrow(self):
        return _compile(self.tree)


def parse_expression(text: str) -> KeepExpression:
    """Parse ``text`` or raise ``ExpressionError`` saying what is wrong and where."""
    if not text or not text.strip():
        raise ExpressionError("--where: the expression is empty")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ExpressionError(f"--where: cannot parse {text!r} at column {e.offset}: {e.msg}") from None
    except (RecursionError, MemoryError):       # Python's parser gives up on "not not not ..." this way
        raise ExpressionError(f"--where: nested more than {MAX_DEPTH} levels deep") from None
    if _depth(tree) > MAX_DEPTH:                # checked without recursion: checking and compiling recurse
        raise ExpressionError(f"--where: nested more than {MAX_DEPTH} levels deep")
    _validate(tree, text)
    return KeepExpression(text=text, tree=tree)


def _depth(tree: ast.AST) -> int:
    deepest, todo = 0, [(tree, 1)]
    while todo:
        node, depth = todo.pop()
        deepest = max(deepest, depth)
        todo += [(child, depth + 1) for child in ast.iter_child_nodes(node)]
    return deepest


def _validate(node: ast.AST, text: str) -> None:
    if isinstance(node, ast.BoolOp) and isinstance(node.op, (ast.And, ast.Or)):
        for value in node.values:
            _validate(value, text)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        _validate(node.operand, text)
    elif isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands, operands[1:]):
            if isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(left, ast.Name) or not isinstance(right, (ast.List, ast.Tuple, ast.Set)):
                    raise _unsupported(node, text, "'in' takes a column on the left and a list on the right")
                for item in right.elts:
                    _literal(item, text)
            elif type(op) in _COMPARISONS:
                for side in (left, right):
                    if not isinstance(side, ast.Name):
                        _literal(side, text)
                if not any(isinstance(side, ast.Name) and side.id not in LITERAL_NAMES for side in (left, right)):
                    raise _unsupported(node, text, "a comparison needs a column on one side")
            else:
                raise _unsupported(node, text, f"operator {type(op).__name__} is not supported")
    elif isinstance(node, ast.Name) and node.id not in LITERAL_NAMES:
        raise _unsupported(node, text, f"a bare column ({node.id}) is not a condition; compare it with something")
    else:
        raise _unsupported(node, text, "only comparisons, 'in', 'and', 'or', 'not' and parentheses are allowed")


def _unsupported(node: ast.AST, text: str, why: str) -> ExpressionError:
    part = ast.get_source_segment(text.strip(), node) or ast.dump(node)
    return ExpressionError(f"--where: {why}: {part!r} (column {getattr(node, 'col_offset', 0) + 1})")


def _literal(node: ast.AST, text: str):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)) and node.value is not None:
        return node.value
    if isinstance(node, ast.Name) and node.id in LITERAL_NAMES:
        return LITERAL_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) and \
            isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float)):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    raise _unsupported(node, text, "expected a column, a number, a quoted string, true or false")


def _value(node: ast.AST):
    return _literal(node, "")


def _check_types(op: ast.cmpop, left: ast.AST, right: ast.AST, schema: pa.Schema) -> None:
    def kind(node):
        if isinstance(node, ast.Name) and node.id not in LITERAL_NAMES:
            typ = schema.field(node.id).type
            if pa.types.is_null(typ):               # a column with no values at all fits anything
                return node.id, None
            return node.id, "text" if pa.types.is_string(typ) or pa.types.is_large_string(typ) else "number"
        values = [_value(e) for e in node.elts] if isinstance(node, (ast.List, ast.Tuple, ast.Set)) else [_value(node)]
        kinds = {"text" if isinstance(v, str) else "number" for v in values}
        return None, kinds.pop() if len(kinds) == 1 else "mixed"

    (lname, lkind), (rname, rkind) = kind(left), kind(right)
    if lkind != rkind and None not in (lkind, rkind):
        column = lname or rname
        ckind = lkind if lname else rkind
        want = "a quoted string" if ckind == "text" else "a number"
        raise ExpressionError(f"--where: {column} is {ckind}; compare it with {want}")


def _compile(node: ast.AST):
    import pyarrow.compute as pc

    if isinstance(node, ast.BoolOp):
        parts = [_compile(v) for v in node.values]
        out = parts[0]
        for part in parts[1:]:
            out = out & part if isinstance(node.op, ast.And) else out | part
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ~_compile(node.operand)
    if isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        terms = []
        for op, left, right in zip(node.ops, operands, operands[1:]):
            if isinstance(op, (ast.In, ast.NotIn)):
                column = pc.field(left.id)
                term = column.isin(pa.array([_value(e) for e in right.elts]))
                # isin gives false, not null, for a null value: keep nulls null so "not in" keeps no error row
                term = pc.if_else(column.is_valid(), term, pa.scalar(None, pa.bool_()))
                terms.append(~term if isinstance(op, ast.NotIn) else term)
            else:
                a = pc.field(left.id) if isinstance(left, ast.Name) else pc.scalar(_value(left))
                b = pc.field(right.id) if isinstance(right, ast.Name) else pc.scalar(_value(right))
                terms.append({"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b,
                              "!=": a != b}[_COMPARISONS[type(op)]])
        out = terms[0]
        for term in terms[1:]:
            out = out & term
        return out
    raise ExpressionError(f"--where: cannot compile {ast.dump(node)}")   # _validate admits nothing else


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


def kept_rows(table: pa.Table, expression: KeepExpression) -> pa.Table:
    import pyarrow.compute as pc

    return table.filter(expression.to_arrow() & (pc.field("status") == "ok"))


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
    fs, path = filesystem(join(scores, f"{name}.parquet"), options)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    models = json.loads(table.schema.metadata[b"perceptclip"])["models"]
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
    out_fs.pipe_file(join(root, MARKERS_DIR, f"{name}.json"), json.dumps(done, indent=2).encode())
    return done


def run_filter(scores: str, where: str, output: str, options: dict, overwrite: bool = False, workers: int = 4,
               progress: Callable[[str], None] = lambda line: None) -> FilterSummary:
    """Curate every committed score table under ``scores`` into ``output``. The expression is parsed and
    checked against the scores' schema before anything is read or written."""
    import pyarrow.parquet as pq

    started = time.perf_counter()
    expression = parse_expression(where)
    markers = committed_scores(scores, options)
    fs, path = filesystem(join(scores, f"{shard_name(markers[0]['shard'])}.parquet"), options)
    with fs.open(path, "rb") as f:
        expression.check(pq.read_schema(f))
    summary = FilterSummary(scores=scores, output=output, where=where)
    done_names: set[str] = set()
    if not overwrite:
        out_fs, root = filesystem(join(output, MARKERS_DIR), options)
        try:
            done_names = {p.rsplit("/", 1)[-1].removesuffix(".json") for p in out_fs.ls(root, detail=False)}
        except FileNotFoundError:
            pass
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
