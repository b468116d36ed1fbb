# Two commands on a fresh machine:  make app   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8501
ADDRESS ?= localhost

.PHONY: app test test-fast venv bench recipes sample-data clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned to the build served from local disk on our machines
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

app: venv
	$(VENV)/bin/streamlit run app.py --server.port $(PORT) --server.address $(ADDRESS)

test: venv
	$(PY) -m pytest -q

# the quick tier: everything but the slow (> ~10 s) and browser tests
test-fast: venv
	$(PY) -m pytest -q -m "not slow and not browser"

bench: venv
	$(PY) benchmarks/run.py

recipes: venv
	$(PY) benchmarks/recipes.py

sample-data: venv
	$(PY) scripts/build_sample_data.py

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
