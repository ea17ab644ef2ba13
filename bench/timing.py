"""Timing: on a CPU several providers interleaved round by round in a shuffled order (a noisy
neighbour hurts every provider alike), on a GPU one at a time with ``triton.testing.do_bench`` (CUDA
events when Triton is absent). The one timing loop of the suite: the op benchmarks and the training
step both time through :func:`time_providers` (and ``driver.time_into_rows``)."""
from __future__ import annotations

import contextlib
import gc
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int


@dataclass
class TimingBudget:
    """How long to time each provider. On a CPU each sample repeats the call until it lasts at least
    ``min_sample_s`` (timer resolution and jitter). A provider stops taking samples at ``max_samples``,
    or once it has ``min_samples`` and has run for ``seconds``, or — a slow one, say the unfused
    reference with dropout — once it has 3 and has run for ``slow_seconds`` (or, a very slow one,
    for 3 x ``slow_seconds`` whatever its count)."""
    seconds: float
    min_samples: int = 5
    max_samples: int = 50
    min_sample_s: float = 0.005
    warmup_s: float = 0.02
    slow_seconds: float = 1.0


QUICK_BUDGET = TimingBudget(seconds=0.1, min_samples=5, max_samples=25, slow_seconds=0.6)
FULL_BUDGET = TimingBudget(seconds=1.0, min_samples=10, max_samples=100, slow_seconds=10.0)


def _quantiles(ts: Sequence[float]) -> Timing:
    ts = sorted(ts)
    if len(ts) == 1:
        return Timing(ts[0] * 1e3, ts[0] * 1e3, ts[0] * 1e3, 1)
    q = statistics.quantiles(ts, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return Timing(statistics.median(ts) * 1e3, q[1] * 1e3, q[7] * 1e3, len(ts))


@contextlib.contextmanager
def _gc_paused():
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def time_cpu_interleaved(fns: dict[str, Callable[[], object]], budget: TimingBudget,
                         seed: int = 0) -> dict[str, object]:
    """Wall-clock timing of several functions, interleaved: each round times one sample of every
    function, in a freshly shuffled order. Returns name -> ``Timing`` (or the exception it raised)."""
    results: dict[str, object] = {}
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            fn()
            first = time.perf_counter() - t0
            warm = first
            while warm < budget.warmup_s:  # warm caches, allocator and any lazy init
                t0 = time.perf_counter()
                fn()
                first = time.perf_counter() - t0
                warm += first
            inner[name] = max(1, min(1000, math.ceil(budget.min_sample_s / max(first, 1e-9))))
        except Exception as exc:  # reported in the row, not raised
            results[name] = exc
    live = [n for n in fns if n in inner]
    samples: dict[str, list[float]] = {n: [] for n in live}
    spent: dict[str, float] = {n: 0.0 for n in live}

    def done(name: str) -> bool:
        n, t = len(samples[name]), spent[name]
        return n >= 1 and (n >= budget.max_samples or (n >= budget.min_samples and t >= budget.seconds)
                           or (n >= 3 and t >= budget.slow_seconds) or t >= 3 * budget.slow_seconds)

    rng = random.Random(seed)
    with _gc_paused():
        while True:
            order = [n for n in live if not done(n) and n not in results]
            if not order:
                break
            rng.shuffle(order)
            for name in order:
                fn, n = fns[name], inner[name]
                t0 = time.perf_counter()
                try:
                    for _ in range(n):
                        fn()
                except Exception as exc:  # reported in the row, not raised
                    results[name] = exc
                    continue
                dt = time.perf_counter() - t0
                spent[name] += dt
                samples[name].append(dt / n)
    for name in live:
        if name not in results:
            results[name] = _quantiles(samples[name])
    return results


def time_cuda(fn: Callable[[], object]) -> Timing:
    """GPU timing: ``triton.testing.do_bench`` (it flushes L2 between calls), median and p20/p80 in ms;
    CUDA events around each call (with our own L2 flush) when Triton is not installed."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        median, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80, 0)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(50):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return _quantiles(times)


def time_providers(fns: dict[str, Callable[[], object]], device: torch.device, budget: TimingBudget) -> dict[str, object]:
    """Name -> ``Timing`` or the exception the function raised."""
    if device.type == "cpu":
        return time_cpu_interleaved(fns, budget)
    results = {}
    for name, fn in fns.items():
        try:
            results[name] = time_cuda(fn)
        except Exception as exc:
            results[name] = exc
    return results
