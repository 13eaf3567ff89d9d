"""The keep-expression language of ``filter`` and ``quantiles --where``: parsed, checked, compiled.

The language is small and never evaluated as Python: the text is parsed with Python's own parser
(``ast``) and only these forms are accepted, then compiled to an Arrow expression that runs over each
score table:

    column names        iqa, emotion, emotion_awe, width, height, key, ...
    literals            0.6, -1, "fear", 'awe', true, false
    comparisons         <  <=  >  >=  ==  !=   (chains too: 0.2 < iqa <= 0.9)
    membership          emotion in ["awe", "amusement"],  emotion not in ("fear",)
    logic               and, or, not, parentheses; a bare true (keep every scored sample) or false

Checked against a table before any work: every column exists, like is compared with like, and a
string compared with a classifier's column is one of its classes (from the table's metadata). Only
scored samples (status ``ok``) are ever kept. Errors name the column (counting from 1) where they are.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass

import pyarrow as pa

from perceptclip.core.schema import METADATA_KEY

LITERAL_NAMES = {"true": True, "false": False, "True": True, "False": False}
_COMPARISONS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}
MAX_DEPTH = 100                 # nesting levels an expression may have


class ExpressionError(ValueError):
    """An expression that is not in the language, or that does not fit the score table."""


@dataclass
class KeepExpression:
    text: str
    tree: ast.expr

    @property
    def columns(self) -> set[str]:
        return {n.id for n in ast.walk(self.tree) if isinstance(n, ast.Name) and n.id not in LITERAL_NAMES}

    def check(self, schema: pa.Schema, classes: dict[str, list[str]] | None = None, where: str = "the scores") -> None:
        """Every column exists in ``schema``, every comparison compares like with like, and every string
        compared with a classifier's column is one of its classes. ``classes``: {column: class names};
        by default read from the score table's metadata."""
        classes = table_classes(schema) if classes is None else classes
        for name in sorted(self.columns):
            if name not in schema.names:
                raise ExpressionError(f"--where: no column {name!r} in {where}; columns: {', '.join(schema.names)}")
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                for op, left, right in zip(node.ops, operands, operands[1:]):
                    _check_types(op, left, right, schema)
                    _check_classes(left, right, classes)

    def to_arrow(self):
        return _compile(self.tree)


def table_classes(schema: pa.Schema) -> dict[str, list[str]]:
    """{classifier column: its class names}, from a score table's metadata (none without it)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    models = json.loads(raw).get("models", []) if raw else []
    return {m["name"]: list(m["labels"]) for m in models if m.get("labels")}


def parse_expression(text: str) -> KeepExpression:
    """Parse ``text`` or raise ``ExpressionError`` saying what is wrong and where (columns count from 1)."""
    if not text or not text.strip():
        raise ExpressionError("--where: the expression is empty")
    text = text.strip()
    if "\0" in text:
        raise ExpressionError(f"--where: cannot parse {text!r} at column {text.index(chr(0)) + 1}: a NUL character")
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        # Python reports 0 (or nothing) for an error at the end of the text: that is one past its end
        column = e.offset if e.offset and e.offset > 0 else len(text) + 1
        raise ExpressionError(f"--where: cannot parse {text!r} at column {column}: {e.msg}") from None
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
                if not right.elts:
                    raise _unsupported(node, text, "'in' needs at least one value in its list")
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
    elif isinstance(node, ast.Name):
        pass                                    # a bare true or false: keep every scored sample, or none
    else:
        raise _unsupported(node, text, "only comparisons, 'in', 'and', 'or', 'not' and parentheses are allowed")


def _unsupported(node: ast.AST, text: str, why: str) -> ExpressionError:
    part = ast.get_source_segment(text.strip(), node) or ast.dump(node)
    return ExpressionError(f"--where: {why}: {part!r} (column {getattr(node, 'col_offset', 0) + 1})")


def _literal(node: ast.AST, text: str):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)) and node.value is not None:
        return _in_range(node.value)
    if isinstance(node, ast.Name) and node.id in LITERAL_NAMES:
        return LITERAL_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) and \
            isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float)):
        return _in_range(-node.operand.value if isinstance(node.op, ast.USub) else node.operand.value)
    raise _unsupported(node, text, "expected a column, a number, a quoted string, true or false")


def _in_range(value):
    """An integer beyond 64 bits compares as the float it is closest to (Arrow has no wider integer)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        return float(value)
    return value


def _value(node: ast.AST):
    return _literal(node, "")


def _literal_kind(value) -> str:
    return "boolean" if isinstance(value, bool) else "text" if isinstance(value, str) else "number"


def _column_kind(typ: pa.DataType) -> str | None:
    if pa.types.is_null(typ):                   # a column with no values at all fits anything
        return None
    if pa.types.is_boolean(typ):
        return "boolean"
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "text"
    return "number" if pa.types.is_integer(typ) or pa.types.is_floating(typ) else str(typ)


def _check_types(op: ast.cmpop, left: ast.AST, right: ast.AST, schema: pa.Schema) -> None:
    def kind(node):
        if isinstance(node, ast.Name) and node.id not in LITERAL_NAMES:
            return node.id, _column_kind(schema.field(node.id).type)
        kinds = {_literal_kind(v) for v in _values(node)}
        return None, kinds.pop() if len(kinds) == 1 else "mixed"

    (lname, lkind), (rname, rkind) = kind(left), kind(right)
    if lkind != rkind and None not in (lkind, rkind):
        column = lname or rname
        ckind = lkind if lname else rkind
        want = {"text": "a quoted string", "number": "a number", "boolean": "true or false"}.get(ckind)
        if want is None:
            raise ExpressionError(f"--where: {column} holds {ckind} values, which expressions cannot compare")
        raise ExpressionError(f"--where: {column} is {ckind}; compare it with {want}")


def _values(node: ast.AST) -> list:
    return [_value(e) for e in node.elts] if isinstance(node, (ast.List, ast.Tuple, ast.Set)) else [_value(node)]


def _check_classes(left: ast.AST, right: ast.AST, classes: dict[str, list[str]]) -> None:
    """A string compared with a classifier's column must be one of its classes: "Fear" or "feer" would
    otherwise keep all or nothing without a word."""
    for column, other in ((left, right), (right, left)):
        if isinstance(column, ast.Name) and column.id in classes and not isinstance(other, ast.Name):
            for value in _values(other):
                if isinstance(value, str) and value not in classes[column.id]:
                    raise ExpressionError(f"--where: {value!r} is not a class of {column.id}; its classes: "
                                          f"{', '.join(classes[column.id])}")


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
    if isinstance(node, ast.Name):              # a bare true or false (_validate admits no bare column)
        return pc.scalar(LITERAL_NAMES[node.id])
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


def kept_rows(table: pa.Table, expression: KeepExpression) -> pa.Table:
    import pyarrow.compute as pc

    return table.filter(expression.to_arrow() & (pc.field("status") == "ok"))
