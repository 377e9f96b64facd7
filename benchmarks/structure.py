"""The shape of the code, measured: long modules, long functions and import cycles, now and at
an earlier commit, so a structural change states its before/after figures (issue 16).

    .venv/bin/python benchmarks/structure.py                 # the working tree vs 0ffb0d0
    .venv/bin/python benchmarks/structure.py --before HEAD~5

Reads the sources with `ast` (nothing is imported): a module's lines are its physical lines; a
function's, from its `def` to its last line (a nested function counts inside its parent too);
an import cycle is a strongly connected group of flywheel modules importing each other anywhere:
at module level, inside functions or under `if TYPE_CHECKING:` (as import-linter counts them: a
cycle of types is still two modules that cannot be understood apart).
Writes benchmarks/results/structure.{json,md}.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LONG_MODULE, LONG_FUNCTION = 400, 60


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The flywheel modules a file imports (a `from x import y` names module x.y when it is one)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found.update(subs or ({node.module} & known))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(groups)


def functions(path: Path, root: Path) -> list[tuple[str, int]]:
    """(file:line name, lines) of every function and method in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(root).as_posix()
    return [
        (f"{rel}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def measure(root: Path) -> dict:
    """The figures of the package `flywheel` under `root`."""
    found = modules(root / "flywheel")
    known = set(found)
    graph = {name: imports(path, known) - {name} for name, path in found.items()}
    sizes = {
        name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in found.items()
    }
    funcs = [f for path in found.values() for f in functions(path, root)]
    long_funcs = sorted((f for f in funcs if f[1] > LONG_FUNCTION), key=lambda f: -f[1])
    return {
        "modules": len(found),
        "lines": sum(sizes.values()),
        "modules_over_400_lines": {
            n: s for n, s in sorted(sizes.items(), key=lambda kv: -kv[1]) if s > LONG_MODULE
        },
        "functions": len(funcs),
        "functions_over_60_lines": dict(long_funcs),
        "import_cycles": cycles(graph),
    }


def at_commit(ref: str) -> dict:
    """The figures at a git commit (checked out into a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="flywheel-structure-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", ref, "flywheel"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        return measure(Path(tmp))


def markdown(before: dict, now: dict, ref: str) -> str:
    rows = [
        ("modules", "modules"),
        ("lines of code", "lines"),
        ("functions", "functions"),
        (f"modules over {LONG_MODULE} lines", "modules_over_400_lines"),
        (f"functions over {LONG_FUNCTION} lines", "functions_over_60_lines"),
        ("import cycles", "import_cycles"),
    ]

    def figure(value: object) -> str:
        return str(len(value)) if isinstance(value, dict | list) else f"{value:,}"

    lines = [
        "# Code structure",
        "",
        f"Measured by `benchmarks/structure.py` (ast, nothing imported); before = `{ref}`.",
        "",
        f"| | before ({ref}) | now |",
        "|---|---|---|",
        *(f"| {label} | {figure(before[k])} | {figure(now[k])} |" for label, k in rows),
    ]
    for title, key in (
        (f"Modules over {LONG_MODULE} lines", "modules_over_400_lines"),
        (f"Functions over {LONG_FUNCTION} lines", "functions_over_60_lines"),
    ):
        lines += ["", f"## {title} now", ""]
        lines += [f"- `{name}`: {n}" for name, n in now[key].items()] or ["- none"]
    lines += ["", "## Import cycles now", ""]
    lines += [f"- {' <-> '.join(c)}" for c in now["import_cycles"]] or ["- none"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="0ffb0d0", help="the commit to compare with")
    args = parser.parse_args()
    before, now = at_commit(args.before), measure(ROOT)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"before": {"commit": args.before, **before}, "now": now}
    (RESULTS / "structure.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / "structure.md").write_text(markdown(before, now, args.before))
    print(markdown(before, now, args.before))


if __name__ == "__main__":
    main()
