"""A small sweep over every CUDA kernel of fusedformer._C, forward and backward, for
``compute-sanitizer`` (memcheck finds out-of-bounds and misaligned accesses, racecheck shared-memory
races). Shapes are small and awkward (ragged tiles, 1-row inputs, masks, GQA, dropout) so that every
bounds check and every masked path runs; the sanitizer, not this script, judges the result.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_sweep.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitize_sweep.py --quick

Ops whose cuda backend is not available here are reported and skipped (exit status 0 only when at
least one op ran).
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

import fusedformer as ff
from fusedformer.ops import attention as attention_op
from fusedformer.ops import gelu_ffn as gelu_ffn_op
from fusedformer.ops import layer_norm as layer_norm_op


def _available(op_module) -> str | None:
    why = ff.backends.why_unavailable(op_module, "cuda", "cuda")
    return "; ".join(why) if why else None


def _backward(out, *inputs) -> None:
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    torch.autograd.grad(out, leaves, torch.randn_like(out), retain_graph=True)


def sweep_attention(quick: bool) -> int:
    runs = 0
    dtypes = (torch.bfloat16,) if quick else (torch.float16, torch.bfloat16)
    shapes = [(1, 2, 2, 1, 1, 64), (2, 4, 2, 77, 130, 64), (1, 2, 1, 130, 17, 128), (1, 2, 2, 65, 65, 40)]
    if not quick:
        shapes += [(1, 1, 1, 33, 200, 256), (2, 2, 2, 128, 128, 96)]
    for dtype, (B, H, Hk, Sq, Sk, D), causal, extras in itertools.product(
            dtypes, shapes, (False, True), ("none", "padding+dropout", "mask")):
        q = torch.randn(B, H, Sq, D, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(B, Hk, Sk, D, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(B, Hk, Sk, D, device="cuda", dtype=dtype, requires_grad=True)
        kwargs = {}
        if extras == "padding+dropout":
            pad = torch.zeros(B, Sk, dtype=torch.bool, device="cuda")
            pad[-1, Sk // 2:] = True
            kwargs.update(key_padding_mask=pad, dropout_p=0.25, seed=7)
        elif extras == "mask":
            kwargs.update(attn_mask=torch.randn(1, H, Sq, Sk, device="cuda", dtype=dtype))
        out = ff.attention(q, k, v, is_causal=causal, enable_gqa=Hk != H, backend="cuda", **kwargs)
        _backward(out, q, k, v)
        if extras == "none":  # the deterministic backward (a dQ kernel instead of atomics) as well
            torch.use_deterministic_algorithms(True)
            try:
                _backward(out, q, k, v)
            finally:
                torch.use_deterministic_algorithms(False)
        runs += 1
    return runs


def sweep_gelu_ffn(quick: bool) -> int:
    runs = 0
    dtypes = (torch.bfloat16,) if quick else (torch.float16, torch.bfloat16)
    shapes = [(1, 8, 16, 8), (70, 40, 136, 24), (130, 64, 256, 64)]
    if not quick:
        shapes += [(257, 384, 1536, 384)]
    for dtype, (M, C, F, C2), approximate, dropout in itertools.product(
            dtypes, shapes, ("none", "tanh"), (0.0, 0.2)):
        x = torch.randn(M, C, device="cuda", dtype=dtype, requires_grad=True)
        w1 = (torch.randn(F, C, device="cuda", dtype=dtype) * C ** -0.5).requires_grad_()
        b1 = torch.randn(F, device="cuda", dtype=dtype, requires_grad=True)
        w2 = (torch.randn(C2, F, device="cuda", dtype=dtype) * F ** -0.5).requires_grad_()
        b2 = torch.randn(C2, device="cuda", dtype=dtype, requires_grad=True)
        y = ff.gelu_ffn(x, w1, b1, w2, b2, approximate, dropout, seed=3, backend="cuda")
        _backward(y, x, w1, b1, w2, b2)
        runs += 1
    return runs


def sweep_layer_norm(quick: bool) -> int:
    runs = 0
    dtypes = (torch.bfloat16,) if quick else (torch.float32, torch.float16, torch.bfloat16)
    widths = (1, 7, 768, 1500) if quick else (1, 7, 768, 1023, 1500, 4096, 20000)
    for dtype, N, residual in itertools.product(dtypes, widths, (False, True)):
        x = torch.randn(5, N, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(N, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(N, device="cuda", dtype=dtype, requires_grad=True)
        r = torch.randn(5, N, device="cuda", dtype=dtype, requires_grad=True) if residual else None
        y = ff.layer_norm(x, N, w, b, residual=r, dropout_p=0.1 if residual else 0.0, seed=5, backend="cuda")
        _backward(y, x, w, b, r)
        runs += 1
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and dtypes (racecheck is slow)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sanitize_sweep: no CUDA GPU is visible to torch", file=sys.stderr)
        return 1
    total = 0
    for name, module, sweep in (("attention", attention_op, sweep_attention),
                                ("gelu_ffn", gelu_ffn_op, sweep_gelu_ffn),
                                ("layer_norm", layer_norm_op, sweep_layer_norm)):
        why = _available(module)
        if why:
            print(f"{name}: skipped, the cuda backend is unavailable: {why}")
            continue
        n = sweep(args.quick)
        torch.cuda.synchronize()
        print(f"{name}: {n} forward + backward calls")
        total += n
    return 0 if total else 1


if __name__ == "__main__":
    sys.exit(main())
