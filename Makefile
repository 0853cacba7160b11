# Two entry points, each does its own set-up on a fresh machine (Python 3.11, pip, apt, npm):
#   make demo   # venv + install + offline assets, then the offline demo on real data
#   make test   # venv + install + offline assets, then the test suite
VENV := .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install assets test test-tf220 demo docs-demo bench-peer clean

# PYTHONWARNINGS=ignore: setuptools warns on every editable install of a flat layout (a tfl/ folder next to the
# project); that layout is on purpose, and the warning would be the only line a quiet install prints.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore $(PY) -m pip install --quiet -e ".[test,convert]"
	touch $@

install: $(VENV)/.installed

assets: install
	$(PY) -m tfl.assets fetch all

# Two workers, one per core (pytest-xdist); every test sets up what it needs, so any worker can run it.
test: assets
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

# The same suite on TensorFlow 2.20, the newest release with a TPU build (tensorflow-tpu; see README).
VENV_TF220 := .venv-tf220
$(VENV_TF220)/.installed: pyproject.toml
	python3 -m venv $(VENV_TF220)
	$(VENV_TF220)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_TF220)/bin/python -m pip install --quiet -e ".[test,convert]" "tensorflow==2.20.*" "tensorflow-text==2.20.*" \
		"tensorboard==2.20.*"
	touch $@

test-tf220: $(VENV_TF220)/.installed assets
	$(VENV_TF220)/bin/python -m pytest -q -n 2 --dist loadgroup tests

demo: assets
	$(PY) -m tfl.demo

# The demo again, copying its reports into the committed docs/demo/ (demo alone writes only runs/).
docs-demo: assets
	$(PY) -m tfl.demo --refresh-docs

# The torch peer's own environment for benchmarks/run.py (pinned torch CPU + transformers; never a tfl dependency).
VENV_PEER := .venv-peer
$(VENV_PEER)/.installed: benchmarks/peer_requirements.txt
	python3 -m venv $(VENV_PEER)
	$(VENV_PEER)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_PEER)/bin/python -m pip install --quiet -r benchmarks/peer_requirements.txt
	touch $@

bench-peer: $(VENV_PEER)/.installed

clean:
	rm -rf $(VENV) $(VENV_TF220) $(VENV_PEER) runs
