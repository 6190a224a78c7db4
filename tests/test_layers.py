"""The package's import graph: no circle, and no import that goes up a layer (docs/architecture.md).

Every import counts, including those inside functions: an import hidden in a function closes a circle all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "subfore"

# Lowest first; a module may import its own layer's modules (without a circle) and any layer below.
LAYERS = [
    ["subfore", "subfore.errors", "subfore.preempt", "subfore._quiet", "subfore.io", "subfore.dist",
     "subfore.report"],
    ["subfore.masking"],
    ["subfore.data"],
    ["subfore.models"],
    ["subfore.config"],
    ["subfore.engine", "subfore.inference", "subfore.visualize", "subfore.probe"],
    ["subfore.pretrain", "subfore.finetune"],
    ["subfore.evaluate", "subfore.fingerprint"],
    ["subfore.study"],
    ["subfore.api"],
    # Top: the command line, and the names kept importable from their former homes.
    ["subfore.cli", "subfore.__main__", "subfore.phantoms", "subfore.nnunet", "subfore.weights"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = i, name.count(".")
    assert best is not None, f"{module} is in no layer of tests/test_layers.py (add it, and to docs/architecture.md)"
    return best


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The subfore modules ``path`` imports (absolute and relative, at any depth of the file)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from . import x" names submodules; "from .m import f" names module m.
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("subfore"):
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def test_no_import_goes_up_a_layer():
    wrong = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
             for m, targets in graph().items() for t in sorted(targets)
             if layer_of(t) > layer_of(m) and not m.startswith(t + ".")]  # a package's own __init__ is no import up
    assert not wrong, "imports that go up a layer:\n" + "\n".join(wrong)


def test_no_import_circle():
    g = graph()
    # A package __init__ re-exports its submodules; a submodule importing a sibling through the package's name
    # would show as a cycle through __init__, which is what we want to catch too.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(g.get(m, ())):
            if m.startswith(t + "."):
                continue  # importing one's parent package runs its __init__ first in any case
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import circle: " + " → ".join(cycle))
            if state.get(t) is None:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_layer_test_sees_a_planted_upward_import(tmp_path):
    # The walker itself: an import inside a function of a low module is found and resolved.
    src = tmp_path / "subfore" / "masking"
    src.mkdir(parents=True)
    (src / "x.py").write_text("def f():\n    from ..pretrain import module\n    from .. import engine\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "subfore"
    try:
        found = imports_of(src / "x.py", {"subfore.masking.x", "subfore.pretrain", "subfore.pretrain.module",
                                          "subfore.engine"})
    finally:
        PACKAGE = saved
    assert found == {"subfore.pretrain.module", "subfore.engine"}
    assert layer_of("subfore.pretrain.module") > layer_of("subfore.masking.x")
