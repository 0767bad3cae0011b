"""The house rules on the package's shape (DEVELOPERS notes): no import cycles among minisft's
modules, every module <= 400 lines, every function <= 100 lines. Subpackages included.

Imports are read from the source (ast), wherever they stand -- at the top of a module or inside a
function, where a lazy import would only hide a cycle. Only an `if __name__ == "__main__":` block
is left out: it runs when the file is a script, as the module __main__, not as a minisft module.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "minisft"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 100


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_main_block(node):
    """`if __name__ == "__main__":`"""
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and len(t.comparators) == 1 and getattr(t.comparators[0], "value", None) == "__main__")


def imported_modules(name, path):
    """The minisft modules that module `name` (file `path`) imports, outside its __main__ block."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node):
        if is_main_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                up = package.split(".")
                base = ".".join(up[:len(up) - node.level + 1] + ([base] if base else []))
            # `from pkg import x` imports the module pkg.x when there is one, else a name of pkg
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    # A parent package is imported before any of its modules: that is not an edge of a cycle.
    return {m for m in found if m in MODULES and m != name and not name.startswith(m + ".")}


def find_cycles(graph):
    """-> the cycles of `graph` ({module: set of modules}), each as a list [a, b, ..., a]."""
    cycles, done = [], set()

    def walk(node, path):
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            walk(nxt, path + [node])
        done.add(node)

    for start in sorted(graph):
        walk(start, [])
    return cycles


def test_the_graph_sees_imports():
    # The check below can only pass honestly if the graph holds the imports: a few that must be there.
    graph = {n: imported_modules(n, p) for n, p in MODULES.items()}
    assert "minisft.loss" in graph["minisft.train"] and "minisft.cli" in graph["minisft.train"]
    assert "minisft.lora" in graph["minisft.weights"] and "minisft.files" in graph["minisft.weights"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = {n: imported_modules(n, p) for n, p in MODULES.items()}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_and_function_sizes(name):
    source = MODULES[name].read_text(encoding="utf-8")
    problems = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        problems.append(f"{lines} lines (at most {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                problems.append(f"{node.name}() at line {node.lineno} is {n} lines (at most {MAX_FUNCTION_LINES})")
    assert not problems, f"{MODULES[name].relative_to(ROOT)}: " + "; ".join(problems)


def test_the_readme_stays_a_students_entry():
    """At most 25 KB (25,000 bytes), and it starts with the two commands: the main job, then the tests."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= 25_000
    commands = [ln.strip() for ln in text.splitlines() if ln.startswith("    pip install")]
    assert commands[:2] == ["pip install -r requirements.txt && python3 lessons/06_sft_loop.py",
                            "pip install -r requirements-dev.txt && python3 -m pytest tests -q"]
    assert "python3 -m pytest tests -q" in (ROOT / ".ci" / "run").read_text()
