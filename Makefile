# Two commands on a fresh machine:  make app   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8501
ADDRESS ?= localhost
# Where pip finds torch. Empty: PyPI (its Linux wheels carry the CUDA libraries, about 4.5 GB installed).
# A CPU-only machine can save ~4 GB with PyTorch's CPU index:
#   make app TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_PIP := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple,)

.PHONY: app test test-fast venv venv-test web-runtime bench end-to-end recipes scale gpu-check sample-data fashion-mnist clean

# the app's own dependencies, its ONNX export included (no test tools)
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned to the build served from local disk on our machines
	$(PY) -m pip install -q $(TORCH_PIP) torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[export]'
	# byte-compile TL Studio's own modules once, as pip does for a package it copies (an editable install is not
	# compiled, and where PYTHONDONTWRITEBYTECODE is set every command compiles them again: ~0.13 s a start)
	$(PY) -m compileall -q tl_core
	touch $@

# the test tools on top (pytest, Playwright for the browser test, scikit-learn's reference, ONNX Runtime)
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# the in-browser runtime (npm's onnxruntime-web, pinned; 15 MB) for the web-page export and Try it → Live:
# fetched once, then used offline; without npm, one sentence says how to get it and the rest still works
venv: $(VENV)/.installed
	@$(MAKE) --no-print-directory web-runtime || echo "(the web-page export and Try it → Live need it; the rest of TL Studio works without)"

web-runtime: $(VENV)/.installed
	$(PY) scripts/fetch_web_runtime.py

venv-test: $(VENV)/.installed-test

app: venv
	$(VENV)/bin/streamlit run app.py --server.port $(PORT) --server.address $(ADDRESS)

# the whole suite (docs/testing.md) in one pytest run, in TEST_PROCS=2 pytest-xdist processes (the default;
# TEST_PROCS=0: one), a test file each at a time, the longest files first (tests/conftest.py LONGEST_FIRST), each
# process with every core as threads (tests/conftest.py pytest_configure); finding no test (pytest's exit status 5)
# fails it too. The session's fixture runs and feature cache are built once in one fresh folder
# (TL_TEST_SESSION_DIR, removed at the end). One run, not the fast tier and then the rest: a second run started
# and collected again, and each run's last file left a core idle (benchmarks/RESULTS.md, 2026-12-07 evening).
# CI runs `make test-fast` first, so that a broken build fails in minutes.
TEST_PROCS ?= 2
XDIST = $(if $(filter-out 0,$(TEST_PROCS)),-n $(TEST_PROCS) --dist loadfile --no-loadscope-reorder,)
test: venv-test web-runtime
	session=$$(mktemp -d "$${TMPDIR:-/tmp}/tl-test-session.XXXXXX") && trap 'rm -rf "$$session"' EXIT && \
	TL_TEST_SESSION_DIR="$$session" $(PY) -m pytest -q $(XDIST)

# the fast tier alone: no process, server, browser or fine-tuning (tests/conftest.py fails a test that starts one)
test-fast: venv-test web-runtime
	$(PY) -m pytest -q -m fast_tier $(XDIST)

bench: venv-test
	$(PY) benchmarks/run.py

# tl-core train + evaluate (two processes, 300 + 1,000 digits) against the classic recipe, and a warm re-train
end-to-end: venv-test
	$(PY) benchmarks/end_to_end.py

recipes: venv-test fashion-mnist
	$(PY) benchmarks/recipes.py

# Fashion-MNIST (the recipes and the sample data) comes from Debian's dataset-fashion-mnist (30 MB):
# installed with apt when this runs as root, otherwise one sentence says how
FASHION_DIR := /usr/share/datasets/fashion-mnist
fashion-mnist:
	@test -f $(FASHION_DIR)/t10k-labels-idx1-ubyte.gz || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && apt-get install -y -q --no-install-recommends dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing: install it with 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), then run this again."; exit 1; \
	  fi; }

# 2 processes x 1 thread (DDP) against 1 process x 2 threads on this CPU
scale: venv-test
	$(PY) benchmarks/scale.py

# on a machine with NVIDIA GPUs: throughput fp32/AMP, DDP over every GPU, peak memory, tl-core end to end
gpu-check: venv-test
	$(PY) benchmarks/gpu_check.py

sample-data: venv fashion-mnist
	$(PY) scripts/build_sample_data.py

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
