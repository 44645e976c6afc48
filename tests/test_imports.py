"""flatlib's modules import each other without a cycle, and the report's modules import without torch.

The import graph is read from the source (``ast``), not by importing: every ``import flatlib.x``,
``from flatlib.x import y``, ``from flatlib import x`` (a submodule) and relative import counts, at the
top of a module, inside a function, or under ``if TYPE_CHECKING:``. A package is the node of its
``__init__.py``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flatlib"


def module_names() -> dict[str, Path]:
    """Every module of flatlib by dotted name (a package by its own name, for its ``__init__.py``)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a flatlib module (``flatlib.x.y`` where ``y`` is a function
    of ``flatlib.x`` -> ``flatlib.x``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The flatlib modules that module ``name`` imports (anywhere in its body)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up level - 1
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]  # a submodule, or a name
        else:
            continue
        for target in targets:
            if target == "flatlib" or target.startswith("flatlib."):
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    found.add(resolved)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    white, grey, black = 0, 1, 2
    colour = {node: white for node in graph}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt, black) == grey:
                return stack[stack.index(nxt):] + [nxt]
            if colour.get(nxt) == white:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        colour[node] = black
        return None

    for node in sorted(graph):
        if colour[node] == white:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_is_read() -> None:
    """The walker sees absolute, relative, ``from flatlib import x`` and function-level imports."""
    graph = import_graph()
    # top level, from flatlib.x import y
    assert "flatlib.training.train" in graph["flatlib.measurement.measure"]
    # from flatlib import progress (a submodule)
    assert "flatlib.runner.progress" in graph["flatlib.measurement.measure"]
    assert "flatlib.tools.compare" in graph["flatlib.tools.reproduce"]  # inside a function
    assert "flatlib.theory.contexts" in graph["flatlib.theory"]  # a package's __init__


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    if cycle:
        print("import cycle: " + " -> ".join(cycle))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", ["flatlib.tools.report", "flatlib.claims"])
def test_report_modules_do_not_import_torch(module: str) -> None:
    """The report and the rules are read without the training stack (torch takes seconds to import)."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False", f"import {module} imports torch"


# the layout: one analysis module per notebook with one contract, every figure drawn in flatlib.plots
NOTEBOOK_ANALYSIS = {"01_synthetic_languages": "languages", "02_pretraining_to_optimality": "pretraining",
                     "03_model_size": "size", "04_training_algorithms": "algorithms",
                     "05_flatness_and_downstream": "correlations", "06_theory": "theory",
                     "07_your_model": "your_model"}
DRAWING = ("plt.subplots(", "plt.figure(", ".add_subplot(", ".subplots(")


def test_every_notebook_has_one_analysis_module() -> None:
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert notebooks == sorted(NOTEBOOK_ANALYSIS)
    analysis = {p.stem for p in (PACKAGE / "analysis").glob("*.py")} - {"__init__"}
    assert analysis == set(NOTEBOOK_ANALYSIS.values())
    for notebook, module in NOTEBOOK_ANALYSIS.items():
        twin = (ROOT / "notebooks" / f"{notebook}.py").read_text()
        assert (f"flatlib.analysis import {module}" in twin
                or f"flatlib.analysis.{module} import" in twin), notebook


# the notebooks that record claims in the report (01 and 07 check what must hold, and record none)
RECORDS_CLAIMS = {"pretraining", "size", "algorithms", "correlations", "theory"}


@pytest.mark.parametrize("module", sorted(set(NOTEBOOK_ANALYSIS.values())))
def test_analysis_modules_keep_one_contract(module: str) -> None:
    """Each notebook's analysis module defines ``parameters`` (the notebook's parameters, validated),
    ``summary`` (its checked summary) and, where the notebook records claims, ``claims``, all as
    top-level functions."""
    tree = ast.parse((PACKAGE / "analysis" / f"{module}.py").read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    required = {"parameters", "summary"} | ({"claims"} if module in RECORDS_CLAIMS else set())
    assert required <= functions, f"flatlib.analysis.{module} lacks {required - functions}"


def test_the_notebooks_that_record_claims_take_them_from_their_module() -> None:
    for notebook, module in NOTEBOOK_ANALYSIS.items():
        twin = (ROOT / "notebooks" / f"{notebook}.py").read_text()
        assert ("record_claims(" in twin) == (module in RECORDS_CLAIMS), notebook
        if module in RECORDS_CLAIMS:
            assert ".claims(" in twin, (f"{notebook} builds its claims without "
                                        f"flatlib.analysis.{module}.claims")


def test_every_figure_is_drawn_in_plots() -> None:
    """Only ``flatlib/plots`` creates figures (the headless runner ``tools/script`` only shows them)."""
    drawing = [str(path.relative_to(ROOT)) for path in PACKAGE.rglob("*.py")
               if path.parent.name != "plots" and path != PACKAGE / "tools" / "script.py"
               and any(call in path.read_text() for call in DRAWING)]
    assert drawing == []
