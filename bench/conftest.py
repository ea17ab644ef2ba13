"""pytest-benchmark entry: ``pytest bench/ --benchmark-only`` (from the repository root).

The benchmark files are named ``bench_<op>.py`` (the project's one-name-per-op rule), so they are
collected here explicitly. Each ``test_<op>`` is parametrized over (case, dtype, mode, provider):
unavailable providers skip with their reason; a provider that fails the check against the reference
skips too (a fusedformer backend fails the test instead: that is our bug).

Options: ``--bench-size quick|full`` (default quick), ``--bench-device cpu|cuda`` (default: cuda when a
GPU is visible), ``--bench-backends LIST`` (as ``fusedformer-bench --backends``).
"""
from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("fusedformer-bench")
    group.addoption("--bench-size", default="quick", choices=("quick", "full"), help="benchmark sizes")
    group.addoption("--bench-device", default=None, choices=("cpu", "cuda"), help="benchmark device")
    group.addoption("--bench-backends", default="all", help="comma-separated providers (default: all)")


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself, whatever its name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    if "bench_item" not in metafunc.fixturenames:
        return
    import torch

    from . import pytest_bench

    config = metafunc.config
    device_name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA GPU is visible to torch")
    wanted = config.getoption("--bench-backends")
    wanted = None if wanted == "all" else [w.strip() for w in wanted.split(",") if w.strip()]
    items, ids = pytest_bench.pytest_items(metafunc.module, config.getoption("--bench-size"),
                                     torch.device(device_name), wanted)
    metafunc.parametrize("bench_item", items, ids=ids)
