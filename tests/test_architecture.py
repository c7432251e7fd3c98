"""The package's floors, read from its source: imports at any depth (function-level ones included).

core < methods < training < serve < tools < cli: a module imports only from its own floor or the floors
below. No import cycles; import chains inside core at most 4 imports long; no module over 500 lines, no
function over 60 lines of code; no underscore name imported from another module.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lorakit"
FLOORS = ["core", "methods", "training", "serve", "tools", "cli"]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
MAX_CORE_CHAIN = 4


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@lru_cache(maxsize=None)
def imports() -> dict[str, set[tuple[str, str]]]:
    """{module: {(imported lorakit module, imported name or '')}} over every import statement in it."""
    known = modules()
    graph: dict[str, set[tuple[str, str]]] = {}
    for name, path in known.items():
        edges: set[tuple[str, str]] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {(a.name, "") for a in node.names if a.name.startswith("lorakit")}
            elif isinstance(node, ast.ImportFrom):
                target = resolve(node, name, path.name == "__init__.py")
                if not target.startswith("lorakit"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add((sub, "") if sub in known else (target, alias.name))
        graph[name] = {(m, n) for m, n in edges if m in known and m != name}
    return graph


def module_graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in edges} for m, edges in imports().items()}


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOORS) else None


def test_no_import_cycles():
    graph, state, cycles = module_graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_imports_point_down():
    upward = []
    for module, targets in module_graph().items():
        here = floor(module)
        if here is None:
            continue  # lorakit/__init__.py and __main__.py sit above every floor
        upward += [f"{module} -> {t}" for t in targets if floor(t) is None or floor(t) > here]
    assert not upward, "imports from a lower floor to a higher one:\n" + "\n".join(sorted(upward))


def test_core_import_chains_are_short():
    graph = {m: {t for t in ts if t.startswith("lorakit.core.")} for m, ts in module_graph().items()
             if m.startswith("lorakit.core.")}

    @lru_cache(maxsize=None)
    def depth(m: str) -> int:
        return max((1 + depth(t) for t in graph[m]), default=0)

    longest = {m: depth(m) for m in graph}
    assert max(longest.values()) <= MAX_CORE_CHAIN, sorted(longest.items(), key=lambda kv: -kv[1])[:3]


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for name, path in modules().items():
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {source.count(chr(10))} lines")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                code = [i for i in range(body[0].lineno - 1, node.end_lineno)
                        if lines[i].strip() and not lines[i].strip().startswith("#")] if body else []
                if len(code) > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {len(code)} lines of code")
    assert not long_modules and not long_functions, long_modules + long_functions


def test_no_private_names_across_modules():
    crossing = [f"{m} imports {t}.{n}" for m, edges in imports().items() for t, n in edges if n.startswith("_")]
    assert not crossing, crossing


def test_test_files_have_unique_basenames():
    # pytest imports test files by basename (rootdir mode): two test_config.py in different folders clash
    tests = Path(__file__).parent
    names = [p.name for p in tests.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
