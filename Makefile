# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv if missing, install myvlm, run `myvlm demo` (the main job)
#   make test   - create .venv if missing, install myvlm + test extras, run the test suite offline
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.myvlm-installed

.PHONY: demo test bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/myvlm demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench_blip2.py

clean:
	rm -rf $(VENV) .pytest_cache
