"""Speed and memory accounting: peak memory per run, training FLOPs, MFU on GPUs.

* Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset at the start of training); on
  the CPU the process's peak resident set (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` so several runs in one process each get their own peak; where that
  is impossible, the process-lifetime peak from ``getrusage``). The CPU figure includes the
  Python/torch runtime itself (a few hundred MB), identical for every backend.
* FLOPs per trained token (PaLM, Chowdhery et al. 2022, appendix B): ``6·N + 12·L·C·S`` with
  ``N`` the parameters used in matmuls, ``L`` layers, ``C`` width, ``S`` sequence length.
* MFU = achieved FLOP/s / the GPU's dense bf16/fp16 peak (a small table of datasheet figures, or
  ``--peak-tflops``). Only reported on a GPU under bf16/fp16 autocast or with ``--peak-tflops``.
"""
from __future__ import annotations

import resource
from typing import Optional

import torch

#: Dense (no sparsity) bf16/fp16 tensor-core peaks from NVIDIA datasheets, TFLOP/s. Matched in
#: order against the device name, so more specific names come first.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
    ("V100", 125.0), ("T4", 65.0),
)


class PeakMemory:
    """Peak memory of the code run between :meth:`reset` and :meth:`peak_mb`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"
        self._hwm_resettable = False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self._hwm_resettable = _vm_hwm_kb() is not None
        except OSError:
            self._hwm_resettable = False

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._hwm_resettable:
            kb = _vm_hwm_kb()
            if kb is not None:
                return kb / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _vm_hwm_kb() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def train_flops_per_token(matmul_params: int, layers: int, width: int, seq_len: int) -> float:
    return 6.0 * matmul_params + 12.0 * layers * width * seq_len


def gpu_peak_tflops(device: torch.device, precision: str, override: Optional[float]) -> Optional[float]:
    """The dense peak used as MFU's denominator, or None when MFU is not reported."""
    if device.type != "cuda":
        return None
    if override:
        return override
    if precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS:
        if key in name:
            return tflops
    return None
