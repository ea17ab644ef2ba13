"""Memory: the suite's one peak-memory meter (:func:`peak_memory_bytes`, used by the op benchmarks
and the training step alike) and the CPU heap setting the CPU timings run under."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import torch


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level stderr (the profiler's start/stop chatter) for the duration."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """On CUDA: ``max_memory_allocated`` over the call. On a CPU: the peak of the bytes allocated
    through torch's CPU allocator during the call and not yet freed, from the profiler's
    allocation events (memory a kernel takes outside torch's allocator is not seen)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            f = node.extra_fields
            events.append((node.start_time_ns, f.alloc_size, f.ptr))
    events.sort(key=lambda e: e[0])
    live, current, peak = {}, 0, 0
    for _, size, ptr in events:
        if size > 0:
            live[ptr] = size
            current += size
            peak = max(peak, current)
        elif ptr in live:  # frees of memory allocated before the call do not count
            current -= live.pop(ptr)
    return peak


def keep_cpu_heap() -> bool:
    """Make glibc's malloc serve every allocation from its heap and keep freed memory
    (``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` = 1 GiB), as the caching allocator does on a GPU.

    By default a large CPU tensor is a fresh ``mmap`` (always from 32 MiB up; below that depending
    on what was freed before), and its first-touch page faults (0.5-2.5 us per 4 KiB page on the CI
    machine) are most of a memory-bound kernel's time. How many of them a call pays then depends on
    the allocation history of the whole process, not on the kernel: the same layer_norm call
    measured 1.6 ms in one run and 3.0 ms in the next. With the heap kept, every provider runs on
    warm memory and the ratios are the kernels'. Returns whether it took effect (glibc only)."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
