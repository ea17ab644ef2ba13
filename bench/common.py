"""The benchmark suite's shared machinery, one module per concern, re-exported here under the names
the drivers outside ``bench/`` use (``scripts/gpu_bench.py``, ``tests/test_gpu_session.py``)::

    suite.py        Case, Provider, OpBench, MODES / DTYPES, provider selection, row statuses
    checks.py       the check before timing (fusedformer.testing's 2x rule), the mode runners
    timing.py       the one timing loop (CPU interleaved, GPU do_bench), budgets
    memory.py       the one peak-memory meter, the CPU heap setting
    ceilings.py     ceilings measured in the same run (copy GB/s, matmul TFLOP/s), % of ceiling
    environment.py  what every row records about the machine and the code
    results.py      CSV rows, speedups, the console table
    driver.py       run_op: check, then time (shared with bench_train's training step)
    pytest_bench.py the pytest-benchmark entry

The order for every (case, dtype) is llm.c's habit — check, then time:

1. every provider says whether it can take the input at all (a reason if not);
2. each one that can is run once at a check shape and held to the project's 2x rule against the
   float64 reference (``fusedformer.testing``, the rule and tolerance table the tests use); one
   that fails is reported, not timed;
3. the survivors are timed side by side — on a CPU interleaved round by round in a shuffled order,
   so that a noisy neighbour hurts every provider alike; on a GPU with ``triton.testing.do_bench``
   (CUDA events when Triton is absent) — and their peak memory is measured in one extra call.

Nothing here runs at import time.
"""

from .ceilings import Ceilings, ceiling_rows, measure_ceilings, record_timing
from .checks import ATOL, as_tuple, check_provider, grad_outputs, mode_runner, rule_2x, run_for_check
from .driver import admit, run_op, time_into_rows
from .environment import environment
from .memory import keep_cpu_heap, peak_memory_bytes
from .pytest_bench import BenchItem, pytest_benchmark, pytest_items
from .results import FIELDS, add_speedups, append_csv, format_table
from .suite import (CHECK_FAILED, DTYPE_NAMES, DTYPES, FAILED_BASELINE, FUSEDFORMER_BACKENDS, MODES, Case, OpBench,
                    Provider, Unavailable, backend_error_reason, compiled, default_dtypes, fusedformer_reason,
                    select_providers, status_of)
from .timing import FULL_BUDGET, QUICK_BUDGET, Timing, TimingBudget, time_cpu_interleaved, time_cuda, time_providers

_record = record_timing   # the name scripts/gpu_bench.py calls it by

__all__ = ["ATOL", "BenchItem", "CHECK_FAILED", "Case", "Ceilings", "DTYPES", "DTYPE_NAMES", "FAILED_BASELINE",
           "FIELDS", "FULL_BUDGET", "FUSEDFORMER_BACKENDS", "MODES", "OpBench", "Provider", "QUICK_BUDGET", "Timing",
           "TimingBudget", "Unavailable", "add_speedups", "admit", "append_csv", "as_tuple", "backend_error_reason",
           "ceiling_rows", "check_provider", "compiled", "default_dtypes", "environment", "format_table",
           "fusedformer_reason", "grad_outputs", "keep_cpu_heap", "measure_ceilings", "mode_runner",
           "peak_memory_bytes", "pytest_benchmark", "pytest_items", "record_timing", "rule_2x", "run_for_check",
           "run_op", "select_providers", "status_of", "time_cpu_interleaved", "time_cuda", "time_into_rows",
           "time_providers"]
