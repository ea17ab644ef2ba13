"""Measurements on the machine at hand, shared by the benchmark suite (``bench/``) and the training
driver (``fusedformer.train``): the one peak-memory meter and the one matmul ceiling.

**Peak memory** (:class:`PeakMemory`, :func:`peak_memory_bytes`): the most bytes allocated through
torch's allocator that are live at once during a window, *beyond those live when the window
opened* — the working memory of the code in the window (a call's outputs and temporaries; for a
training step its activations, gradients and optimizer temporaries), not the model's weights or
anything else allocated before. Memory freed in the window that was allocated before it does not
lower the figure, and memory allocated and freed before the window does not raise it. The same
quantity on both device types, measured two ways:

* CUDA: ``torch.cuda.max_memory_allocated`` (peak statistics reset when the window opens) minus
  ``memory_allocated`` at the opening. Costs two synchronizations.
* CPU: torch keeps no running count of CPU allocations, so the window is run under
  ``torch.profiler.profile(profile_memory=True)`` and its allocation events are replayed
  (``_compat.profiler_cpu_allocations``): allocations matched to their frees by pointer. This
  records every op too and costs far more than the call itself, so a caller that times the code
  measures it on a call that is not timed (the benchmarks: one extra call after timing; the
  trainer: one designated step whose time is left out of tokens/s). Memory a kernel takes outside
  torch's allocator (``malloc`` of its own, thread stacks) is not seen, nor that of threads the
  profiler does not follow. The profiler's own stderr lines are dropped; what the window itself
  writes to stderr comes out when it closes.

**Matmul ceiling** (:func:`matmul_ceiling`): the TFLOP/s of a large square ``torch.mm`` in a given
dtype, measured in the running process — the throughput "% of ceiling" (benchmarks) and MFU
(trainer) divide by, instead of a datasheet figure. It runs under the current matmul settings
(``torch.backends.cuda.matmul.allow_tf32``, ``torch.set_float32_matmul_precision``), so a float32
ceiling is TF32's where training uses TF32. The fast end (p20) of the samples is taken: a ceiling
is the best the machine does.
"""
from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import _compat

# ------------------------------------------------------------------------------------------------
# Peak memory
# ------------------------------------------------------------------------------------------------


#: What torch's profiler writes to stderr on its own account: kineto's log lines
#: (``USDT:<date> <time> <pid>:<tid> SyncActivityProfilerHandler.cpp:39] profiler_start``, its
#: failed GPU probe on a machine without one, the ``STAGE:`` lines of older releases), and the CPU
#: allocator's (once per process) notice that a block allocated before profiling was freed.
_PROFILER_CHATTER = re.compile(r"^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \w+\.cpp:\d+\]"
                               r"|Memory block of unknown size was allocated before the profiling started")


class _StderrFilter:
    """C-level stderr (fd 2) goes to a temporary file between :meth:`start` and :meth:`stop`, which
    writes it back less the profiler's chatter: what the measured code itself prints (a warning,
    a log line) still appears, only later."""

    def __init__(self):
        self._saved = self._file = None

    def start(self) -> None:
        try:
            self._file = tempfile.TemporaryFile(mode="w+b")
            sys.stderr.flush()
            self._saved = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        except OSError:
            self._saved = self._file = None

    def stop(self) -> None:
        if self._saved is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        kept = [line for line in self._file.read().decode(errors="replace").splitlines(keepends=True)
                if not _PROFILER_CHATTER.search(line)]
        self._file.close()
        self._saved = self._file = None
        if kept:
            os.write(2, "".join(kept).encode())


def replay_peak(events) -> int:
    """The peak of live bytes over ``(time_ns, bytes, ptr)`` allocation events (``bytes`` < 0 for a
    free), counting only memory allocated among the events: a free of a pointer allocated before
    them is ignored."""
    live: dict[int, int] = {}
    current = peak = 0
    for _, size, ptr in events:
        if size > 0:
            if ptr in live:  # a free the recorder missed: do not count the block twice
                current -= live[ptr]
            live[ptr] = size
            current += size
            peak = max(peak, current)
        elif ptr in live:
            current -= live.pop(ptr)
    return peak


class PeakMemory:
    """The peak-memory meter (see the module docstring for what it measures)::

        with PeakMemory(device) as m:
            ...                      # the measured window
        m.bytes                      # the peak above the window's opening, in bytes

    Meant for one window at a time (profiler windows do not nest)."""

    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"peak memory is measured on cuda and cpu devices, not {self.device}")
        self.bytes: Optional[int] = None
        self._start = 0
        self._prof = self._stderr = None

    def __enter__(self) -> "PeakMemory":
        self.bytes = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._stderr = _StderrFilter()
        self._stderr.start()
        try:
            self._prof.start()
        except BaseException:
            self._stderr.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        prof, self._prof = self._prof, None
        try:
            prof.stop()
        finally:
            self._stderr.stop()
        if exc[0] is None:
            self.bytes = replay_peak(_compat.profiler_cpu_allocations(prof))

    @property
    def mb(self) -> Optional[float]:
        return None if self.bytes is None else self.bytes / 2**20


def peak_memory_bytes(fn: Callable[[], object], device) -> int:
    """:class:`PeakMemory` over one call of ``fn`` (its result is dropped inside the window)."""
    with PeakMemory(device) as m:
        out = fn()
        del out
    return m.bytes


# ------------------------------------------------------------------------------------------------
# The matmul ceiling
# ------------------------------------------------------------------------------------------------

#: The ceiling matmul's size, n x n x n, per device type: past the point where a bigger matmul is
#: no faster, and short enough to measure in a second (about 2 ms in bf16 on an H100; ~0.2 s in
#: float32 on two CPU cores).
MATMUL_CEILING_N = {"cuda": 8192, "cpu": 2048}


@dataclass(frozen=True)
class MatmulCeiling:
    tflops: float
    dtype: torch.dtype
    n: int
    seconds: float  # the fast end (p20) of one call

    @property
    def notes(self) -> str:
        return f"matmul {self.n}x{self.n}x{self.n}"


def fast_end_seconds(fn: Callable[[], object], device, *, seconds: float = 0.3, min_samples: int = 3,
                     max_samples: int = 50, warmup_s: float = 0.05) -> float:
    """The 20th percentile of ``fn``'s wall time over repeated calls (synchronized on a GPU): about
    ``seconds`` of samples after ``warmup_s`` of warm-up (at least one call each way). The
    benchmarks time with their own loop (``bench/timing.py``) and hand it to :func:`matmul_ceiling`
    as ``timer``; this one serves the trainer, which has no timing budget of its own."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    warm = 0.0
    while True:
        t0 = time.perf_counter()
        fn()
        sync()
        warm += time.perf_counter() - t0
        if warm >= warmup_s:
            break
    times: list[float] = []
    while len(times) < max_samples and (len(times) < min_samples or sum(times) < seconds):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    if len(times) == 1:
        return times[0]
    return statistics.quantiles(times, n=10, method="inclusive")[1]


def matmul_ceiling(device, dtype: torch.dtype, *, timer: Optional[Callable[[Callable[[], object]], float]] = None,
                   n: Optional[int] = None) -> MatmulCeiling:
    """The TFLOP/s of an ``n`` x ``n`` x ``n`` ``torch.mm`` in ``dtype`` on ``device`` (``n`` from
    :data:`MATMUL_CEILING_N` unless given): ``2·n³`` FLOPs over the fast end of its time.
    ``timer(fn)`` returns that time in seconds (default :func:`fast_end_seconds`)."""
    device = torch.device(device)
    n = n or MATMUL_CEILING_N[device.type]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    fn = lambda: torch.mm(a, b)  # noqa: E731
    s = timer(fn) if timer is not None else fast_end_seconds(fn, device)
    return MatmulCeiling(tflops=2 * n**3 / s / 1e12, dtype=dtype, n=n, seconds=s)
