# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv if missing, install myvlm, run `myvlm demo` (the main job)
#   make test   - create .venv if missing, install myvlm + test extras, run the test suite offline
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.myvlm-installed

.PHONY: demo test bench install clean chromium

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/myvlm demo

# The HTML report's screenshot test needs Debian's chromium; without it (no root, no apt) that test skips.
chromium:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) || \
		echo "chromium not installed: the report screenshot test will be skipped"

test: $(STAMP) chromium
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench_blip2.py

clean:
	rm -rf $(VENV) .pytest_cache
