"""Run a notebook without Jupyter: \
``python -m flatlib.tools.script notebooks/02_....ipynb out.ipynb -p profile gpu``.

A machine without papermill, ipykernel or nbclient (a rented GPU box, a Slurm node) can still run the
notebooks: this module executes the code cells of the ``.ipynb`` (plain JSON) in one fresh Python
namespace, in order, with the parameters injected after the cell tagged ``parameters`` (papermill's
convention), and writes an executed copy with the outputs a reader expects: what a cell printed, the
value of its last expression, and every figure shown with ``plt.show()`` as a PNG. ``display(x)``
prints like a last expression. A parameter the notebook does not define (a name not assigned in its
``parameters`` cell, e.g. ``-p n_chain 3`` for ``n_chains``) is refused before anything runs
(``UnknownParameterError``, exit status 2): papermill would only warn and run on the defaults. A
failing cell stops the run; the copy is written up to and including that cell (its traceback as an
error output) and the exit status is 1.

It needs only the standard library, matplotlib and what the notebooks import. The results that matter
are the ones the notebooks write themselves (figures/, the run store, claims); the executed copy is
for reading. IPython's magics (``%...``) are not supported: the notebooks have none.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import difflib
import io
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class NotebookError(RuntimeError):
    """A cell of the notebook raised; the message names the cell and ends with the exception."""


class UnknownParameterError(ValueError):
    """A parameter given for a notebook that its ``parameters`` cell does not define; the message
    names the parameter, the notebook and the parameters it does define."""


def _source(cell: dict[str, Any]) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def parameters_cell(parameters: dict[str, Any]) -> dict[str, Any]:
    """The cell papermill would inject: one ``name = repr(value)`` line per parameter."""
    lines = ["# Parameters"] + [f"{name} = {value!r}" for name, value in parameters.items()]
    return {"cell_type": "code", "execution_count": None, "id": "injected-parameters",
            "metadata": {"tags": ["injected-parameters"]}, "outputs": [], "source": "\n".join(lines) + "\n"}


def _tagged(notebook: dict[str, Any], tag: str) -> list[int]:
    return [i for i, c in enumerate(notebook["cells"]) if tag in c.get("metadata", {}).get("tags", [])]


def notebook_parameters(notebook: dict[str, Any]) -> list[str] | None:
    """The names assigned at the top level of the first cell tagged ``parameters`` (``x = 1``,
    ``x: int = 1``, ``a, b = 1, 2``), in order; None if no cell is tagged. Read with ``ast``,
    not run."""
    tagged = _tagged(notebook, "parameters")
    if not tagged:
        return None
    names: list[str] = []
    for node in ast.parse(_source(notebook["cells"][tagged[0]])).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        names += [name for target in targets for name in _assigned(target) if name not in names]
    return names


def _assigned(target: ast.expr) -> list[str]:
    """The names an assignment target binds (``d["k"] = 1`` binds none: it changes ``d``)."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [name for element in target.elts for name in _assigned(element)]
    return _assigned(target.value) if isinstance(target, ast.Starred) else []


def check_parameters(notebook: dict[str, Any], parameters: dict[str, Any], source: str | Path) -> None:
    """Refuse (``UnknownParameterError``) every parameter that ``notebook`` (read from ``source``)
    does not define in its ``parameters`` cell, naming it, its closest known name and all known ones."""
    known = notebook_parameters(notebook)
    unknown = [name for name in parameters if known is None or name not in known]
    if not unknown:
        return
    if known is None:
        raise UnknownParameterError(f"{source}: parameter(s) {', '.join(map(repr, unknown))} given, but "
                                    "the notebook has no cell tagged 'parameters', so it takes none; tag "
                                    "the cell that assigns its parameters, or run it without -p")
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(repr(name) + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise UnknownParameterError(f"{source}: unknown parameter(s) {', '.join(hints)}; the notebook's "
                                f"'parameters' cell defines: {', '.join(known) or '(nothing)'}")


def with_parameters(notebook: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``notebook`` with ``parameters_cell`` after its cell tagged ``parameters`` (or
    first, if none is tagged), as papermill does."""
    cells = list(notebook["cells"])
    tagged = _tagged(notebook, "parameters")
    if parameters:
        cells.insert(tagged[0] + 1 if tagged else 0, parameters_cell(parameters))
    return {**notebook, "cells": cells}


def _figure_outputs() -> list[dict[str, Any]]:
    """Every open matplotlib figure as a PNG display output, then closed (what ``plt.show()``
    leaves in a Jupyter notebook)."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 - only when a figure is shown

    outputs = []
    for number in plt.get_fignums():
        buffer = io.BytesIO()
        plt.figure(number).savefig(buffer, format="png")
        outputs.append({"output_type": "display_data", "metadata": {},
                        "data": {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"),
                                 "text/plain": "<Figure>"}})
    plt.close("all")
    return outputs


def _text(value: Any) -> str:
    with contextlib.suppress(Exception):  # a DataFrame's text form, as Jupyter shows it
        if hasattr(value, "to_string"):
            return value.to_string()
    return repr(value)


def run_cell(source: str, namespace: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Execute ``source`` in ``namespace`` like a notebook cell; return its outputs (printed text,
    figures shown, the last expression's value). Raises what the cell raises."""
    outputs: list[dict[str, Any]] = []
    stdout = io.StringIO()

    def flush() -> None:
        if stdout.tell():
            outputs.append({"output_type": "stream", "name": "stdout", "text": stdout.getvalue()})
            stdout.seek(0)
            stdout.truncate()

    def show(*args: Any, **kwargs: Any) -> None:
        flush()
        outputs.extend(_figure_outputs())

    def display(*values: Any) -> None:
        flush()
        outputs.extend({"output_type": "display_data", "metadata": {}, "data": {"text/plain": _text(v)}}
                       for v in values)

    tree = ast.parse(source, filename=name)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    namespace["display"] = display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    original_show, plt.show = plt.show, show
    try:
        with contextlib.redirect_stdout(stdout):
            exec(compile(tree, name, "exec"), namespace)  # noqa: S102 - running the notebook is the point
            value = eval(compile(ast.Expression(last.value), name, "eval"), namespace) if last else None  # noqa: S307
    finally:
        plt.show = original_show
        flush()
    if value is not None:
        outputs.append({"output_type": "execute_result", "execution_count": None, "metadata": {},
                        "data": {"text/plain": _text(value)}})
    return outputs


def execute_notebook(input_path: str | Path, output_path: str | Path,
                     parameters: dict[str, Any] | None = None, cwd: str | Path | None = None,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Execute ``input_path`` with ``parameters`` (in ``cwd``, default the notebook's folder) and
    write the executed copy to ``output_path``; ``log`` gets one line per cell. Raises
    ``UnknownParameterError`` before anything runs if a parameter is not one of the notebook's
    (``check_parameters``), ``NotebookError`` naming the failing cell (the copy is written first)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    plt.close("all")  # a figure left open by the caller is not this notebook's
    source = json.loads(Path(input_path).read_text())
    check_parameters(source, parameters or {}, input_path)
    notebook = with_parameters(source, parameters or {})
    namespace: dict[str, Any] = {"__name__": "__main__"}
    previous = Path.cwd()
    os.chdir(cwd or Path(input_path).resolve().parent)
    count = 0
    try:
        for index, cell in enumerate(notebook["cells"]):
            if cell["cell_type"] != "code":
                continue
            count += 1
            cell["execution_count"] = count
            name = f"<{Path(input_path).name} cell {index}>"
            if log:
                log(f"{name} ...")
            try:
                cell["outputs"] = run_cell(_source(cell), namespace, name)
            except Exception as error:
                cell["outputs"] = [{"output_type": "error", "ename": type(error).__name__,
                                    "evalue": str(error), "traceback": traceback.format_exc().splitlines()}]
                Path(output_path).write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
                raise NotebookError(f"{name} raised {type(error).__name__}: {error}") from error
    finally:
        os.chdir(previous)
    Path(output_path).write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    return notebook


def execute_in_subprocess(input_path: str, output_path: str, parameters: dict[str, Any] | None = None,
                          cwd: str | None = None, **_: Any) -> None:
    """``execute_notebook`` in a fresh Python process (as a Jupyter kernel would be: no state
    shared between notebooks), with papermill's signature (``flatlib.tools.reproduce --runner script``).
    The process's per-cell log goes to this process's stderr; a failure raises ``NotebookError``
    with its last lines."""
    command = [sys.executable, "-m", "flatlib.tools.script", str(input_path), str(output_path)]
    for name, value in (parameters or {}).items():
        command += ["-p", name, repr(value)]
    done = subprocess.run(command, cwd=cwd, stderr=subprocess.PIPE, text=True, check=False)
    sys.stderr.write(done.stderr)
    sys.stderr.flush()
    if done.returncode:
        raise NotebookError(" ".join(done.stderr.strip().splitlines()[-3:])
                            or f"exit status {done.returncode}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a parameter; VALUE is read as a Python literal if it is one, else as a string")
    args = parser.parse_args(argv)
    parameters = {}
    for name, value in args.parameter:
        try:
            parameters[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parameters[name] = value
    try:
        execute_notebook(args.input, args.output, parameters,
                         log=lambda line: print(line, file=sys.stderr, flush=True))
    except UnknownParameterError as error:  # nothing ran: a usage error, as argparse's own
        print(f"flatlib.tools.script: {error}", file=sys.stderr)
        return 2
    except NotebookError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
