# The two commands of the README: `make figures` (the main job) and `make test`.
# Each creates .venv, installs the pinned requirements and flatlib, registers the `python3` kernel,
# then does its job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PROFILE ?= cpu

.PHONY: figures test lab bench venv clean pairs

$(INSTALLED): requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-test.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (flatlib)"
	touch $(INSTALLED)

venv: $(INSTALLED)

# every notebook through papermill at $(PROFILE) (default cpu); figures land in figures/
figures: $(INSTALLED)
	$(BIN)/python -m flatlib.tools.reproduce --profile $(PROFILE)

# the unit tests and every notebook at profile smoke, each notebook executed once, by nbval (papermill only
# injects the parameter); two pytest workers, a notebook's cells all in one (--dist loadfile)
test: $(INSTALLED)
	rm -rf build/smoke && mkdir -p build/smoke
	for nb in notebooks/[0-9][0-9]_*.ipynb; do \
	  $(BIN)/papermill --prepare-only --log-level WARNING -k python3 -p profile smoke $$nb build/smoke/$$(basename $$nb) \
	    || exit 1; \
	done
	$(BIN)/python -m pytest -n 2 --dist loadfile --nbval-lax tests build/smoke

# refresh the reviewable py:percent twin of every notebook (jupytext), or the notebook from an edited twin
pairs: $(INSTALLED)
	$(BIN)/jupytext --sync notebooks/[0-9][0-9]_*.ipynb

lab: $(INSTALLED)
	$(BIN)/jupyter lab notebooks

bench: $(INSTALLED)
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-bench.txt
	$(BIN)/python -m bench.languages
	$(BIN)/python -m bench.train
	$(BIN)/python -m bench.flatness
	$(BIN)/python -m bench.costs --profile cpu

clean:
	rm -rf build figures/smoke
