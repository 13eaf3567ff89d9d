"""The house: rooms import one way, in the order ``docs/architecture.md`` writes down, with no circles.

Every import of the package's own modules counts, inside functions too; only those under
``if TYPE_CHECKING:`` (annotations) do not."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline" / "perceptclip"


def floors() -> list[set[str]]:
    """The rooms by floor, lowest first, as the fenced block under '## Import order' lists them (top first)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"## Import order.*?```\n(.*?)```", text, re.S).group(1)
    rows = [set(line.split("|")[0].split()) for line in block.splitlines() if line.strip()]
    return rows[::-1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    """``perceptclip.scoring.job`` -> ``scoring``; ``perceptclip.cli`` -> ``cli``; the package -> ``perceptclip``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "perceptclip"


def own_imports(path: Path) -> set[str]:
    """The package's modules that ``path`` imports, anywhere but under ``if TYPE_CHECKING:``."""
    found: set[str] = set()
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "perceptclip":
                for alias in child.names:       # ``from perceptclip.model import debug`` names a module
                    sub = f"{child.module}.{alias.name}"
                    found.add(sub if sub in modules else child.module)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "perceptclip")
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    return {module_name(p): own_imports(p) - {module_name(p)} for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_room_is_on_a_floor_of_the_written_order():
    rooms = {room(m) for m in graph()}
    listed = set().union(*floors())
    assert rooms == listed, f"rooms not in docs/architecture.md: {rooms - listed}; listed but absent: {listed - rooms}"


def test_imports_run_one_way_down_the_floors():
    level = {name: i for i, floor in enumerate(floors()) for name in floor}
    wrong = [f"{m} imports {other}" for m, imported in graph().items() for other in sorted(imported)
             if room(m) != room(other) and level[room(other)] >= level[room(m)]
             and room(m) != "perceptclip"]      # the package's face names what it offers, lazily
    assert not wrong, "imports against the order of docs/architecture.md:\n" + "\n".join(wrong)


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for other in sorted(edges.get(node, ())):
            if state.get(other) == 1:
                circles.append(path[path.index(other):] + [other])
            elif other not in state:
                walk(other, path + [other])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            walk(start, [start])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_a_lower_room_that_imports_a_higher_one_is_caught(tmp_path, monkeypatch):
    """The check itself can fail: a core module that imports the scoring job, even inside a function, is
    reported; one that does so only for annotations is not."""
    fake = tmp_path / "perceptclip"
    (fake / "core").mkdir(parents=True)
    (fake / "scoring").mkdir()
    (fake / "scoring" / "job.py").write_text("")
    (fake / "core" / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from perceptclip.scoring.job import run\n")
    (fake / "core" / "bad.py").write_text("def f():\n    from perceptclip.scoring.job import run\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="perceptclip.core.bad imports perceptclip.scoring.job"):
        test_imports_run_one_way_down_the_floors()
    assert graph()["perceptclip.core.typed"] == set()


def test_ruff_finds_nothing_on_the_tree():
    """The lint rules of pyproject.toml ([tool.ruff]) hold on the library, the tests, scripts and benchmarks."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "pipeline", "tests", "scripts",
                             "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_modules_and_functions_stay_within_their_size_limits():
    """scripts/code_stats.py: no module over 400 lines, no function over 60."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "scripts/code_stats.py"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
