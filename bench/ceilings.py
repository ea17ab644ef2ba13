"""Ceilings measured on the machine at hand, in the same run: a large device copy (GB/s) and a
large matmul per dtype (TFLOP/s). Every throughput's percentage of the ceiling comes from these
measurements (they are written to ``ceilings.csv`` beside the rows); no datasheet figure is used.

The matmul ceiling is the package's (``fusedformer.measure.matmul_ceiling``: its size, operands
and FLOP count), the one the training driver's MFU divides by too; here it is timed with the
suite's own loop (:func:`timing.time_providers`, the fast end p20)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from fusedformer.measure import MATMUL_CEILING_N, matmul_ceiling

from .suite import DTYPE_NAMES
from .timing import Timing, TimingBudget, time_providers

@dataclass
class Ceilings:
    copy_gbps: float                                   # a large device-to-device copy, read + write
    matmul_tflops: dict = field(default_factory=dict)  # dtype -> a large square matmul
    notes: str = ""


def _p20_seconds(fn, device: torch.device, budget: TimingBudget) -> float:
    """The fast end of ``fn``'s time through the suite's timing loop; raises what ``fn`` raised."""
    t = time_providers({"fn": fn}, device, budget)["fn"]
    if isinstance(t, BaseException):
        raise t
    return t.p20_ms * 1e-3


def measure_ceilings(device: torch.device, dtypes: Sequence[torch.dtype], budget: TimingBudget) -> Ceilings:
    # The ceiling is the best a kernel can do: take the fast end of the distribution (p20).
    copy_bytes = 2**30 if device.type == "cuda" else 256 * 2**20  # CPU: past the last-level cache
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_s = _p20_seconds(lambda: dst.copy_(src), device, budget)
    del src, dst
    n = MATMUL_CEILING_N[device.type]
    ceil = Ceilings(copy_gbps=2 * copy_bytes / copy_s / 1e9, notes=f"copy {copy_bytes >> 20} MiB; matmul {n}x{n}x{n}")
    for dt in dtypes:
        mm = matmul_ceiling(device, dt, n=n, timer=lambda fn: _p20_seconds(fn, device, budget))
        ceil.matmul_tflops[dt] = mm.tflops
    return ceil


def ceiling_rows(env: dict, ceilings: Ceilings) -> list[dict]:
    """The ceilings as result rows (ceilings.csv), so every run's percentages can be traced."""
    rows = [dict(env, op="ceiling", sweep="copy", config=ceilings.notes, dtype="float32", mode="-",
                 provider="copy", status="ok", throughput=ceilings.copy_gbps, unit="GB/s")]
    for dt, tf in ceilings.matmul_tflops.items():
        rows.append(dict(env, op="ceiling", sweep="matmul", config=ceilings.notes, dtype=DTYPE_NAMES[dt],
                         mode="-", provider="mm", status="ok", throughput=tf, unit="TFLOP/s"))
    return rows


def record_timing(r: dict, t: Timing, work: float, unit: str, ceilings: Ceilings, dtype: torch.dtype) -> None:
    """Timing columns, throughput (``work`` FLOPs or bytes per call) and its share of the measured ceiling."""
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
