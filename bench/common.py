"""Shared machinery of the benchmark suite: cases and providers, the check against the reference,
timing, peak memory, measured ceilings, result rows (CSV), the console table and the plots.

The order for every (case, dtype) is llm.c's habit — check, then time:

1. every provider says whether it can take the input at all (a reason if not);
2. each one that can is run once at a check shape and held to the project's 2x rule against the
   float64 reference (``tests/numerics.py``, mirrored below so that the installed
   ``fusedformer-bench`` needs no test folder); one that fails is reported, not timed;
3. the survivors are timed side by side — on a CPU interleaved round by round in a shuffled order,
   so that a noisy neighbour hurts every provider alike; on a GPU with ``triton.testing.do_bench``
   (CUDA events when Triton is absent) — and their peak memory is measured in one extra call.

Nothing here runs at import time.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import gc
import math
import os
import platform
import random
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from fusedformer import testing

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FUSEDFORMER_BACKENDS = ("reference", "cpu", "cuda", "triton")


# The project's 2x rule and its one tolerance table: fusedformer.testing (shared with the tests).
rule_2x = testing.check_2x
ATOL = testing.ATOL


# ------------------------------------------------------------------------------------------------
# Cases and providers
# ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One benchmarked configuration of one op."""
    op: str
    sweep: str                 # the sweep it belongs to (one plot per sweep)
    params: dict               # shapes and flags, read by the op module
    label: str                 # short text for the table
    x: object                  # the plot's x value (a number, or a name for a categorical sweep)
    series: str = ""           # the plot panel it goes to within its sweep (say "D=64 causal")
    xname: str = ""            # what x is, for the plot's axis

    def config(self) -> str:
        return " ".join(f"{k}={_fmt_param(v)}" for k, v in self.params.items())


def _fmt_param(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


@dataclass
class Provider:
    """Something that computes an op: a fusedformer backend or what a user would use instead.

    ``fn(tensors, params)`` runs the op on the case's tensors (a dict) and returns the output (a
    tensor or a tuple). ``unavailable(device, dtype, params)`` says why it cannot run here, or None.
    ``own_rng``: its dropout draws from torch's RNG, so it can only be checked with dropout off."""
    name: str
    fn: Callable[[dict, dict], object]
    unavailable: Callable[[torch.device, torch.dtype, dict], Optional[str]] = lambda d, t, p: None
    own_rng: bool = False


CHECK_FAILED = "check failed: "
FAILED_BASELINE = "FAILED (timed only as the baseline): "


class Unavailable(RuntimeError):
    """Raised by a provider's ``fn`` when it turns down these particular inputs (with the reason)."""


def fusedformer_reason(op_module, backend: str, device: torch.device) -> Optional[str]:
    """Why a fusedformer backend cannot run ``op_module``'s op on ``device`` at all (not input-specific)."""
    if backend not in op_module.TABLE:
        return f"{op_module.OP} has no {backend} implementation yet"
    why = op_module.TABLE[backend].reasons({"device": device, "probe": True})
    return "; ".join(why) if why else None


def backend_error_reason(exc: Exception, backend: str) -> str:
    """The line about ``backend`` in a ``BackendError`` message (the whole message if none)."""
    for line in str(exc).splitlines():
        if line.strip().startswith(f"{backend}:"):
            return line.strip()[len(backend) + 1:].strip()
    return str(exc).strip().splitlines()[0]


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, created on first use. The suite compiles one function at many shapes,
    dtypes and flags: the recompile limit is raised so that dynamo never falls back to eager
    silently (which would time eager code under the name ``compile``). Donated buffers are turned
    off (see below), which can cost compile's backward a little memory."""
    state: dict = {}

    def run(*args):
        if "fn" not in state:
            import torch._dynamo.config as dynamo_config

            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
            if hasattr(dynamo_config, "accumulated_recompile_limit"):
                dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
            # The bwd mode replays the backward of one retained graph (retain_graph=True), which a
            # compiled backward with donated buffers refuses; give up that memory reuse instead.
            import torch._functorch.config as functorch_config

            if hasattr(functorch_config, "donated_buffer"):
                functorch_config.donated_buffer = False
            state["fn"] = torch.compile(fn)
        return state["fn"](*args)

    return run


def select_providers(providers: Sequence[Provider], wanted: Optional[Sequence[str]]) -> list[Provider]:
    """Keep the providers ``wanted`` names (exactly, or as a prefix before '-': 'sdpa' keeps 'sdpa-math')."""
    if wanted is None:
        return list(providers)
    return [p for p in providers if any(p.name == w or p.name.startswith(w + "-") for w in wanted)]


def as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def grad_outputs(outs: Sequence[torch.Tensor], seed: int = 1234) -> list[torch.Tensor]:
    """Fixed random upstream gradients (never ones: a constant dy hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen).to(device=o.device, dtype=o.dtype) for o in outs]


def mode_runner(provider: Provider, tensors: dict, leaves: Sequence[str], params: dict, mode: str) -> Callable[[], object]:
    """A no-argument function that runs one ``mode`` (fwd, bwd or fwd+bwd) of ``provider``.

    fwd runs the forward with autograd recording, as in training; bwd runs only the backward of one
    retained forward graph; fwd+bwd runs both."""
    leaf_ts = [tensors[n] for n in leaves]
    if mode == "fwd":
        return lambda: provider.fn(tensors, params)
    outs = as_tuple(provider.fn(tensors, params))
    douts = grad_outputs(outs)
    if mode == "bwd":
        return lambda: torch.autograd.grad(outs, leaf_ts, douts, retain_graph=True)
    if mode == "fwd+bwd":
        def fwd_bwd():
            return torch.autograd.grad(as_tuple(provider.fn(tensors, params)), leaf_ts, douts)
        return fwd_bwd
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def run_for_check(provider: Provider, tensors: dict, leaves: Sequence[str], params: dict
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward and (when there are leaves) backward once: outputs and gradients, detached."""
    outs = as_tuple(provider.fn(tensors, params))
    grads = []
    if leaves:
        grads = list(torch.autograd.grad(outs, [tensors[n] for n in leaves], grad_outputs(outs),
                                         allow_unused=True))
    return [o.detach() for o in outs], [None if g is None else g.detach() for g in grads]


def check_provider(op: str, provider: Provider, reference: Provider, make_inputs, params: dict,
                   dtype: torch.dtype, device: torch.device) -> tuple[Optional[str], str]:
    """Hold ``provider`` to the 2x rule at ``params``. Returns ``(failure or None, summary)``.

    ``make_inputs(params, dtype, device)`` gives ``(tensors, leaves)``; it is called with
    float64 on the CPU for the exact reference, and the same values are cast for the other runs."""
    orig_p = params.get("dropout_p", 0.0)
    if provider.own_rng and orig_p > 0.0:
        params = {**params, "dropout_p": 0.0}
        note = ", dropout off (own RNG)"
    else:
        note = ""
    master, leaves = make_inputs(params, torch.float64, torch.device("cpu"))

    def cast(run_dtype, run_device):
        out = {}
        for k, v in master.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                out[k] = v.detach().to(device=run_device, dtype=run_dtype).requires_grad_(k in leaves)
            elif isinstance(v, torch.Tensor):
                out[k] = v.to(run_device)
            else:
                out[k] = v
        return out

    if note:  # it must still accept dropout: one unchecked call at the real dropout rate
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = dict(params, dropout_p=orig_p)
            run_for_check(provider, cast(dtype, device), leaves, full)
    outs, grads = run_for_check(provider, cast(dtype, device), leaves, params)
    base_outs, base_grads = run_for_check(reference, cast(dtype, device), leaves, params)
    ref_outs, ref_grads = run_for_check(reference, cast(torch.float64, torch.device("cpu")), leaves, params)
    names = [f"out{i}" for i in range(len(outs))] + [f"d{n}" for n in leaves]
    worst = 0.0
    for name, o, r, b in zip(names, outs + grads, ref_outs + ref_grads, base_outs + base_grads):
        if r is None or o is None:
            if (r is None) != (o is None):
                return f"{name}: gradient missing on one side", ""
            continue
        failure, err, bound = rule_2x(name, op, o, r, b, dtype)
        if failure:
            return failure, ""
        worst = max(worst, err / bound if bound > 0 else 0.0)
    return None, f"ok (err <= {worst:.2f} of bound{note})"


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# Peak memory: the most memory the call holds at once beyond what existed before it
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# Ceilings measured on the machine at hand
# ------------------------------------------------------------------------------------------------
@dataclass
class Ceilings:
    copy_gbps: float                                   # a large device-to-device copy, read + write
    matmul_tflops: dict = field(default_factory=dict)  # dtype -> a large square matmul
    notes: str = ""


def measure_ceilings(device: torch.device, dtypes: Sequence[torch.dtype], budget: TimingBudget) -> Ceilings:
    if device.type == "cuda":
        copy_bytes, n = 2**30, 8192
    else:  # past the last-level cache, and short enough for --quick
        copy_bytes, n = 256 * 2**20, 2048
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    fns = {"copy": lambda: dst.copy_(src)}
    mats = {}
    for dt in dtypes:
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        mats[dt] = (a, b)
        fns[f"mm:{DTYPE_NAMES[dt]}"] = (lambda a=a, b=b: torch.mm(a, b))
    timings = time_providers(fns, device, budget)
    # The ceiling is the best a kernel can do: take the fast end of the distribution (p20).
    copy_t = timings["copy"]
    ceil = Ceilings(copy_gbps=2 * copy_bytes / (copy_t.p20_ms * 1e-3) / 1e9,
                    notes=f"copy {copy_bytes >> 20} MiB; matmul {n}x{n}x{n}")
    for dt in dtypes:
        t = timings[f"mm:{DTYPE_NAMES[dt]}"]
        ceil.matmul_tflops[dt] = 2 * n**3 / (t.p20_ms * 1e-3) / 1e12
    return ceil


def ceiling_rows(env: dict, ceilings: Ceilings) -> list[dict]:
    """The ceilings as result rows (ceilings.csv), so every run's percentages can be traced."""
    rows = [dict(env, op="ceiling", sweep="copy", config=ceilings.notes, dtype="float32", mode="-",
                 provider="copy", status="ok", throughput=ceilings.copy_gbps, unit="GB/s")]
    for dt, tf in ceilings.matmul_tflops.items():
        rows.append(dict(env, op="ceiling", sweep="matmul", config=ceilings.notes, dtype=DTYPE_NAMES[dt],
                         mode="-", provider="mm", status="ok", throughput=tf, unit="TFLOP/s"))
    return rows


# ------------------------------------------------------------------------------------------------
# The environment every row records
# ------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    from fusedformer import cpu_caps
    return cpu_caps.cpu_model() or platform.processor() or platform.machine()


def _cpu_flags() -> str:
    """For every CPU row: torch's CPU capability, the bf16 / AMX flags, and the GEMMs the cpu
    backend's bfloat16 inputs take because of them (fusedformer.cpu_caps), so that rows from CPUs
    with and without bf16 instructions are never read as one machine's."""
    from fusedformer import cpu_caps
    caps = cpu_caps.capabilities()
    flags = ", ".join(f"{f} {'yes' if caps[f] else 'no'}" for f in ("avx512_bf16", "amx_bf16", "amx_tile"))
    paths = ", ".join(f"{op} {'bf16' if cpu_caps.bf16_gemm_path(op)[0] else 'float32'}" for op in cpu_caps.GEMM_OPS)
    return f"{caps['isa']}, {flags}; cpu bf16 GEMMs: {paths}"


def _git_sha() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        # Results appended by earlier runs do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


def environment(device: torch.device, heap_kept: bool = False) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_model()} ({torch.get_num_threads()} threads{', heap kept' if heap_kept else ''}; {_cpu_flags()})"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": _git_sha(),
        "device": name,
        "device_kind": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
    }


# ------------------------------------------------------------------------------------------------
# Rows, CSV, console table
# ------------------------------------------------------------------------------------------------
FIELDS = ["date", "git_sha", "device", "device_kind", "torch", "triton", "cuda", "op", "sweep", "config",
          "dtype", "mode", "provider", "status", "median_ms", "p20_ms", "p80_ms", "throughput", "unit",
          "pct_of_ceiling", "ceiling", "peak_mem_mb", "baseline", "speedup", "check", "samples"]


def append_csv(path: Path, rows: Sequence[dict]) -> None:
    """Append rows; the header is written when the file is new, and must match when it is not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:
            raise RuntimeError(f"{path} has other columns than this version of the suite writes; "
                               "move it aside (or pass --results DIR)")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in FIELDS})


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def add_speedups(rows: list[dict], baseline: str) -> None:
    """speedup = baseline's median / the provider's median, within the same op, config, dtype and mode."""
    base = {}
    for r in rows:
        if r["provider"] == baseline and r.get("median_ms"):
            base[(r["op"], r["config"], r["dtype"], r["mode"])] = r["median_ms"]
    for r in rows:
        b = base.get((r["op"], r["config"], r["dtype"], r["mode"]))
        r["baseline"] = baseline
        if b and r.get("median_ms"):
            r["speedup"] = b / r["median_ms"]


def _fmt(v, digits=3) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def format_table(rows: Sequence[dict]) -> str:
    """One block per (op, sweep, dtype, mode): a line per config and provider."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["sweep"], r["dtype"], r["mode"]), []).append(r)
    for (op, sweep, dtype, mode), rs in groups.items():
        unit = next((r["unit"] for r in rs if r.get("unit")), "")
        base = next((r["baseline"] for r in rs if r.get("baseline")), "")
        out.append("")
        out.append(f"== {op} / {sweep} / {dtype} / {mode}   (speedup = {base} median / provider median)")
        head = ["config", "provider", "median ms", "p20-p80 ms", unit, "% ceil", "peak MB", "speedup"]
        lines = [head]
        # A provider not timed for the same reason on every config is listed once, under the block.
        statuses: dict[str, set] = {}
        for r in rs:
            statuses.setdefault(r["provider"], set()).add(r["status"])
        untimed = {p: next(iter(st)) for p, st in statuses.items() if len(st) == 1 and "ok" not in st}
        rs = [r for r in rs if r["provider"] not in untimed]
        notes: dict[str, str] = {}
        for r in rs:
            label = r.get("_label") or r["config"]
            if r["status"] != "ok":
                lines.append([label, r["provider"], r["status"]])
                continue
            failed = str(r.get("check", "")).startswith(FAILED_BASELINE)
            if failed:
                notes[r["provider"]] = r["check"]
            lines.append([label, r["provider"] + (" (!)" if failed else ""), _fmt(r.get("median_ms")),
                          f"{_fmt(r.get('p20_ms'))}-{_fmt(r.get('p80_ms'))}", _fmt(r.get("throughput")),
                          _fmt(r.get("pct_of_ceiling"), 2), _fmt(r.get("peak_mem_mb")),
                          (_fmt(r["speedup"]) + "x") if r.get("speedup") else ""])
        widths = [max(len(l[i]) for l in lines if len(l) > 3) for i in range(len(head))]
        for l in lines:
            if len(l) == 3:  # a provider that was not timed: its status runs to the end of the line
                out.append("  " + "  ".join([l[0].ljust(widths[0]), l[1].ljust(widths[1]), l[2]]))
            else:
                out.append("  " + "  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip())
        for p, st in untimed.items():
            out.append(f"  not timed, any config: {p}: {st}")
        for p, note in notes.items():
            out.append(f"  (!) {p} failed the check (last: {note[len(FAILED_BASELINE):]}); timed only as the baseline")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# The kernel-benchmark driver shared by attention, layer_norm and gelu_ffn
# ------------------------------------------------------------------------------------------------
@dataclass
class OpBench:
    """What a bench_<op>.py module hands the driver."""
    op: str
    unit: str                                        # "TFLOP/s" or "GB/s"
    cases: Callable[[str, torch.device], list[Case]]  # (size, device) -> cases
    providers: Callable[[torch.device], list[Provider]]
    make_inputs: Callable[[dict, torch.dtype, torch.device], tuple[dict, list[str]]]
    work: Callable[[dict, str, torch.dtype], float]   # FLOPs or bytes of one call of a mode
    check_params: Callable[[dict], dict] = lambda p: p
    modes: Sequence[str] = MODES


def _short_error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:160]


def status_of(exc: BaseException, provider: str) -> str:
    """The row status for a provider that raised ``exc``."""
    from fusedformer.backends import BackendError

    if isinstance(exc, BackendError):
        return f"unavailable: {backend_error_reason(exc, provider)}"
    if isinstance(exc, Unavailable):
        return f"unavailable: {exc}"
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    return f"error: {_short_error(exc)}"


def _record(r: dict, t: Timing, work: float, unit: str, ceilings: Ceilings, dtype: torch.dtype) -> None:
    r.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, samples=t.samples)
    if unit == "TFLOP/s":
        r["throughput"] = work / (t.median_ms * 1e-3) / 1e12
        ceiling = ceilings.matmul_tflops.get(dtype)
    else:
        r["throughput"] = work / (t.median_ms * 1e-3) / 1e9
        ceiling = ceilings.copy_gbps
    if ceiling:
        r["ceiling"] = ceiling
        r["pct_of_ceiling"] = 100.0 * r["throughput"] / ceiling


def run_op(bench: OpBench, *, size: str, device: torch.device, dtypes: Sequence[torch.dtype],
           wanted: Optional[Sequence[str]], budget: TimingBudget, ceilings: Ceilings, env: dict,
           modes: Optional[Sequence[str]] = None, skipped: Optional[dict] = None,
           baseline: Optional[str] = None, log: Callable[[str], None] = print) -> list[dict]:
    """Check, then time, every provider on every case, dtype and mode. Returns result rows.

    ``skipped`` maps providers left out on purpose to the reason the table gives. A provider that
    fails the check is not timed — except the ``baseline``: every speedup is measured against it, so
    it is timed all the same and its row says, in the check column, that it failed and how."""
    rows: list[dict] = []
    modes = [m for m in (modes or bench.modes) if m in bench.modes]
    memory_mode = "fwd+bwd" if "fwd+bwd" in modes else modes[-1]
    providers = select_providers(bench.providers(device), wanted)
    reference = next(p for p in bench.providers(device) if p.name == "reference")
    checked: dict[tuple, tuple[Optional[str], str]] = {}
    for case in bench.cases(size, device):
        for dtype in dtypes:
            dname = DTYPE_NAMES[dtype]
            log(f"  {bench.op} {case.sweep}: {case.label} {dname}")
            row0 = dict(env, op=bench.op, sweep=case.sweep, config=case.config(), dtype=dname, unit=bench.unit,
                        _x=case.x, _series=case.series, _xname=case.xname, _label=case.label)
            status: dict[str, str] = {}
            check_text: dict[str, str] = {}
            ready: list[Provider] = []
            for p in providers:
                if skipped and p.name in skipped:
                    status[p.name] = f"skipped: {skipped[p.name]}"
                    continue
                why = p.unavailable(device, dtype, case.params)
                if why:
                    status[p.name] = f"unavailable: {why}"
                    continue
                cparams = bench.check_params(case.params)
                key = (p.name, dname, tuple(sorted(cparams.items())))
                if p.name == "reference":
                    checked[key] = (None, "is the reference")
                if key not in checked:
                    try:
                        failure, text = check_provider(bench.op, p, reference, bench.make_inputs, cparams, dtype, device)
                        checked[key] = (None if failure is None else f"{CHECK_FAILED}{failure}", text)
                    except Exception as exc:
                        checked[key] = (status_of(exc, p.name), "")
                failure, text = checked[key]
                if failure and p.name == baseline and failure.startswith(CHECK_FAILED):
                    text = f"{FAILED_BASELINE}{failure[len(CHECK_FAILED):]}"
                elif failure:
                    status[p.name] = failure
                    continue
                check_text[p.name] = text + ("" if cparams == case.params or p.name == "reference" else " at a smaller shape")
                ready.append(p)
            for mode in modes:
                mode_rows = {p.name: dict(row0, mode=mode, provider=p.name, status=status.get(p.name, "ok"),
                                          check=check_text.get(p.name, "")) for p in providers}
                tensors, leaves = {}, []
                fns: dict[str, Callable] = {}
                try:
                    tensors, leaves = bench.make_inputs(case.params, dtype, device)
                except torch.OutOfMemoryError:
                    for p in ready:
                        mode_rows[p.name]["status"] = "out of memory (inputs)"
                    ready_now = []
                else:
                    ready_now = ready
                # A CPU times every provider together (interleaved); a GPU one at a time, so that only
                # one provider's retained graph and buffers occupy its memory.
                groups = [ready_now] if device.type == "cpu" else [[p] for p in ready_now]
                work = bench.work(case.params, mode, dtype)
                for group in groups:
                    for p in group:
                        try:
                            fns[p.name] = mode_runner(p, tensors, leaves, case.params, mode)
                        except Exception as exc:
                            mode_rows[p.name]["status"] = status_of(exc, p.name)
                    timings = time_providers(fns, device, budget) if fns else {}
                    for name, t in timings.items():
                        r = mode_rows[name]
                        if isinstance(t, BaseException):
                            r["status"] = status_of(t, name)
                            continue
                        _record(r, t, work, bench.unit, ceilings, dtype)
                        if device.type == "cpu" and mode != memory_mode:
                            continue  # on a CPU it costs a profiled call: measured in training's mode only
                        try:
                            r["peak_mem_mb"] = peak_memory_bytes(fns[name], device) / 2**20
                        except Exception as exc:  # a side measurement: note it, keep the timing
                            r["check"] = (r["check"] + f"; peak memory not measured ({_short_error(exc)})").strip("; ")
                    fns.clear()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.extend(mode_rows.values())
                del fns, tensors
                gc.collect()
    return rows


# ------------------------------------------------------------------------------------------------
# pytest-benchmark (bench/conftest.py parametrizes each bench_<op>.py's test over these items)
# ------------------------------------------------------------------------------------------------
@dataclass
class BenchItem:
    case: Case
    dtype: torch.dtype
    mode: str
    provider: str
    device: torch.device


def default_dtypes(op: str, device_type: str) -> list[torch.dtype]:
    """What runs when no --dtype is given: float32 on a CPU (bfloat16 too for layer_norm, whose
    CPU kernel is held to F.layer_norm in both); bfloat16 on a GPU (float32 too for layer_norm)."""
    if device_type == "cpu":
        return [torch.float32, torch.bfloat16] if op == "layer_norm" else [torch.float32]
    return [torch.bfloat16, torch.float32] if op == "layer_norm" else [torch.bfloat16]


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
