"""Issue #15: small rooms. No module in graphopt/ or transforms/ over 500 lines, no function
over 80, and no two modules importing each other at import time (AST only: cheap)."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"graphopt": "graphopt", "transforms": "graphopt.transforms"}


def _modules():
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if folder == "graphopt" and parts[0] == "transforms":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _import_time(body):
    for n in body:
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            yield n
        elif isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            continue  # never runs
        elif isinstance(n, (ast.If, ast.Try)):
            for block in (n.body, n.orelse, getattr(n, "finalbody", [])):
                yield from _import_time(block)
            for h in getattr(n, "handlers", []):
                yield from _import_time(h.body)


def _edges(name, path):
    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for n in _import_time(ast.parse(path.read_text()).body):
        if isinstance(n, ast.Import):
            yield from (a.name for a in n.names if a.name in MODULES)
            continue
        target = n.module
        if n.level:
            parts = base.split(".")
            target = ".".join(parts[:len(parts) - n.level + 1] + ([n.module] if n.module else []))
        if target not in MODULES:
            continue
        for a in n.names:
            sub = f"{target}.{a.name}"
            yield sub if sub in MODULES else target


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_and_functions_are_small(name):
    src = MODULES[name].read_text()
    assert src.count("\n") <= 500, f"{MODULES[name]}: {src.count(chr(10))} lines (> 500)"
    long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in ast.walk(ast.parse(src))
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            and f.end_lineno - f.lineno + 1 > 80]
    assert not long, f"{MODULES[name]}: functions over 80 lines: {long}"


def test_no_import_cycles():
    graph = {m: {e for e in _edges(m, p) if e != m} for m, p in MODULES.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for e in sorted(graph[m]):
            if state.get(e) == "open":
                cycles.append(stack[stack.index(e):] + [e])
            elif e not in state:
                visit(e, stack + [e])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_passes_keep_their_state_in_rw_state_not_on_the_rewriter():
    # Per-level state goes through rewrite(state=...): no pass hangs attributes on `rw`.
    from graphopt.interpreter import Rewriter
    declared = set(vars(Rewriter(None, None, True, 0)))
    stray = [(path.name, node.attr) for path in MODULES.values()
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
             and isinstance(node.value, ast.Name) and node.value.id == "rw"
             and node.attr not in declared]
    assert not stray, stray
