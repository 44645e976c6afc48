"""flatlib.tools.script: notebooks executed without Jupyter (the GPU machine's way), with papermill's
parameter injection and a readable executed copy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flatlib.tools.script import NotebookError, execute_notebook, with_parameters

ROOT = Path(__file__).resolve().parents[1]


def notebook(*cells):
    def cell(source, tags=()):
        kind = "markdown" if source.startswith("#md ") else "code"
        return {"cell_type": kind, "metadata": {"tags": list(tags)}, "source": source.removeprefix("#md "),
                **({"outputs": [], "execution_count": None} if kind == "code" else {})}
    return {"cells": [cell(*c) if isinstance(c, tuple) else cell(c) for c in cells], "metadata": {},
            "nbformat": 4, "nbformat_minor": 5}


def test_parameters_are_injected_after_the_tagged_cell():
    nb = notebook("#md title", ('profile = "cpu"\nseed = 0', ["parameters"]), "x = 1")
    out = with_parameters(nb, {"profile": "gpu", "seed": 3})
    assert [c["source"] for c in out["cells"]][2] == "# Parameters\nprofile = 'gpu'\nseed = 3\n"
    assert out["cells"][2]["metadata"]["tags"] == ["injected-parameters"]
    assert len(nb["cells"]) == 3  # the input is not modified
    assert with_parameters(nb, {})["cells"] == nb["cells"]


def test_cells_run_in_order_with_printed_text_values_figures_and_display(tmp_path):
    (tmp_path / "data.txt").write_text("from the notebook's folder")
    nb = notebook(('profile = "cpu"', ["parameters"]),
                  "import matplotlib.pyplot as plt\nprint('hello', profile)\nopen('data.txt').read()",
                  "fig, ax = plt.subplots()\nax.plot([1, 2])\nplt.show()\ndisplay({'a': 1})\nprint('after')",
                  "x = 2\nx * 21")
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    out = execute_notebook(path, tmp_path / "out.ipynb", {"profile": "gpu"})
    code = [c for c in out["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == [1, 2, 3, 4, 5]
    first = code[2]["outputs"]
    assert first[0] == {"output_type": "stream", "name": "stdout", "text": "hello gpu\n"}
    assert first[1]["data"]["text/plain"] == "\"from the notebook's folder\""
    kinds = [o["output_type"] for o in code[3]["outputs"]]
    assert kinds == ["display_data", "display_data", "stream"]
    assert code[3]["outputs"][0]["data"]["image/png"].startswith("iVBOR")  # a PNG, base64
    assert code[3]["outputs"][1]["data"]["text/plain"] == "{'a': 1}"
    assert code[4]["outputs"][0]["data"]["text/plain"] == "42"
    assert json.loads((tmp_path / "out.ipynb").read_text()) == out
    assert Path.cwd() != tmp_path  # the working directory is restored


def test_a_failing_cell_names_itself_and_the_copy_keeps_its_traceback(tmp_path):
    nb = notebook("print('ran')", "raise ValueError('seed: expected an integer')", "print('never')")
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    with pytest.raises(NotebookError, match=r"cell 1> raised ValueError: seed: expected an integer"):
        execute_notebook(path, tmp_path / "out.ipynb")
    out = json.loads((tmp_path / "out.ipynb").read_text())
    assert out["cells"][1]["outputs"][0]["ename"] == "ValueError"
    assert out["cells"][2]["outputs"] == []


def test_the_command_line_reads_literals_and_strings(tmp_path):
    nb = notebook(('profile = "cpu"\nseed = 0', ["parameters"]), "print(repr(profile), seed + 1)")
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "flatlib.tools.script", str(path),
                           str(tmp_path / "out.ipynb"), "-p", "profile", "smoke", "-p", "seed", "4"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "out.ipynb").read_text())
    assert out["cells"][-1]["outputs"][0]["text"] == "'smoke' 5\n"
    path.write_text(json.dumps(notebook("1 / 0")))
    failed = subprocess.run([sys.executable, "-m", "flatlib.tools.script", str(path),
                             str(tmp_path / "out.ipynb")],
                            capture_output=True, text=True, env=env)
    assert failed.returncode == 1 and "ZeroDivisionError" in failed.stderr


def test_reproduce_runs_the_notebooks_as_scripts_in_fresh_processes(tmp_path, monkeypatch):
    """`python -m flatlib.tools.reproduce --runner script` (scripts/gpu_story.sh): each notebook through
    flatlib.tools.script in its own Python process, with the profile injected."""
    from flatlib.tools import reproduce
    from flatlib.tools.script import execute_in_subprocess

    seen = {}
    monkeypatch.setattr(reproduce, "_run",
                        lambda profile, out_dir, only, execute: seen.update(execute=execute) or 0)
    assert reproduce.main(["--profile", "smoke", "--runner", "script"]) == 0
    assert seen["execute"] is execute_in_subprocess
    nb = notebook(('profile = "cpu"', ["parameters"]), "import os\nprint(profile, os.getpid())")
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    execute_in_subprocess(str(path), str(tmp_path / "out.ipynb"), parameters={"profile": "smoke"},
                          cwd=str(tmp_path), kernel_name="python3", progress_bar=False)
    printed = json.loads((tmp_path / "out.ipynb").read_text())["cells"][-1]["outputs"][0]["text"]
    assert printed.split()[0] == "smoke" and int(printed.split()[1]) != os.getpid()
    path.write_text(json.dumps(notebook("raise KeyError('x')")))
    with pytest.raises(NotebookError, match="KeyError"):
        execute_in_subprocess(str(path), str(tmp_path / "out.ipynb"), cwd=str(tmp_path))


PARAMETERS = 'profile = "cpu"  # smoke | cpu\nseed: int = 0\nn_chains = None\nlow, high = 0.1, 0.9'


def test_an_unknown_parameter_is_refused_naming_it_the_close_match_and_the_known_ones(tmp_path):
    """`-p n_chain 3` for `n_chains` used to run the notebook on its defaults and exit 0."""
    from flatlib.tools.script import UnknownParameterError

    nb = notebook(("x = 1", ["other"]), (PARAMETERS, ["parameters"]), "open('ran.txt', 'w').write('ran')")
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    with pytest.raises(UnknownParameterError) as error:
        execute_notebook(path, tmp_path / "out.ipynb", {"n_chain": 3, "seed": 1})
    message = str(error.value)
    assert "'n_chain'" in message and "did you mean 'n_chains'" in message and str(path) in message
    assert "profile, seed, n_chains, low, high" in message  # the known ones, in the cell's order
    assert not (tmp_path / "ran.txt").exists() and not (tmp_path / "out.ipynb").exists()  # nothing ran
    execute_notebook(path, tmp_path / "out.ipynb", {"n_chains": 3, "seed": 1, "high": 0.5})  # known: runs
    assert (tmp_path / "ran.txt").read_text() == "ran"


def test_a_notebook_without_a_parameters_cell_takes_no_parameter(tmp_path):
    from flatlib.tools.script import UnknownParameterError, notebook_parameters

    nb = notebook("profile = 'cpu'")  # assigned, but not in a cell tagged 'parameters'
    assert notebook_parameters(nb) is None
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    with pytest.raises(UnknownParameterError, match=r"'profile'.*no cell tagged 'parameters'"):
        execute_notebook(path, tmp_path / "out.ipynb", {"profile": "smoke"})
    execute_notebook(path, tmp_path / "out.ipynb")  # without parameters it runs


def test_the_command_line_refuses_a_misspelt_parameter(tmp_path):
    nb = notebook((PARAMETERS, ["parameters"]), "print(n_chains)")
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "flatlib.tools.script", str(path),
                           str(tmp_path / "out.ipynb"),
                           "-p", "n_chain", "3"], check=False, capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert "n_chain" in done.stderr and "n_chains" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out.ipynb").exists()


def test_every_notebook_defines_the_profile_that_reproduce_and_make_test_inject():
    from flatlib.tools.script import check_parameters

    paths = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert paths
    for path in paths:
        check_parameters(json.loads(path.read_text()), {"profile": "smoke", "seed": 0}, path)
