# Two set-up commands for a fresh machine: `make demo` and `make test`. Both create .venv and install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench mutation gpu-install gpu-check-wheels clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-deps -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m trl_ext.demo

# -v undoes pyproject's -q: one line per test file with the share done, and the slowest tests at the end.
test: $(STAMP)
	$(PY) -m pytest -v --durations=10

# Mutation score of the core modules with mutmut (bench/mutation.py); minutes to hours, never part of `make test`.
# Each entry is MODULE[:FUNC,...][=TEST,...]; e.g. make mutation MUTATION_MODULES=evaluation/bon.py
MUTATION_MODULES ?= reward_plugins/config_loader.py evaluation/bon.py reward_plugins/ensemble.py trl_ext/ppo.py \
	reward_plugins/vrcli/scoring.py reward_plugins/vrcli/plan.py openrlhf_ext/reward_client.py openrlhf_ext/server_protocol.py reward_plugins/placement.py \
	reward_plugins/monitor.py
mutation: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) bench/mutation.py $(MUTATION_MODULES)

bench: $(STAMP)
	$(PY) bench/reward_throughput.py

# What bench/gpu_check.py needs beyond a GPU image's torch, transformers, accelerate, peft (and the usual numpy,
# PyYAML, rich, tensorboard, pandas, pyarrow): 8 wheels, 4.5 MiB, at the versions requirements.txt pins, into .whl/
# (ignored). On the GPU machine: pip install --no-index --no-deps --target /tmp/site .whl/*.whl, then
# PYTHONPATH=/tmp/site python3 bench/gpu_check.py (README, "Benchmarks").
GPU_CHECK_WHEELS := pydantic pydantic_core annotated-types typing-inspection trl datasets dill multiprocess
GPU_PYTHON_VERSION ?= 3.12
gpu-check-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$(for name in $(GPU_CHECK_WHEELS); do grep -i "^$$name==" requirements.txt || echo "MISSING-PIN-$$name"; done)

# GPU machines only (see requirements-gpu.txt for the order and why).
gpu-install:
	$(PYTHON) -m pip install -r requirements-gpu.txt
	MAX_JOBS=8 $(PYTHON) -m pip install flash-attn==2.8.3 --no-build-isolation
	$(PYTHON) -m pip install openrlhf==0.11.2
	$(PYTHON) -m pip install --no-deps -e .

clean:
	rm -rf $(VENV) runs/demo
