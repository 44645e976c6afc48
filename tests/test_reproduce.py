"""flatlib.tools.reproduce: parameters the notebooks do not define are errors; damaged claims files are named,
the report is still written from what can be read, and the exit status says something went wrong."""

import functools
import json
import logging
from pathlib import Path

import pytest

from flatlib.tools import reproduce
from flatlib.tools.report import Claim, record_claims
from flatlib.tools.script import UnknownParameterError


@pytest.fixture
def figures(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATLIB_FIGURES", str(tmp_path / "figures"))
    return tmp_path / "figures"


def write_notebook(folder: Path, name: str, parameters: str) -> Path:
    cells = [{"cell_type": "code", "id": "p", "metadata": {"tags": ["parameters"]}, "source": parameters,
              "outputs": [], "execution_count": None},
             {"cell_type": "code", "id": "r", "metadata": {}, "source": "print(1)", "outputs": [],
              "execution_count": None}]
    path = folder / name
    path.write_text(json.dumps({"cells": cells, "nbformat": 4, "nbformat_minor": 5, "metadata": {
        "kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}}}))
    return path


def test_a_notebook_without_the_profile_parameter_fails_instead_of_running_on_its_defaults(
        figures, tmp_path, monkeypatch):
    """papermill only warns "Passed unknown parameter: profile" and runs the notebook at its default
    profile (the cpu figures, hours, from `make test`'s smoke run)."""
    import papermill

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks, "01_defines_it.ipynb", 'profile = "cpu"\nseed = 0\n')
    write_notebook(notebooks, "02_lacks_it.ipynb", "seed = 0\n")
    monkeypatch.setattr(reproduce, "NOTEBOOKS", notebooks)
    # papermill itself, parameterising and writing the copy, without starting a kernel
    execute = functools.partial(papermill.execute_notebook, prepare_only=True)
    results = reproduce.run_notebooks("smoke", tmp_path / "out", only=["0"], execute=execute)
    assert [(r.notebook, r.ok) for r in results] == [("01_defines_it.ipynb", True),
                                                     ("02_lacks_it.ipynb", False)]
    assert "'profile'" in results[1].error and "02_lacks_it.ipynb" in results[1].error
    assert "seed" in results[1].error  # what it does define
    assert not (tmp_path / "out" / "02_lacks_it.ipynb").exists()
    # without flatlib's own check, papermill's warning stops it
    monkeypatch.setattr(reproduce, "check_parameters", lambda notebook, parameters, source: None)
    (again,) = reproduce.run_notebooks("smoke", tmp_path / "out", only=["02_"], execute=execute)
    assert not again.ok and "papermill: Passed unknown parameter: profile" in again.error


def test_papermills_unknown_parameter_warning_is_an_error_while_reproduce_runs():
    """Where papermill's reading of a parameters cell and flatlib.tools.script's differ, papermill's warning
    still stops the notebook."""
    logger = logging.getLogger("papermill")
    with pytest.raises(UnknownParameterError, match="papermill: Passed unknown parameter: n_chain"), \
            reproduce.unknown_parameters_are_errors("notebooks/06_theory.ipynb"):
        logger.warning("Passed unknown parameter: n_chain")
    logger.warning("Passed unknown parameter: n_chain")  # outside a run: papermill's own warning again
    with reproduce.unknown_parameters_are_errors("x.ipynb"):
        logger.warning("Input notebook does not contain a cell with tag 'parameters'")  # other warnings pass


def claim(notebook: str, held: str = "yes") -> Claim:
    return Claim(claim="trace falls", paper="19.8 -> 12.6", ours="30 ± 2 -> 25 ± 2", held=held,
                 notebook=notebook)


def test_damaged_claims_and_runs_files_are_named_and_the_report_is_still_written(figures, tmp_path, capsys):
    """A truncated claims file and a truncated _runs.json used to crash reproduce after the notebooks
    had run, with a bare JSONDecodeError: no REPORT.md, no comparison, no file named."""
    record_claims("smoke", "03_model_size", [claim("03_model_size")])
    good = (figures / "smoke" / "claims" / "03_model_size.json").read_text()
    damaged = figures / "smoke" / "claims" / "02_pretraining_to_optimality.json"
    damaged.write_text(good.replace("03_model_size", "02_pretraining_to_optimality")[:40])
    no_held = figures / "smoke" / "claims" / "04_training_algorithms.json"
    data = json.loads(good.replace("03_model_size", "04_training_algorithms"))
    del data["claims"][0]["held"]
    no_held.write_text(json.dumps(data))
    runs = figures / "smoke" / "claims" / "_runs.json"
    runs.write_text('{"01_synthetic_languages": {"ok": true, "seco')

    def execute(input_path, output_path, **kwargs):
        Path(output_path).write_text("{}")

    code = reproduce.main(["--profile", "smoke", "--out", str(tmp_path / "out"), "--only", "01_"],
                          execute=execute)
    out = capsys.readouterr().out
    assert code == 1
    report = (figures / "smoke" / "REPORT.md").read_text()
    assert "### 03_model_size" in report  # what could be read is reported
    for path in (damaged, no_held):
        assert str(path) in out and f"claims/{path.name}" in report
    assert f"DAMAGED: {runs}" in out
    assert "'held'" in out  # what is wrong with the claim without a verdict
    # this run's result is recorded in a fresh _runs.json; the damaged one is kept beside it
    assert set(json.loads(runs.read_text())) == {"01_synthetic_languages"}
    assert (runs.parent / "_runs.json.damaged").read_text().endswith('"seco')
    assert "comparison" in out  # the comparison still ran (here: skipped, no git checkout)
