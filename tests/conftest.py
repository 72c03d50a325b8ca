"""Shared test setup.

Without a GPU the Triton kernels run in the Triton interpreter, which must be switched on before any ``@triton.jit``
runs, i.e. before ``mit_kernels`` is imported: this file is imported by pytest before the test modules.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from attention_cases import DEVICE

# Parallel by default: with pytest-xdist installed (the test extras bring it) and no ``-n`` given, the suite runs on
# one worker process per core, at most WORKERS_MAX (``-n 0`` runs it in this process). Each worker then keeps torch
# to its share of the cores, so that workers do not oversubscribe them.
WORKERS_MAX = 8


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if not config.pluginmanager.hasplugin("xdist") or "PYTEST_XDIST_WORKER" in os.environ:
        return
    given = config.getoption("numprocesses", None)
    # (a --dist mode without -n, e.g. make test-serve's loadfile, gets as many workers)
    unneeded = config.getoption("collectonly") or config.getoption("usepdb") or config.getoption("dist") == "each"
    if given is None and not unneeded:
        config.option.numprocesses = min(_cores(), WORKERS_MAX)


def pytest_configure(config):
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        share = max(1, _cores() // int(workers))
        torch.set_num_threads(share)
        # and the processes tests start (benchmark and demo scripts, CLI runs, servers) inherit the share: an OpenMP
        # pool of one thread per core beside the other workers' busy cores spin-waits at every barrier (a quick
        # benchmark run took 5x as long on 2 cores)
        os.environ["OMP_NUM_THREADS"] = str(share)


# What the script runs' interpreter imports before it forks them: what every benchmark script imports first.
SCRIPT_PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "mit",
    "mit.integrations",
    "tqdm",
)


@pytest.fixture(scope="session")
def script_runs(tmp_path_factory):
    """Scripts run as ``python script args...`` would run them, in processes forked from one interpreter (per test
    worker) that imported torch, transformers and mit once, with the tests' environment (tests/forked_runs.py):
    ``script_runs.run(args, timeout=..., script=path)`` gives a ``subprocess.CompletedProcess``."""
    from forked_runs import ForkServer

    server = ForkServer(dict(os.environ), tmp_path_factory.mktemp("script-runs"), preload=SCRIPT_PRELOAD)
    yield server
    server.close()


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def fresh_triton_fallbacks(monkeypatch):
    """mit_kernels.dispatch's per-process record of where "auto" cannot use Triton (and what it warned about), empty
    for the test and restored after it."""
    from mit_kernels import dispatch

    for name in ("_triton_checked", "_triton_failures", "_fallback_causes"):
        monkeypatch.setattr(dispatch, name, {})
    monkeypatch.setattr(dispatch, "_warned", set())
    return dispatch
