"""What the CPU can do, and which GEMMs the ``cpu`` backend's bfloat16 inputs take because of it.

A bfloat16 GEMM is fast only on CPUs with bf16 dot-product instructions (``avx512_bf16``,
``amx_bf16``: Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later); elsewhere torch
emulates it and float32 is faster. The native library decides once per process which path each op
takes (``csrc/common/cpu_gemm.h``; docs/cpu_kernels.md, "Low precision"):

* ``gelu_ffn``: bfloat16 GEMMs (torch's matmul, oneDNN) where the CPU reports the instructions and
  torch's oneDNN is enabled, else float32 GEMMs on float32 copies;
* ``attention``: bfloat16 tile GEMMs (MKL's ``gemm_bf16bf16f32``) where the CPU reports the
  instructions *and* a short measurement at the tile shape, made once, finds MKL's bf16 GEMM at
  least 1.25x its sgemm; else float32 tile GEMMs;
* ``layer_norm`` has no GEMM (bfloat16 rows are converted row by row); float16 always takes the
  float32 path.

Override, for tests and experiments: ``FUSEDFORMER_CPU_BF16_GEMM=auto|on|off`` (read at the first
bfloat16 call) or :func:`set_bf16_gemm` / :func:`bf16_gemm` (which win over the variable). ``on``
runs the bf16 path even without the instructions (emulated, slowly): that is how the tests check it
on any machine. ``python -m fusedformer info`` prints the path of each op and why.
"""
from __future__ import annotations

import contextlib
import functools
import platform
from typing import Iterator

import torch

from . import _compat

ENV = "FUSEDFORMER_CPU_BF16_GEMM"
MODES = ("auto", "on", "off")
GEMM_OPS = ("gelu_ffn", "attention")
# The flags that matter for low-precision GEMMs, as torch's cpuinfo names them.
FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "amx_fp16")


@functools.lru_cache(maxsize=1)
def capabilities() -> dict:
    """The CPU's model name, torch's CPU capability (the ATen kernels' ISA) and the low-precision
    flags of :data:`FLAGS` (False where torch does not report them)."""
    reported = _compat.cpu_capability_map()  # {} on an older torch without the map
    caps = {"model": cpu_model() or str(reported.get("cpu_name") or platform.processor() or platform.machine()),
            "isa": torch.backends.cpu.get_cpu_capability()}
    for flag in FLAGS:
        caps[flag] = bool(reported.get(flag, False))
    return caps


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def describe() -> str:
    """One line for benchmark rows and reports: the model and its bf16 / AMX flags."""
    caps = capabilities()
    flags = ", ".join(f"{f} {'yes' if caps[f] else 'no'}" for f in ("avx512_bf16", "amx_bf16", "amx_tile"))
    return f"{caps['model']} [{caps['isa']}; {flags}]"


def _native():
    """torch.ops.fusedformer_C, or None with the reason the library is missing."""
    from . import backends
    why = backends.native_reason("cpu", "gelu_ffn")
    if why:
        return None, why
    return torch.ops.fusedformer_C, None


def bf16_gemm_path(op: str) -> tuple[bool, str]:
    """``(True, why)`` if ``op``'s bfloat16 inputs take bf16 GEMMs on the cpu backend in this process,
    ``(False, why)`` if float32 ones. The automatic choice is made once (for attention, with a short
    measurement on CPUs that have the instructions); an override changes the answer at once."""
    if op not in GEMM_OPS:
        raise ValueError(f"bf16_gemm_path: op must be one of {GEMM_OPS}, got {op!r}")
    native, why = _native()
    if native is None:
        return False, f"no cpu backend: {why}"
    enabled, reason = native.cpu_bf16_gemm_path(op)
    return bool(enabled), str(reason)


def bf16_gemm_mode() -> str:
    """The override in effect: ``auto``, ``on`` or ``off``."""
    native, why = _native()
    if native is None:
        raise RuntimeError(f"fusedformer.cpu_caps: {why}")
    return str(native.cpu_bf16_gemm_mode(""))


def set_bf16_gemm(mode: str) -> str:
    """Set the override (``auto``, ``on`` or ``off``) for this process; returns the previous mode."""
    if mode not in MODES:
        raise ValueError(f"set_bf16_gemm: mode must be one of {MODES}, got {mode!r}")
    native, why = _native()
    if native is None:
        raise RuntimeError(f"fusedformer.cpu_caps: {why}")
    return str(native.cpu_bf16_gemm_mode(mode))


@contextlib.contextmanager
def bf16_gemm(mode: str) -> Iterator[None]:
    """``with bf16_gemm("on"): ...`` runs the block with the override set, then restores it."""
    previous = set_bf16_gemm(mode)
    try:
        yield
    finally:
        set_bf16_gemm(previous)


def paths() -> dict[str, str]:
    """For ``fusedformer info``: how each op's low-precision inputs are computed on the cpu backend."""
    out = {}
    for op in GEMM_OPS:
        enabled, why = bf16_gemm_path(op)
        out[op] = f"bfloat16: {why}; float16: float32 GEMMs on float32 copies"
    out["layer_norm"] = "no GEMM: bfloat16 / float16 rows are read or converted row by row, statistics in float32"
    return out
