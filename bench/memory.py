"""Memory: the peak-memory meter (:func:`peak_memory_bytes`, used by the op benchmarks and the
training step alike) and the CPU heap setting the CPU timings run under.

The meter is the package's, ``fusedformer.measure`` — the same one ``fusedformer-train`` reports
with: the most bytes allocated through torch's allocator that a call holds at once beyond those
live before it (CUDA: ``max_memory_allocated``; CPU: the profiler's allocation events)."""
from __future__ import annotations

from fusedformer.measure import peak_memory_bytes

__all__ = ["keep_cpu_heap", "peak_memory_bytes"]


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
