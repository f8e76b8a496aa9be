# Two set-up commands for a fresh machine: `make demo` and `make test`. Both create .venv and install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench gpu-install clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-deps -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m trl_ext.demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/reward_throughput.py

# GPU machines only (see requirements-gpu.txt for the order and why).
gpu-install:
	$(PYTHON) -m pip install -r requirements-gpu.txt
	MAX_JOBS=8 $(PYTHON) -m pip install flash-attn==2.8.3 --no-build-isolation
	$(PYTHON) -m pip install openrlhf==0.11.2
	$(PYTHON) -m pip install --no-deps -e .

clean:
	rm -rf $(VENV) runs/demo
