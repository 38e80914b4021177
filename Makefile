# prune2tvm: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
CLI     = $(VENV)/bin/prune2tvm
STAMP   = $(VENV)/.prune2tvm-installed
TARGET ?= x86
MODEL  ?=
TRIALS ?=
PYTEST_ARGS ?=

.PHONY: install cross demo test tune bench clean distclean

install: $(STAMP)

# torch first, with pip: that takes the CPU build (a resolver could pull a multi-GB CUDA one).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The aarch64 cross compiler (Debian's gcc-aarch64-linux-gnu), for --target aarch64 and its test.
cross:
	@command -v aarch64-linux-gnu-gcc >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get install -y -qq gcc-aarch64-linux-gnu >/dev/null || \
			{ apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu >/dev/null; }; \
		else echo "install Debian's gcc-aarch64-linux-gnu (as root: apt-get install gcc-aarch64-linux-gnu)"; exit 2; fi; }
	@aarch64-linux-gnu-gcc --version | head -1

demo: install
	$(CLI) run pipelines/digits.yaml --force

test: install
	PRUNE2TVM_NO_PROGRESS=1 $(PY) -m pytest $(PYTEST_ARGS)

# make tune TARGET=x86 MODEL=model.onnx [TRIALS=64] [TRIALS_PER_TASK=N] [TIME_LIMIT=seconds] [BSR=4 [SPARSITY=0.5|auto]]
#           [RPC_TRACKER=host:port RPC_KEY=key]: tuned build in runs/tune/<target>/
tune: install
	@test -n "$(MODEL)" || { echo "make tune needs MODEL=path/to/model.onnx (and TARGET=x86|x86-avx512|aarch64|cuda)"; exit 2; }
	$(CLI) tune $(MODEL) --target $(TARGET) $(if $(TRIALS),--trials $(TRIALS)) \
		$(if $(TRIALS_PER_TASK),--trials-per-task $(TRIALS_PER_TASK)) $(if $(TIME_LIMIT),--time-limit $(TIME_LIMIT)) \
		$(if $(BSR),--bsr $(BSR)) $(if $(SPARSITY),--sparsity $(SPARSITY)) $(if $(RPC_TRACKER),--rpc-tracker $(RPC_TRACKER) --rpc-key $(RPC_KEY)) \
		-o runs/tune/$(TARGET) --force

bench: install
	PRUNE2TVM_NO_PROGRESS=1 $(PY) benchmarks/digits_latency.py
	PRUNE2TVM_NO_PROGRESS=1 $(PY) benchmarks/bsr_layers.py

clean:
	rm -rf runs build *.egg-info prune2tvm.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
