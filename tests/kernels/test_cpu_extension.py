"""Which build of the C++ CPU kernels is used: a build runs only under the torch (and CPU) it was compiled for; with
none and no way to compile one, CPU tensors get the exact reference path and one warning. The no-compiler cases run in
subprocesses: the extension state is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mit_kernels import cpu_build, cpu_extension


def stamp(**overrides) -> dict:
    return {**cpu_build.expected_stamp("DEFAULT"), **overrides}


def test_stamp_mismatch_names_what_differs(monkeypatch):
    assert cpu_extension.stamp_mismatch(stamp()) is None
    assert cpu_extension.stamp_mismatch(None) == "no build"
    other = cpu_extension.stamp_mismatch(stamp(torch="2.14.1"))
    assert other == f"built for torch 2.14.1, running torch {torch.__version__}"
    assert "built for torch" in cpu_extension.stamp_mismatch(stamp(torch_git="0" * 40))
    assert cpu_extension.stamp_mismatch(stamp(sources="feedface")) == "built from other sources"
    assert cpu_extension.stamp_mismatch(stamp(flags="-O0")) == "built with other compiler flags"
    monkeypatch.setattr(cpu_build, "cpu_has_avx2", lambda: False)
    assert cpu_extension.stamp_mismatch(stamp(isa="AVX2", flags="")) == "built with AVX2, which this CPU lacks"
    assert cpu_extension.stamp_mismatch(stamp(isa="DEFAULT")) is None


def test_a_build_for_another_torch_is_not_loaded(tmp_path):
    prebuilt, cache = tmp_path / "prebuilt", tmp_path / "cache"
    prebuilt.mkdir()
    (prebuilt / cpu_build.STAMP_NAME).write_text(json.dumps(stamp(torch="2.14.1")))
    (prebuilt / f"{cpu_build.EXTENSION_NAME}.so").write_bytes(b"not a library: it must never be opened")
    state = cpu_extension.find_existing(prebuilt, cache)
    assert state.module is None
    assert state.reason == f"prebuilt: built for torch 2.14.1, running torch {torch.__version__}; cached: no build"


def test_cache_directory_is_per_torch_and_isa(monkeypatch, tmp_path):
    monkeypatch.setenv("MIT_KERNELS_CACHE", str(tmp_path))
    directory = cpu_build.cache_dir()
    assert directory.parent == tmp_path
    assert directory.name.startswith(f"torch{torch.__version__.replace('+', '_')}-{cpu_build.vector_isa().lower()}-")
    monkeypatch.setenv("MIT_CPU_AVX2", "0")
    assert cpu_build.cache_dir().name.split("-")[1] == "default"


def run_without_a_build(tmp_path, **env) -> subprocess.CompletedProcess:
    """A fresh interpreter that sees no matching build (empty prebuilt and cache directories) and whose compiler is
    missing; it calls the public ops on CPU tensors twice and compares them with the reference."""
    script = textwrap.dedent(f"""
        import pathlib, warnings, torch
        import mit_kernels.cpu_extension as ce
        # Importing the package already loaded any build installed with it: look again, as if there were none.
        ce.PREBUILT_DIR = pathlib.Path({str(tmp_path / "prebuilt")!r})
        ce._state, ce._compile_attempted = None, False
        from mit_kernels import mit_attention, mit_attention_reference, mit_ffn_gate, mit_ffn_gate_reference
        from mit_kernels.__main__ import main
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 2, 5, 8, generator=g)
        k, v = torch.randn(1, 1, 5, 8, generator=g), torch.randn(1, 1, 5, 8, generator=g)
        vecs = [0.3 * torch.randn(1, 1, 8, generator=g) for _ in range(4)]
        lam = torch.ones(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                out = mit_attention(q, k, v, *vecs, lam)
                gate = mit_ffn_gate(q[0], k[0].expand_as(q[0]), torch.randn(2, 8, generator=g))
        assert torch.equal(out, mit_attention_reference(q, k, v, *vecs, lam)), "not the reference path"
        print("WARNINGS", len([w for w in caught if "C++ CPU kernels are unavailable" in str(w.message)]))
        for w in caught:
            print("MESSAGE", w.message)
        main([])
    """)  # fmt: skip
    environment = {**os.environ, "MIT_KERNELS_CACHE": str(tmp_path / "cache"), "CXX": "no-such-compiler", **env}
    environment.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300)


def test_no_compiler_gives_one_warning_and_the_reference_path(tmp_path):
    result = run_without_a_build(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNINGS 1" in result.stdout, result.stdout
    assert "no C++ compiler ('no-such-compiler' not on PATH)" in result.stdout
    assert "and no C++ compiler: CPU tensors use the exact reference path" in result.stdout
    assert "CPU tensors -> 'reference'" in result.stdout


def test_opting_out_is_silent(tmp_path):
    result = run_without_a_build(tmp_path, MIT_SKIP_CPU_EXT="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNINGS 0" in result.stdout and "not used (MIT_SKIP_CPU_EXT is set)" in result.stdout


@pytest.mark.skipif(cpu_build.compiler() is None, reason="no C++ compiler here")
def test_report_says_which_build_is_loaded():
    result = subprocess.run([sys.executable, "-m", "mit_kernels"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    state = cpu_extension.state(compile_if_missing=True)  # the suite needs the kernels: compiled here if missing
    assert state.module is not None, state.reason
    assert f"C++ extension:  {state.source} build for torch {torch.__version__}, usable" in result.stdout


def test_builds_are_private_until_published_and_a_killed_build_blocks_nothing(monkeypatch, tmp_path):
    """The compile runs in a private directory renamed into place: a build killed half-way (its directory and torch's
    lock file left behind) neither blocks nor corrupts the next one, and old leftovers are removed."""
    import time

    if cpu_build.compiler() is None:
        pytest.skip("no C++ compiler here (build() checks for one before compiling)")
    compiled = []

    def fake_compile(directory, src, cflags, ldflags, verbose):
        assert directory.name.startswith("build.tmp-") and directory.parent == tmp_path  # never the published path
        (directory / f"{cpu_build.EXTENSION_NAME}.so").write_bytes(b"library %d" % len(compiled))
        compiled.append(directory)
        return f"module {len(compiled)}"

    monkeypatch.setattr(cpu_build, "_compile", fake_compile)
    monkeypatch.setattr(cpu_build, "load_library", lambda directory: f"loaded {directory.name}")
    target = tmp_path / "build"
    killed = tmp_path / "build.tmp-12345-killed"  # what a kill -9 during a compile leaves
    killed.mkdir()
    (killed / "lock").write_text("")
    old = time.time() - 7200
    os.utime(killed, (old, old))
    assert cpu_build.build(target) == "module 1"
    assert (target / f"{cpu_build.EXTENSION_NAME}.so").read_bytes() == b"library 0"
    assert json.loads((target / cpu_build.STAMP_NAME).read_text()) == cpu_build.expected_stamp()
    assert not killed.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["build", "build.lock"]
    assert cpu_build.build(target) == "loaded build"  # published meanwhile (by a build we waited for): no compile
    assert len(compiled) == 1
    (target / cpu_build.STAMP_NAME).write_text("{}")  # a build there that is not this one (older, no lock): kept
    assert cpu_build.build(target) == "module 2"
    assert (target / f"{cpu_build.EXTENSION_NAME}.so").read_bytes() == b"library 0"
    cpu_build.build(target, replace=True)  # python -m mit_kernels build --force
    assert (target / f"{cpu_build.EXTENSION_NAME}.so").read_bytes() == b"library 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "build.lock"]


def test_two_processes_building_at_once_compile_once(tmp_path):
    """Two processes starting a build into one directory at the same moment: the second waits for the first (a file
    lock beside the directory) and loads its build instead of compiling again. The compile is faked (one second)."""
    if cpu_build.compiler() is None:
        pytest.skip("no C++ compiler here (build() checks for one before compiling)")
    script = textwrap.dedent(f"""
        import os, pathlib, sys, time
        from mit_kernels import cpu_build
        log = pathlib.Path({str(tmp_path / "compiles.log")!r})

        def fake_compile(directory, src, cflags, ldflags, verbose):
            with open(log, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(1.0)
            (directory / f"{{cpu_build.EXTENSION_NAME}}.so").write_bytes(b"library")
            return "compiled"

        cpu_build._compile = fake_compile
        cpu_build.load_library = lambda directory: "loaded"
        sys.stdin.readline()  # both processes start building together
        print(cpu_build.build(pathlib.Path({str(tmp_path / "build")!r})), flush=True)
    """)  # fmt: skip
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = sorted(process.communicate(timeout=300)[0].strip() for process in processes)
    assert [p.returncode for p in processes] == [0, 0]
    assert outputs == ["compiled", "loaded"]
    assert len((tmp_path / "compiles.log").read_text().split()) == 1


def test_concurrent_first_use_waits_for_the_build(monkeypatch):
    """A thread asking for backend="cpu" while another thread compiles the kernels at first use gets them once the
    build is done, not a false "no build" error; the build runs once."""
    import threading
    import time

    from mit_kernels import dispatch, mit_attention, mit_attention_reference, resolve_backend

    loaded = cpu_extension.state()
    if loaded.module is None:
        pytest.skip(f"no build of the C++ kernels here ({loaded.reason})")
    compiling, calls = threading.Event(), []

    def slow_compile(cache=None, *, verbose=False):  # a first-use compile: here, the build already loaded
        calls.append(threading.current_thread().name)
        compiling.set()
        time.sleep(1.0)
        return loaded

    # as at first use in a fresh process: nothing found yet, no compile tried
    monkeypatch.setattr(cpu_extension, "_state", cpu_extension.ExtensionState(reason="prebuilt: no build"))
    monkeypatch.setattr(cpu_extension, "_compile_attempted", False)
    monkeypatch.setattr(cpu_extension, "compile_now", slow_compile)
    results: dict[str, object] = {}
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 1, 5, 8, generator=g)]
    inputs += [torch.randn(1, 1, 5, 8, generator=g), *(0.3 * torch.randn(1, 1, 8, generator=g) for _ in range(4))]
    inputs.append(torch.ones(1))

    def first_use() -> None:
        results["first"] = dispatch.cpu_backend()  # compiles (compile_if_missing=True by default)

    def concurrent_use() -> None:
        compiling.wait(timeout=60)
        try:
            results["second"] = resolve_backend("cpu", torch.device("cpu"))
            results["output"] = mit_attention(*inputs, backend="cpu")
        except ValueError as error:
            results["second"] = error

    threads = [threading.Thread(target=first_use, name="first"), threading.Thread(target=concurrent_use)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results["second"] == "cpu", results["second"]
    assert results["first"][0] is not None and results["first"][1] is None
    assert calls == ["first"]  # one build; the second thread waited for it
    torch.testing.assert_close(results["output"], mit_attention_reference(*inputs), rtol=1e-5, atol=1e-6)


def test_the_build_compiles_every_source_and_starts_the_slowest_first():
    """ninja starts the sources in the order given: ops.cpp (the registration, which parses torch's autograd headers,
    the longest compile) first, so that on two cores the kernels compile beside it rather than after it."""
    src = cpu_build.sources_dir()
    order = [p.name for p in cpu_build.compile_order(src)]
    assert sorted(order) == sorted(p.name for p in src.glob("*.cpp")) and order[0] == "ops.cpp"
    assert len(order) == len(set(order)) >= 4
