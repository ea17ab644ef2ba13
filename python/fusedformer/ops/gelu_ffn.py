"""``fusedformer.gelu_ffn``: the Transformer feed-forward block
``Linear → +bias → GELU (erf or tanh) → Linear → +bias → dropout`` as one op.

Weights use the ``nn.Linear`` layout: ``w1`` (F, C), ``w2`` (C2, F). Custom ops
``fusedformer::gelu_ffn_fwd`` / ``fusedformer::gelu_ffn_bwd`` carry every backend; the forward
saves the pre-activation (M, F) so the backward needs no third GEMM.
"""
from __future__ import annotations

import math

from typing import Optional

import torch
from torch import Tensor

from .. import backends, reference
from . import _autocast
from . import _common as common
from ..errors import InputError

OP = "gelu_ffn"
APPROXIMATIONS = ("none", "tanh")


def _load_native():
    # The C++ ops take the op-level arguments as they are, the seed tensor included.
    return common.native_op("gelu_ffn_fwd"), common.native_op("gelu_ffn_bwd")


def _load_triton():
    from ..kernels import gelu_ffn as kernels
    return kernels.gelu_ffn_fwd, kernels.gelu_ffn_bwd


# Each backend's limits are declared in ops/limits.py (GELU_FFN); reasons() come from them.
TABLE: dict[str, backends.Impl] = common.backend_table(
    OP, lambda: (reference.gelu_ffn_fwd, reference.gelu_ffn_bwd), _load_native, _load_triton, "gelu_ffn")


@torch.library.custom_op("fusedformer::gelu_ffn_fwd", mutates_args=())
def gelu_ffn_fwd(
    x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], approximate: str,
    dropout_p: float, seed: Optional[Tensor], offset: int, backend: str,
) -> tuple[Tensor, Tensor]:
    fwd, _ = common.fns(TABLE, backend, x, w1, w2)
    return fwd(x, w1, b1, w2, b2, approximate, dropout_p, seed, offset)


@gelu_ffn_fwd.register_fake
def _(x, w1, b1, w2, b2, approximate, dropout_p, seed, offset, backend):
    return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], w1.shape[0])


@torch.library.custom_op("fusedformer::gelu_ffn_bwd", mutates_args=())
def gelu_ffn_bwd(
    dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, pre: Tensor, approximate: str, dropout_p: float,
    seed: Optional[Tensor], offset: int, has_b1: bool, has_b2: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _, bwd = common.fns(TABLE, backend, dy, x, w1, w2)
    return bwd(dy, x, w1, w2, pre, approximate, dropout_p, seed, offset, has_b1, has_b2)


@gelu_ffn_bwd.register_fake
def _(dy, x, w1, w2, pre, approximate, dropout_p, seed, offset, has_b1, has_b2, backend):
    return (torch.empty_like(x), torch.empty_like(w1), x.new_empty(w1.shape[0] if has_b1 else 0),
            torch.empty_like(w2), x.new_empty(w2.shape[0] if has_b2 else 0))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, approximate, dropout_p, seed, offset, backend = inputs
    _, pre = output
    ctx.save_for_backward(x, w1, w2, pre, seed)
    ctx.approximate, ctx.dropout_p, ctx.offset, ctx.backend = approximate, dropout_p, offset, backend
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dpre):
    x, w1, w2, pre, seed = ctx.saved_tensors
    if dy is None:
        return (None,) * 10
    dx, dw1, db1, dw2, db2 = OPS.backward(ctx, dy.contiguous(), x, w1, w2, pre, ctx.approximate,
                                          ctx.dropout_p, seed, ctx.offset, ctx.has_b1, ctx.has_b2, ctx.backend)
    return (dx, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None,
            None, None, None, None, None)


OPS = common.FusedOp(OP, TABLE, gelu_ffn_fwd, gelu_ffn_bwd, _setup_context, _backward)


def _weight(w: Tensor, backend: str) -> Tensor:
    """A weight as ``backend`` takes it. The cpu backend's GEMMs are torch's, which read a weight in
    either dense layout at the same cost, so the transpose of a contiguous matrix (HF's ``Conv1D``
    weight, (in, out), seen as (out, in)) is passed as it is: copying it to the (out, in) layout
    would cost more than the GELU (its gradient comes back in the same layout). The other
    backends' kernels read the row-major (out, in) layout."""
    if backend == "cpu" and w.dim() == 2 and not w.is_contiguous() and w.t().is_contiguous():
        return w
    return w.contiguous()


def gelu_ffn(
    input: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    approximate: str = "none",
    dropout_p: float = 0.0,
    *,
    seed: common.SeedLike = None,
    offset: int = 0,
    backend: Optional[str] = None,
) -> Tensor:
    """``dropout(gelu(input @ w1.T + b1, approximate) @ w2.T + b2, dropout_p)`` over the last dim.

    ``input`` (..., C); ``w1`` (F, C); ``b1`` (F,) or None; ``w2`` (C2, F); ``b2`` (C2,) or None;
    ``approximate`` is ``'none'`` (exact erf, BERT) or ``'tanh'`` (GPT-2's ``gelu_new``).
    Dropout (element (m, c) of the output viewed as (M, C2)) follows ``fusedformer.rng``.
    Returns (..., C2) in ``input``'s dtype. Under ``torch.autocast`` the inputs are cast as
    ``F.linear``'s are (``ops/_autocast.py``).
    """
    op = "gelu_ffn"
    input, w1, b1, w2, b2 = _autocast.lower_precision(_autocast.LINEAR, input, w1, b1, w2, b2)
    x = common.check_tensor(op, "input", input, min_ndim=1)
    common.check_tensor(op, "w1", w1, ndim=2)
    common.check_tensor(op, "w2", w2, ndim=2)
    common.check_like(op, "w1", w1, x, "input")
    common.check_like(op, "w2", w2, x, "input")
    C, F = x.shape[-1], w1.shape[0]
    if w1.shape[1] != C:
        raise InputError(f"{op}: w1 has shape {tuple(w1.shape)}; expected (F, {C}) to match input's last dim {C}")
    if w2.shape[1] != F:
        raise InputError(f"{op}: w2 has shape {tuple(w2.shape)}; expected (C2, {F}) to match w1's {F} outputs")
    common.check_like(op, "b1", b1, x, "input", shape=(F,))
    common.check_like(op, "b2", b2, x, "input", shape=(w2.shape[0],))
    if approximate not in APPROXIMATIONS:
        raise InputError(f"{op}: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    dropout_p = common.check_probability(op, "dropout_p", dropout_p)
    offset = common.check_offset(op, offset)
    seed_t = common.make_seed(op, seed, dropout_p)

    x2 = x.reshape(math.prod(x.shape[:-1]), C).contiguous()
    inputs = {"device": x.device, "dtype": x.dtype, "M": x2.shape[0], "C": C, "F": F, "C2": w2.shape[0]}
    name = backends.resolve(OP, TABLE, backend, inputs, x.device)
    if common.any_empty(x2, w1, w2):
        name = "reference"  # nothing to compute: torch's empty (or zero-sum) results and gradients
    y, _ = OPS(x2, _weight(w1, name), b1, _weight(w2, name), b2, approximate, dropout_p, seed_t, offset, name)
    return y.reshape(*x.shape[:-1], w2.shape[0])
