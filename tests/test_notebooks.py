"""The notebooks as committed: stripped, parameterised, and failing early on bad parameters.
(Their execution at profile smoke is checked by nbval: `make test` runs `pytest --nbval-lax`
over the executed copies in build/smoke.)"""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def code_cells(path):
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["metadata"]["language_info"]["name"] == "python"
    cells = code_cells(path)
    assert all(not c["outputs"] and c["execution_count"] is None for c in cells), "commit it stripped"
    first = cells[0]
    assert "parameters" in first["metadata"].get("tags", []), "first code cell must be tagged parameters"
    source = "".join(first["source"])
    assert "profile =" in source and "seed =" in source
    assert any("nbval fails the notebook" in "".join(c["source"]) for c in cells), "no checked summary cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
@pytest.mark.parametrize("bad, match", [({"profile": "nope"}, "profile"), ({"seed": -3}, "seed")])
def test_bad_parameters_fail_at_the_validation_cell(path, bad, match, tmp_path):
    papermill = pytest.importorskip("papermill")
    with pytest.raises(papermill.PapermillExecutionError) as info:
        papermill.execute_notebook(str(path), str(tmp_path / path.name), parameters=bad,
                                   kernel_name="python3", progress_bar=False, cwd=str(path.parent))
    assert "ValueError" in info.value.ename and match in info.value.evalue
    # it stopped at the cell right after the injected parameters, before any work
    executed = json.loads((tmp_path / path.name).read_text())
    cells = [c for c in executed["cells"] if c["cell_type"] == "code"]
    failed = [i for i, c in enumerate(cells) if any(o.get("output_type") == "error" for o in c["outputs"])]
    assert failed == [2], f"failed at code cell {failed}, expected the validation cell (index 2)"


@pytest.mark.parametrize("name", ["02_pretraining_to_optimality", "03_model_size"])
def test_the_third_language_is_one_parameter_away(name, tmp_path, monkeypatch):
    """Issue 8: the experiments run on the teacher LM by changing `languages` alone."""
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("FLATLIB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("FLATLIB_RUNS", str(tmp_path / "runs"))
    path = NOTEBOOKS[0].parent / f"{name}.ipynb"
    papermill.execute_notebook(str(path), str(tmp_path / path.name),
                               parameters={"profile": "smoke", "languages": ["teacher"]},
                               kernel_name="python3", progress_bar=False, cwd=str(path.parent))
    executed = json.loads((tmp_path / path.name).read_text())
    summary = "".join("".join(o.get("text", "")) for o in code_cells_of(executed)[-1]["outputs"])
    assert "teacher" in summary and "checks passed" in summary


def code_cells_of(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def code_lines(path):
    """Non-blank, non-comment lines of a notebook's code cells."""
    return sum(1 for c in code_cells(path) for line in "".join(c["source"]).splitlines()
               if line.strip() and not line.strip().startswith("#"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_glue(path):
    """Issue 15: a notebook wires library calls, tables and figures (about 150 code lines at most);
    computations and decision rules live in flatlib, tested there."""
    assert code_lines(path) <= 150, f"{path.name}: {code_lines(path)} code lines"
    source = "\n".join("".join(c["source"]) for c in code_cells(path))
    assert "\ndef " not in "\n" + source, "a notebook defines no functions: they belong in flatlib"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_py_percent_pair_is_in_sync(path):
    """Every notebook has a reviewable jupytext `py:percent` twin with the same cells (refresh with
    `make pairs`); papermill and nbval run the .ipynb."""
    jupytext = pytest.importorskip("jupytext")
    twin = path.with_suffix(".py")
    assert twin.exists(), f"{twin.name} is missing: run `make pairs`"
    paired = jupytext.read(twin, fmt="py:percent")
    notebook = json.loads(path.read_text())

    def cells(nb):
        return [(c["cell_type"], "".join(c["source"]).strip(), "parameters" in c["metadata"].get("tags", []))
                for c in nb["cells"]]

    assert cells(paired) == cells(notebook), f"{twin.name} and {path.name} differ: run `make pairs`"
