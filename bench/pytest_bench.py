"""pytest-benchmark (bench/conftest.py parametrizes each bench_<op>.py's test over these items)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .checks import check_provider, mode_runner
from .suite import (CHECK_FAILED, DTYPE_NAMES, FUSEDFORMER_BACKENDS, Case, OpBench, default_dtypes,
                    select_providers, status_of)

@dataclass
class BenchItem:
    case: Case
    dtype: torch.dtype
    mode: str
    provider: str
    device: torch.device


def pytest_items(module, size: str, device: torch.device, wanted) -> tuple[list, list[str]]:
    if hasattr(module, "pytest_items"):
        return module.pytest_items(size, device, wanted)
    bench = module.bench()
    items, ids = [], []
    for case in bench.cases(size, device):
        for dtype in default_dtypes(bench.op, device.type):
            for mode in bench.modes:
                for p in select_providers(bench.providers(device), wanted):
                    items.append(BenchItem(case, dtype, mode, p.name, device))
                    ids.append(f"{case.sweep}:{case.label}-{DTYPE_NAMES[dtype]}-{mode}-{p.name}".replace(" ", "_"))
    return items, ids


_PYTEST_CHECKS: dict[tuple, tuple[Optional[str], str]] = {}


def pytest_benchmark(benchmark, bench: OpBench, item: BenchItem) -> None:
    """Check one provider against the reference, then time one mode of it with pytest-benchmark."""
    import pytest

    providers = {p.name: p for p in bench.providers(item.device)}
    provider, reference = providers[item.provider], providers["reference"]
    why = provider.unavailable(item.device, item.dtype, item.case.params)
    if why:
        pytest.skip(f"{item.provider}: {why}")
    cparams = bench.check_params(item.case.params)
    key = (bench.op, item.provider, DTYPE_NAMES[item.dtype], tuple(sorted(cparams.items())))
    if key not in _PYTEST_CHECKS:
        try:
            failure, text = check_provider(bench.op, provider, reference, bench.make_inputs, cparams,
                                           item.dtype, item.device)
            _PYTEST_CHECKS[key] = (None if failure is None else f"{CHECK_FAILED}{failure}", text)
        except Exception as exc:
            _PYTEST_CHECKS[key] = (status_of(exc, item.provider), "")
    failure, text = _PYTEST_CHECKS[key]
    if failure:
        if failure.startswith("check failed") and item.provider in FUSEDFORMER_BACKENDS:
            pytest.fail(f"{item.provider}: {failure}")
        pytest.skip(f"{item.provider}: {failure}")
    tensors, leaves = bench.make_inputs(item.case.params, item.dtype, item.device)
    try:
        fn = mode_runner(provider, tensors, leaves, item.case.params, item.mode)
        fn()
    except Exception as exc:
        pytest.skip(f"{item.provider}: {status_of(exc, item.provider)}")
    if item.device.type == "cuda":
        inner_fn = fn

        def fn():
            inner_fn()
            torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    iterations = max(1, math.ceil(0.005 / max(once, 1e-9)))
    work = bench.work(item.case.params, item.mode, item.dtype)
    benchmark.extra_info.update(op=bench.op, config=item.case.config(), dtype=DTYPE_NAMES[item.dtype],
                                mode=item.mode, provider=item.provider, check=text, unit=bench.unit)
    benchmark.pedantic(fn, rounds=10, iterations=iterations, warmup_rounds=2)
    median = benchmark.stats.stats.median
    scale = 1e12 if bench.unit == "TFLOP/s" else 1e9
    benchmark.extra_info["throughput"] = work / median / scale
