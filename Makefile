PYTHON ?= python

.PHONY: test install lint bench

# The one test command (README, .ci/run): install the package with its test extras, then run the suite against the
# installed package (pytest's console script does not put the source tree on sys.path).
test:
	$(PYTHON) -m pip install --quiet ".[test]"
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	cd tests && $(PYTHON) -m pytest -c ../pyproject.toml --rootdir ..

install:
	$(PYTHON) -m pip install .

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

bench:
	$(PYTHON) benchmarks/bench_attention.py
