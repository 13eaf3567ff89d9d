"""The size limits of the library's code: no module over 400 lines, no function over 60.

    python scripts/code_stats.py [--max-module 400] [--max-function 60]

Prints each module's line count, the longest functions, the median and 90th percentile of function
lengths, and every limit exceeded; exits 1 when one is.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "pipeline" / "perceptclip"


def function_lengths(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((f"{path.relative_to(SOURCE)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-module", type=int, default=400)
    parser.add_argument("--max-function", type=int, default=60)
    args = parser.parse_args()

    modules = {str(p.relative_to(SOURCE)): len(p.read_text(encoding="utf-8").splitlines())
               for p in sorted(SOURCE.rglob("*.py"))}
    functions = [f for p in sorted(SOURCE.rglob("*.py")) for f in function_lengths(p)]
    sizes = sorted(n for _, n in functions)
    print(f"{len(modules)} modules, {sum(modules.values())} lines; {len(functions)} functions, "
          f"median {statistics.median(sizes):.0f} lines, 90th percentile {sizes[int(0.9 * (len(sizes) - 1))]}")
    for name, lines in sorted(modules.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  module   {lines:5d}  {name}")
    for name, lines in sorted(functions, key=lambda f: -f[1])[:8]:
        print(f"  function {lines:5d}  {name}")
    over = [f"module {n}: {k} lines > {args.max_module}" for n, k in modules.items() if k > args.max_module]
    over += [f"function {n}: {k} lines > {args.max_function}" for n, k in functions if k > args.max_function]
    for line in over:
        print(f"OVER: {line}")
    print("limits hold" if not over else f"{len(over)} over the limits")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
