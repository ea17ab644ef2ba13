"""Speed and memory accounting of a training run: which step's peak memory is measured, training
FLOPs, MFU against the matmul ceiling measured in the run.

* **Peak memory** is the package's one meter (``fusedformer.measure.PeakMemory``, the one the
  benchmarks use): the most bytes allocated through torch's allocator that one training step
  (forward, backward and optimizer step of every micro-batch) holds at once beyond those live when
  the step began — activations, gradients, optimizer temporaries; not the weights or the optimizer
  state carried over from the step before. Same quantity on CUDA (``max_memory_allocated``) and
  on the CPU (the profiler's allocation events). The CPU meter profiles the step, so it is taken
  on one designated step (:func:`memory_step`: the second of the run, the first in steady state),
  and that step's time is left out of the run's tokens/s and median step time (its log record
  carries ``peak_memory_mb``; its ``step_time`` includes the meter's cost).
* FLOPs per trained token (PaLM, Chowdhery et al. 2022, appendix B): ``6·N + 12·L·C·S`` with
  ``N`` the parameters used in matmuls, ``L`` layers, ``C`` width, ``S`` sequence length.
* **MFU** = achieved FLOP/s ÷ the matmul ceiling: the TFLOP/s of a large ``torch.mm`` in the
  training precision (bf16 / fp16 under autocast, else float32 with the current TF32 setting)
  measured on each process's device at the start of the run (``fusedformer.measure.matmul_ceiling``,
  the ceiling the benchmarks use), summed over the processes — or ``--peak-tflops`` per device,
  which wins and skips the measurement. Reported on the CPU too: it is the share of what torch's
  own matmul reaches on this machine, not of a datasheet peak.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from fusedformer.measure import MATMUL_CEILING_N, PeakMemory, matmul_ceiling

__all__ = ["PeakMemory", "PEAK_MEMORY_KIND", "memory_step", "train_flops_per_token", "mfu_ceiling",
           "measured_ceiling_tflops", "mfu"]

#: ``peak_memory_kind`` in the summary: what ``peak_memory_mb`` is (see the module docstring).
PEAK_MEMORY_KIND = "torch_allocated_step_peak"

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def memory_step(start_step: int, total_steps: int) -> int:
    """The 0-based index of the step whose peak memory is measured: the second step of this run
    (the first has the optimizer state to create and the allocator to warm), the first if it is
    the only one."""
    return start_step + 1 if total_steps - start_step >= 2 else start_step


def train_flops_per_token(matmul_params: int, layers: int, width: int, seq_len: int) -> float:
    return 6.0 * matmul_params + 12.0 * layers * width * seq_len


@functools.lru_cache(maxsize=None)
def _cached_ceiling(device: str, dtype: torch.dtype, fp32_precision: str, tf32: bool, threads: int) -> float:
    ceiling = matmul_ceiling(torch.device(device), dtype).tflops
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # hand the operands' blocks back before the model needs them
    return ceiling


def measured_ceiling_tflops(device: torch.device, precision: str) -> float:
    """The matmul ceiling in the training precision on ``device``, TFLOP/s. Measured once per
    process and setting (device, dtype, TF32 / float32 matmul precision, CPU threads): a run in the
    same process as an earlier one with the same settings reuses it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else False
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return _cached_ceiling(str(device), PRECISION_DTYPES[precision], torch.get_float32_matmul_precision(), tf32,
                           threads)


def mfu_ceiling(device: torch.device, precision: str, override: Optional[float]) -> tuple[float, str]:
    """MFU's denominator for one process, TFLOP/s, and where it comes from: ``override``
    (``--peak-tflops``) when given, else :func:`measured_ceiling_tflops`."""
    if override:
        return float(override), "--peak-tflops"
    n = MATMUL_CEILING_N[torch.device(device).type]
    return measured_ceiling_tflops(device, precision), f"measured: {str(PRECISION_DTYPES[precision])[6:]} matmul {n}x{n}x{n}"


def mfu(flops_per_token: float, tokens_per_s: float, ceiling_tflops: float) -> Optional[float]:
    """Achieved FLOP/s over the ceiling (``ceiling_tflops`` the sum over the processes whose tokens
    ``tokens_per_s`` counts); None without a ceiling or a rate."""
    if not ceiling_tflops or not tokens_per_s:
        return None
    return flops_per_token * tokens_per_s / (ceiling_tflops * 1e12)
