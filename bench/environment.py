"""The environment every result row records: date, git sha, device (for a CPU its model, threads,
heap setting and bf16 capabilities), torch / Triton / CUDA versions."""
from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import torch

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
