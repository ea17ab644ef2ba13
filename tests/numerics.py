"""The project's numerical acceptance rule, in one place (FlashAttention's rule, DESIGN.md).

For an output or gradient ``out`` of a backend, with ``ref64`` the reference computed in float64
and ``base`` the reference computed in the test dtype:

    max|out - ref64| <= 2 * max|base - ref64| + ATOL[op][dtype]

float32 must in addition meet the tight bound ``max|out - ref64| <= F32_ATOL + F32_RTOL * max|ref64|``.
NaN never passes (in ``out``, or where ``ref64`` is finite).
"""
from __future__ import annotations

import torch

from fusedformer.tolerances import ATOL, F32_ATOL, F32_RTOL  # noqa: F401  (the one table)


def assert_2x(name: str, op: str, out: torch.Tensor, ref64: torch.Tensor, base: torch.Tensor,
              dtype: torch.dtype = None) -> None:
    """Assert the 2x rule for one tensor (``name`` is used in the failure message). ``dtype`` is the
    precision the test runs in (default: ``base``'s dtype); it picks the tolerances."""
    dtype = dtype or base.dtype
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert out.dtype == base.dtype, f"{name}: dtype {out.dtype} != {base.dtype}"
    out64, base64 = out.detach().double().cpu(), base.detach().double().cpu()
    ref = ref64.detach().double().cpu()
    finite = torch.isfinite(ref)
    assert not torch.isnan(out64).any(), f"{name}: NaN in output"
    assert torch.equal(torch.isfinite(out64), finite), f"{name}: non-finite values where the reference is finite (or vice versa)"
    if not finite.any():
        return
    err = (out64 - ref)[finite].abs().max().item()
    base_err = (base64 - ref)[finite].abs().max().item()
    bound = 2.0 * base_err + ATOL[op][dtype]
    assert err <= bound, (f"{name} [{op}, {dtype}]: max|out - ref64| = {err:.3e} exceeds "
                          f"2 * {base_err:.3e} + {ATOL[op][dtype]:.1e} = {bound:.3e}")
    if dtype == torch.float32:
        scale = ref[finite].abs().max().item()
        tight = F32_ATOL + F32_RTOL[op] * scale
        assert err <= tight, f"{name} [{op}, float32]: error {err:.3e} exceeds the tight bound {tight:.3e}"


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
