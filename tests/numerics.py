"""Test helpers around the project's acceptance rule, which lives in ``fusedformer.testing`` (one
rule and one tolerance table for the tests, the benchmarks and the GPU session):

    max|out - ref64| <= 2 * max|base - ref64| + ATOL[op][dtype]

plus float32's tight bound; NaN never passes.
"""
from __future__ import annotations

import torch

from fusedformer.testing import ATOL, F32_ATOL, F32_RTOL, assert_2x  # noqa: F401  (the one rule)


def assert_all_2x(op: str, names, outs, refs64, bases, dtype=None) -> None:
    assert len(outs) == len(refs64), f"{len(outs)} results but {len(refs64)} reference results"
    for name, o, r, b in zip(names, outs, refs64, bases):
        if r is None:
            assert o is None, f"{name}: expected no gradient"
            continue
        assert o is not None, f"{name}: missing gradient"
        assert_2x(name, op, o, r, b, dtype)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor with NaN so an element a kernel forgot to write shows up."""
    return t.fill_(float("nan"))


def check_against_reference(op: str, fn, inputs: dict, backend: str, dtype: torch.dtype, device,
                            grad_names=(), f32_names=(), upstream_seed: int = 1234) -> None:
    """Run ``fn(tensors, backend)`` on ``backend`` in ``dtype`` and on the reference in ``dtype`` and
    float64; assert the 2x rule on every output and on the gradients of ``grad_names``.

    ``inputs`` maps names to float64 master tensors (bool/integer tensors and non-tensors pass
    through unchanged); names in ``f32_names`` stay float32 in the low-precision runs (say, a
    float32 LayerNorm weight beside bfloat16 activations). ``fn`` returns a tensor or a tuple.
    """
    def materialize(run_dtype, run_device, is_ref64):
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                dt = torch.float64 if is_ref64 else (torch.float32 if k in f32_names else run_dtype)
                t = v.detach().to(device=run_device, dtype=dt)
                if not v.is_contiguous():  # keep the layout: rebuild the same strided view
                    t = torch.empty_strided(v.shape, v.stride(), dtype=dt, device=run_device).copy_(t)
                out[k] = t.requires_grad_(k in grad_names)
            elif isinstance(v, torch.Tensor):
                out[k] = v.to(run_device)
            else:
                out[k] = v
        return out

    def run(run_backend, run_dtype, run_device, is_ref64):
        tensors = materialize(run_dtype, run_device, is_ref64)
        outs = fn(tensors, run_backend)
        outs = outs if isinstance(outs, tuple) else (outs,)
        gen = torch.Generator().manual_seed(upstream_seed)
        loss = 0
        for o in outs:
            if o.requires_grad:
                g = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=run_device, dtype=o.dtype)
                loss = loss + (o * g).sum()
        grads = []
        if grad_names:
            leaves = [tensors[n] for n in grad_names]
            grads = list(torch.autograd.grad(loss, leaves, allow_unused=True))
        return list(outs), grads

    ref_device = torch.device("cpu")
    outs, grads = run(backend, dtype, device, False)
    base_outs, base_grads = run("reference", dtype, ref_device, False)
    ref_outs, ref_grads = run("reference", torch.float64, ref_device, True)
    names = [f"out[{i}]" for i in range(len(outs))] + [f"grad {n}" for n in grad_names]
    assert_all_2x(op, names, outs + grads, ref_outs + ref_grads, base_outs + base_grads, dtype)
