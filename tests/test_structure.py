"""The shape of the package a newcomer reads: no import cycle under tfl/ (function-level imports
included), no module over ~400 lines, no function over ~80, and one --mode table that knows every mode."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tfl"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# Modules over the limit, and why; the test fails once one fits, so its entry goes too.
OVER_LIMIT = {
    "tfl/transferability.py": "four estimators, each with its paper's notation and a worked example in its docstring",
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tfl_imports(path: pathlib.Path, modules: set) -> set:
    """The tfl modules ``path`` imports, anywhere in the file (``from tfl import x`` counts as tfl.x)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules and name != module_name(path)}


def import_graph() -> dict:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): tfl_imports(p, modules) for p in paths}


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return path[path.index(child):] + [child]
            if child not in state:
                cycle = visit(child, path + [child])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_under_tfl():
    graph = import_graph()
    assert "tfl.runner" in graph["tfl.job"] and "tfl.report" in graph["tfl.job"]  # the graph sees real imports
    cycle = find_cycle({name: deps - {"tfl"} for name, deps in graph.items()})
    assert cycle is None, " -> ".join(cycle)
    assert not {"tfl.report", "tfl.job"} & graph["tfl.runner"], "the runner must never import report or job"


def test_modules_and_functions_stay_readable_in_one_sitting():
    too_long, functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(ROOT))
        source = path.read_text()
        lines = len(source.splitlines())
        if (lines > MAX_MODULE_LINES) != (name in OVER_LIMIT):
            too_long.append(f"{name}: {lines} lines" + (" (fits now: drop it from OVER_LIMIT)" if lines <= MAX_MODULE_LINES else ""))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    functions.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, too_long
    assert not functions, functions


def test_every_mode_has_one_function():
    from tfl import config, job

    assert set(job.MODE_FUNCTIONS) == set(config.MODES)
    assert all(callable(f) for f in job.MODE_FUNCTIONS.values())
