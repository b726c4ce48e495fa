# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench bench-cluster soak broker-start broker-stop cluster-start \
	cluster-stop clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/zerosum demo

test: $(STAMP)
	$(VENV)/bin/ruff check agents protocol zerosum tests
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev,bench]'
	$(VENV)/bin/zerosum bench --json bench.json --plot bench.png

# the single broker beside the three-node cluster, in the same run, at a reduced size
bench-cluster: $(STAMP)
	$(VENV)/bin/zerosum bench --scenario large,small --customers 200000 --small-rounds 200 \
		--cluster --json bench-cluster.json

# the fault tests at full counts (100 kills, 5 broker restarts, 20 leader kills and 3 rolling
# restarts of the cluster, ...), with their summary
soak: $(STAMP)
	ZEROSUM_SOAK=1 $(VENV)/bin/pytest -p no:logging tests/test_crash_kafka.py \
		tests/test_broker_restart_kafka.py tests/test_scenarios.py \
		tests/test_hostile_kafka.py tests/test_fuzz.py tests/test_cluster_faults_kafka.py

lint: $(STAMP)
	$(VENV)/bin/ruff check agents protocol zerosum tests
	$(VENV)/bin/mypy

broker-start: $(STAMP)
	$(VENV)/bin/zerosum broker start

broker-stop: $(STAMP)
	$(VENV)/bin/zerosum broker stop

cluster-start: $(STAMP)
	$(VENV)/bin/zerosum broker start --nodes 3

cluster-stop: $(STAMP)
	$(VENV)/bin/zerosum broker stop --nodes 3

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
