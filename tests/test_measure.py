"""``fusedformer.measure``: the one peak-memory meter and the one matmul ceiling (used by bench/
and the training driver), and the trainer's MFU arithmetic (``fusedformer.train.perf``)."""
from __future__ import annotations

import gc

import pytest
import torch

from fusedformer import measure
from fusedformer.measure import MatmulCeiling, PeakMemory, matmul_ceiling, peak_memory_bytes, replay_peak

MiB = 2**20
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SLACK = MiB  # what else a window may allocate (the profiler's own, a result or two)


def _alloc(nbytes: int, device: str) -> torch.Tensor:
    return torch.ones(nbytes, dtype=torch.uint8, device=device)  # written: really allocated


@pytest.mark.parametrize("device", DEVICES)
def test_an_allocation_inside_the_window_is_counted(device):
    n = 8 * MiB
    with PeakMemory(device) as m:
        x = _alloc(n, device)
        del x
    assert n <= m.bytes <= n + SLACK


@pytest.mark.parametrize("device", DEVICES)
def test_memory_allocated_and_freed_before_the_window_is_not(device):
    big = _alloc(64 * MiB, device)
    del big
    gc.collect()
    with PeakMemory(device) as m:
        x = _alloc(MiB, device)
        del x
    assert MiB <= m.bytes <= MiB + SLACK


@pytest.mark.parametrize("device", DEVICES)
def test_memory_live_before_the_window_counts_neither_way(device):
    """Held through the window: not counted; freed inside it: does not lower the figure."""
    held = _alloc(32 * MiB, device)
    before = _alloc(16 * MiB, device)
    with PeakMemory(device) as m:
        del before
        x = _alloc(4 * MiB, device)
        del x
    assert 4 * MiB <= m.bytes <= 4 * MiB + SLACK
    del held


@pytest.mark.parametrize("device", DEVICES)
def test_the_peak_not_the_sum_nor_the_end(device):
    def fn():
        a = _alloc(8 * MiB, device)
        b = _alloc(2 * MiB, device)  # 10 MiB live at once
        del a, b
        c = _alloc(6 * MiB, device)  # then 6
        return c
    peak = peak_memory_bytes(fn, device)
    assert 10 * MiB <= peak <= 10 * MiB + SLACK


def test_the_cpu_meter_drops_the_profilers_chatter_not_the_windows_own(capfd):
    import os
    with PeakMemory("cpu"):
        os.write(2, b"USDT:2026-12-03 18:45:28 17337:17337 SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        os.write(2, b"the window's own line\n")
    err = capfd.readouterr().err
    assert "the window's own line" in err
    assert "SyncActivityProfilerHandler" not in err and "Memory block of unknown size" not in err


def test_replay_peak():
    events = [(0, -100, 1),   # a free of memory from before: ignored
              (1, 50, 2), (2, 30, 3), (3, -50, 2), (4, 40, 4), (5, -40, 4)]
    assert replay_peak(events) == 80
    assert replay_peak([]) == 0


def test_the_meter_refuses_other_devices():
    with pytest.raises(ValueError, match="cuda and cpu"):
        PeakMemory("meta")


def test_bench_and_package_share_the_meter_and_ceiling():
    from fusedformer.bench import ceilings, memory
    assert memory.peak_memory_bytes is peak_memory_bytes
    assert ceilings.matmul_ceiling is matmul_ceiling


# ------------------------------------------------------------------------------------------------
# the matmul ceiling, MFU
# ------------------------------------------------------------------------------------------------
def test_matmul_ceiling_is_2n3_over_the_timed_seconds():
    seen = []

    def timer(fn):
        out = fn()
        seen.append((tuple(out.shape), out.dtype))
        return 0.25
    c = matmul_ceiling("cpu", torch.bfloat16, timer=timer, n=64)
    assert seen == [((64, 64), torch.bfloat16)]
    assert c.tflops == pytest.approx(2 * 64**3 / 0.25 / 1e12, rel=1e-12)
    assert (c.n, c.dtype, c.seconds, c.notes) == (64, torch.bfloat16, 0.25, "matmul 64x64x64")


def test_bench_ceilings_time_the_package_matmul_with_the_suite_loop(monkeypatch):
    from fusedformer.bench import ceilings, timing
    timed = []

    def fake(device, dtype, *, n, timer):
        timed.append(timer(lambda: torch.ones(4)))  # the suite's loop, in seconds
        return MatmulCeiling(tflops=7.0, dtype=dtype, n=n, seconds=timed[-1])
    monkeypatch.setattr(ceilings, "matmul_ceiling", fake)
    budget = timing.TimingBudget(seconds=0.01, min_samples=3, max_samples=5)
    c = ceilings.measure_ceilings(torch.device("cpu"), [torch.float32, torch.bfloat16], budget)
    assert c.matmul_tflops == {torch.float32: 7.0, torch.bfloat16: 7.0} and c.copy_gbps > 0
    assert len(timed) == 2 and all(0 < t < 0.01 for t in timed)
    assert "matmul 2048x2048x2048" in c.notes


def test_matmul_ceiling_default_size_and_timer(monkeypatch):
    calls = []
    monkeypatch.setattr(measure, "fast_end_seconds", lambda fn, device: calls.append(device) or 1.0)
    c = matmul_ceiling("cpu", torch.float32)
    assert c.n == measure.MATMUL_CEILING_N["cpu"] and calls == [torch.device("cpu")]
    assert c.tflops == pytest.approx(2 * c.n**3 / 1e12)


def test_fast_end_seconds_is_the_fast_end():
    import time
    delays = iter([0.0] + [0.002] * 3 + [0.03] * 7)  # a warm-up call, then fast and slow samples

    def fn():
        time.sleep(next(delays, 0.03))
    s = measure.fast_end_seconds(fn, "cpu", seconds=0.0, min_samples=10, warmup_s=0.0)
    assert 0.002 <= s < 0.02


def test_a_real_small_ceiling_is_positive():
    c = matmul_ceiling("cpu", torch.float32, n=128)
    assert 0 < c.tflops < 1e3 and c.seconds > 0


def test_mfu_is_flops_per_s_over_the_ceiling():
    from fusedformer.train.perf import mfu
    assert mfu(1e9, 2e3, 4.0) == pytest.approx(1e9 * 2e3 / 4e12)
    assert mfu(1e9, 2e3, 0.0) is None and mfu(1e9, None, 4.0) is None


def test_peak_tflops_override_wins_and_skips_the_measurement(monkeypatch):
    from fusedformer.train import perf

    def boom(*a, **k):
        raise AssertionError("measured despite --peak-tflops")
    monkeypatch.setattr(perf, "matmul_ceiling", boom)
    perf._cached_ceiling.cache_clear()
    assert perf.mfu_ceiling(torch.device("cpu"), "fp32", 123.0) == (123.0, "--peak-tflops")


def test_without_override_the_ceiling_is_measured_in_the_training_precision(monkeypatch):
    from fusedformer.train import perf
    asked = []

    def fake(device, dtype):
        asked.append((device, dtype))
        return MatmulCeiling(tflops=0.75, dtype=dtype, n=8, seconds=1.0)
    monkeypatch.setattr(perf, "matmul_ceiling", fake)
    perf._cached_ceiling.cache_clear()
    try:
        tflops, source = perf.mfu_ceiling(torch.device("cpu"), "fp32", None)
        assert tflops == 0.75 and source.startswith("measured: float32 matmul")
        assert perf.mfu_ceiling(torch.device("cpu"), "fp32", None)[0] == 0.75
        assert asked == [(torch.device("cpu"), torch.float32)]  # once per process and setting
        perf.mfu_ceiling(torch.device("cpu"), "bf16", None)
        assert asked[-1] == (torch.device("cpu"), torch.bfloat16)
    finally:
        perf._cached_ceiling.cache_clear()
