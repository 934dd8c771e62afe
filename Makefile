# The README's commands. `make test` builds its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test venv demo bench clean proto

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[export,dev,explore]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m edge_runtime.cli demo

bench: $(STAMP)
	$(PY) benchmarks/throughput.py --rounds 4

# regenerate edge_runtime/_proto from proto/ (tests/bridge/test_proto.py fails when it is stale)
proto: $(STAMP)
	$(PY) -m cloud_bridge.protogen

clean:
	rm -rf $(VENV) build *.egg-info
