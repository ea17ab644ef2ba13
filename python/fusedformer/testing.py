"""The project's numerical acceptance rule and its one tolerance table, in the spirit of
``torch.testing``: used by the tests (tests/numerics.py), the benchmarks' check before timing
(bench/checks.py) and the GPU session's smoke run (scripts/gpu_smoke.py).

FlashAttention's rule (DESIGN.md, "Numerics and tests"). For an output or gradient ``out`` of a
backend, with ``ref64`` the reference computed in float64 and ``base`` the reference computed in the
run's dtype:

    max|out - ref64| <= 2 * max|base - ref64| + ATOL[op][dtype]

float32 must in addition meet the tight bound ``max|out - ref64| <= F32_ATOL + F32_RTOL[op] *
max|ref64|``. NaN never passes (in ``out``, or where ``ref64`` is finite); non-finite values must sit
exactly where the reference has them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

# Absolute slack on top of twice the reference's own error, per op and dtype. "train" is the
# end-to-end training loss of the benchmarks' step check.
ATOL = {
    "layer_norm": {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3},
    "attention": {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3},
    "gelu_ffn": {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3},
    "train": {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3},
}
# float32's tight bound: relative to the largest reference magnitude (matmul-heavy ops accumulate
# over long dot products, hence their looser factor).
F32_ATOL = 1e-5
F32_RTOL = {"layer_norm": 1e-5, "attention": 2e-5, "gelu_ffn": 5e-5, "train": 1e-4}


def check_2x(name: str, op: str, out: torch.Tensor, ref64: torch.Tensor, base: torch.Tensor,
             dtype: Optional[torch.dtype] = None) -> tuple[Optional[str], float, float]:
    """Apply the rule to one tensor. ``dtype`` is the precision of the run (default: ``base``'s); it
    picks the tolerances. Returns ``(failure message or None, error, bound)``."""
    dtype = dtype or base.dtype
    if tuple(out.shape) != tuple(ref64.shape):
        return f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}", math.inf, 0.0
    if out.dtype != base.dtype:
        return f"{name}: dtype {out.dtype} != {base.dtype}", math.inf, 0.0
    out64, base64 = out.detach().double().cpu(), base.detach().double().cpu()
    ref = ref64.detach().double().cpu()
    finite = torch.isfinite(ref)
    if torch.isnan(out64).any():
        return f"{name}: NaN in the output", math.inf, 0.0
    if not torch.equal(torch.isfinite(out64), finite):
        return f"{name}: non-finite values where the reference is finite (or vice versa)", math.inf, 0.0
    if not finite.any():
        return None, 0.0, 0.0
    err = (out64 - ref)[finite].abs().max().item()
    base_err = (base64 - ref)[finite].abs().max().item()
    bound = 2.0 * base_err + ATOL[op][dtype]
    if err > bound:
        return (f"{name} [{op}, {dtype}]: max|out - ref64| = {err:.3e} exceeds "
                f"2 * {base_err:.3e} + {ATOL[op][dtype]:.1e} = {bound:.3e}"), err, bound
    if dtype == torch.float32:
        tight = F32_ATOL + F32_RTOL[op] * ref[finite].abs().max().item()
        if err > tight:
            return f"{name} [{op}, float32]: error {err:.3e} exceeds the tight bound {tight:.3e}", err, tight
        bound = min(bound, tight)
    return None, err, bound


def assert_2x(name: str, op: str, out: torch.Tensor, ref64: torch.Tensor, base: torch.Tensor,
              dtype: Optional[torch.dtype] = None) -> None:
    """:func:`check_2x`, raising ``AssertionError`` with its message on failure."""
    failure, _, _ = check_2x(name, op, out, ref64, base, dtype)
    assert failure is None, failure


def gelu_ffn_inputs(generator: torch.Generator, lead, C: int, F: int, C2: Optional[int] = None, *,
                    x_scale: float = 1.0, biases: bool = True) -> dict:
    """float64 masters of a ``gelu_ffn`` call, drawn from ``generator`` in this order: ``x``
    (``(*lead, C)``, times ``x_scale``), ``w1`` ``(F, C) / sqrt(C)``, ``b1`` ``(F,)``, ``w2``
    ``(C2, F) / sqrt(F)``, ``b2`` ``(C2,)`` (``C2`` defaults to ``C``; no biases: ``None``, not
    drawn). The tests, the emulator's tests and the GPU session's smoke run build their inputs here."""
    C2 = C if C2 is None else C2
    f64 = torch.float64
    return {"x": torch.randn(*lead, C, generator=generator, dtype=f64) * x_scale,
            "w1": torch.randn(F, C, generator=generator, dtype=f64) / math.sqrt(C),
            "b1": torch.randn(F, generator=generator, dtype=f64) if biases else None,
            "w2": torch.randn(C2, F, generator=generator, dtype=f64) / math.sqrt(F),
            "b2": torch.randn(C2, generator=generator, dtype=f64) if biases else None}


def attention_inputs(generator: torch.Generator, B: int, H: int, Hk: int, Sq: int, Sk: int, D: int, Dv: int, *,
                     transposed: bool = False) -> dict:
    """float64 masters ``q`` ``(B, H, Sq, D)``, ``k`` ``(B, Hk, Sk, D)``, ``v`` ``(B, Hk, Sk, Dv)``,
    drawn from ``generator`` in that order; ``transposed``: each drawn as ``(B, S, heads, d)``
    storage and seen as ``(B, heads, S, d)`` (strided, head dim contiguous), as a projection's
    output reshaped into heads is."""
    def make(heads, S, d):
        if transposed:
            return torch.randn(B, S, heads, d, generator=generator, dtype=torch.float64).transpose(1, 2)
        return torch.randn(B, heads, S, d, generator=generator, dtype=torch.float64)
    return {"q": make(H, Sq, D), "k": make(Hk, Sk, D), "v": make(Hk, Sk, Dv)}
