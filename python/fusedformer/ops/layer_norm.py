"""``fusedformer.layer_norm`` / ``fusedformer.rms_norm``: LayerNorm and RMSNorm fused with an
optional dropout on the input and residual add.

    h = dropout(x) + residual;   y = norm(h) * weight + bias

Two ``torch.library`` custom ops carry every backend — ``fusedformer::layer_norm_fwd`` and
``fusedformer::layer_norm_bwd`` — with fake implementations, so ``torch.compile`` traces through
them without graph breaks; one autograd formula (``register_autograd``) serves all backends, and the
backward runs on the backend the forward ran on.
"""
from __future__ import annotations

import math

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import backends, reference
from . import _autocast
from . import _common as common
from ..errors import InputError, InputTypeError

OP = "layer_norm"


# ------------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------------
def _load_native():
    # The C++ ops take the op-level arguments as they are, the seed tensor included.
    return common.native_op("layer_norm_fwd"), common.native_op("layer_norm_bwd")


def _load_triton():
    from ..kernels import layer_norm as kernels
    return kernels.layer_norm_fwd, kernels.layer_norm_bwd


# Each backend's limits are declared in ops/limits.py (LAYER_NORM); reasons() come from them.
TABLE: dict[str, backends.Impl] = common.backend_table(
    OP, lambda: (reference.layer_norm_fwd, reference.layer_norm_bwd), _load_native, _load_triton, "layer_norm")


# ------------------------------------------------------------------------------------------------
# custom ops
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("fusedformer::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    eps: float, dropout_p: float, seed: Optional[Tensor], offset: int, rms: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fwd, _ = common.fns(TABLE, backend, x)
    return fwd(x, residual, weight, bias, eps, dropout_p, seed, offset, rms)


@layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, dropout_p, seed, offset, rms, backend):
    M = x.shape[0]
    stat = common.stat_dtype(x.dtype)
    has_h = residual is not None or dropout_p > 0.0
    return (torch.empty_like(x), torch.empty_like(x) if has_h else x.new_empty(0),
            x.new_empty(0 if rms else M, dtype=stat), x.new_empty(M, dtype=stat))


@torch.library.custom_op("fusedformer::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
    dropout_p: float, seed: Optional[Tensor], offset: int, rms: bool, has_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _, bwd = common.fns(TABLE, backend, dy, h)
    return bwd(dy, dh, h, weight, mean, rstd, dropout_p, seed, offset, rms, has_bias)


@layer_norm_bwd.register_fake
def _(dy, dh, h, weight, mean, rstd, dropout_p, seed, offset, rms, has_bias, backend):
    N = h.shape[1]
    wdtype = weight.dtype if weight is not None else h.dtype
    return (torch.empty_like(h), torch.empty_like(h) if dropout_p > 0.0 else h.new_empty(0),
            torch.empty_like(weight) if weight is not None else h.new_empty(0),
            h.new_empty(N, dtype=wdtype) if has_bias else h.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, seed, offset, rms, backend = inputs
    _, h, mean, rstd = output
    ctx.has_h = residual is not None or dropout_p > 0.0
    ctx.save_for_backward(h if ctx.has_h else x, weight, mean, rstd, seed)
    ctx.dropout_p, ctx.offset, ctx.rms, ctx.backend = dropout_p, offset, rms, backend
    ctx.has_residual, ctx.has_bias = residual is not None, bias is not None
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd, seed = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    dsum, dx, dweight, dbias = OPS.backward(
        ctx, dy.contiguous(), dh.contiguous() if (ctx.has_h and dh is not None) else None, h, weight, mean,
        rstd, ctx.dropout_p, seed, ctx.offset, ctx.rms, ctx.has_bias, ctx.backend)
    return (dx if ctx.dropout_p > 0.0 else dsum,
            dsum if ctx.has_residual else None,
            dweight if weight is not None else None,
            dbias if ctx.has_bias else None,
            None, None, None, None, None, None)


OPS = common.FusedOp(OP, TABLE, layer_norm_fwd, layer_norm_bwd, _setup_context, _backward)


# ------------------------------------------------------------------------------------------------
# functional API
# ------------------------------------------------------------------------------------------------
def _flat(t: Optional[Tensor], shape: tuple) -> Optional[Tensor]:
    """``t`` reshaped to ``shape``, contiguous (the reshape only where needed: it costs microseconds)."""
    if t is None:
        return None
    if t.dim() != len(shape) or t.shape[-1] != shape[-1]:
        t = t.reshape(shape)
    return t.contiguous()


def _norm(op: str, input: Tensor, normalized_shape, weight, bias, eps, residual, dropout_p, seed,
          offset, return_residual, backend, rms):
    x = common.check_tensor(op, "input", input, min_ndim=1)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(int(s) for s in normalized_shape)
    k = len(normalized_shape)
    if k == 0 or k > x.dim() or tuple(x.shape[-k:]) != normalized_shape:
        raise InputError(f"{op}: normalized_shape {normalized_shape} must be a non-empty suffix of "
                         f"input's shape {tuple(x.shape)}")
    wdtypes = (x.dtype, torch.float32)
    common.check_like(op, "weight", weight, x, "input", shape=normalized_shape, dtypes=wdtypes)
    common.check_like(op, "bias", bias, x, "input", shape=normalized_shape, dtypes=wdtypes)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise InputTypeError(f"{op}: weight ({weight.dtype}) and bias ({bias.dtype}) must have the same dtype")
    common.check_like(op, "residual", residual, x, "input", shape=x.shape)
    eps = common.check_finite(op, "eps", eps, min_value=0.0)
    dropout_p = common.check_probability(op, "dropout_p", dropout_p)
    offset = common.check_offset(op, offset)
    seed_t = common.make_seed(op, seed, dropout_p)

    N = math.prod(normalized_shape)
    M = math.prod(x.shape[:-k])
    x2 = _flat(x, (M, N))
    r2 = _flat(residual, (M, N))
    w1, b1 = _flat(weight, (N,)), _flat(bias, (N,))
    inputs = {"device": x.device, "dtype": x.dtype, "M": x2.shape[0], "N": N,
              "weight_dtype": None if w1 is None else w1.dtype}
    name = backends.resolve(OP, TABLE, backend, inputs, x.device)
    if common.any_empty(x2):
        name = "reference"  # nothing to compute: torch's empty results and zero weight gradients
    y, h, _, _ = OPS(x2, r2, w1, b1, eps, dropout_p, seed_t, offset, rms, name)
    if y.shape != x.shape:
        y = y.reshape(x.shape)
    if not return_residual:
        return y
    prenorm = h.reshape(x.shape) if (residual is not None or dropout_p > 0.0) else x
    return y, prenorm


def layer_norm(
    input: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    seed: common.SeedLike = None,
    offset: int = 0,
    return_residual: bool = False,
    backend: Optional[str] = None,
):
    """LayerNorm over the trailing ``normalized_shape`` dims, like ``torch.nn.functional.layer_norm``,
    with an optional fused ``dropout(input) + residual`` in front.

    Args beyond ``F.layer_norm``:
        residual: tensor of ``input``'s shape added after dropout (post-LN: the block's input).
        dropout_p: dropout probability on ``input`` (applied whenever > 0; pass 0 in eval mode).
        seed, offset: the dropout RNG's seed and counter offset (``fusedformer.rng``); ``seed=None``
            draws one from torch's default generator.
        return_residual: also return the pre-norm sum ``h`` (the residual stream of pre-LN models).
        backend: force a backend (see ``fusedformer.backends``).

    Returns ``y``, or ``(y, h)`` with ``return_residual=True``. ``weight``/``bias`` may be float32
    for float16/bfloat16 inputs; ``y`` has ``input``'s dtype. Under ``torch.autocast`` the inputs
    are cast as ``F.layer_norm``'s are (``ops/_autocast.py``: float32 on CUDA, untouched on the CPU).
    """
    input, weight, bias, residual = _autocast.float32(_autocast.LAYER_NORM, input, weight, bias, residual)
    return _norm("layer_norm", input, normalized_shape, weight, bias, eps, residual, dropout_p, seed,
                 offset, return_residual, backend, rms=False)


def rms_norm(
    input: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    residual: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    seed: common.SeedLike = None,
    offset: int = 0,
    return_residual: bool = False,
    backend: Optional[str] = None,
):
    """RMSNorm, like ``torch.nn.functional.rms_norm`` (``eps=None`` means ``finfo(dtype).eps``), with
    the same fused extras as :func:`layer_norm`."""
    input, weight, residual = _autocast.float32(_autocast.RMS_NORM, input, weight, residual)
    if eps is None and isinstance(input, Tensor) and input.is_floating_point():
        eps = torch.finfo(input.dtype).eps
    return _norm("rms_norm", input, normalized_shape, weight, None, eps, residual, dropout_p, seed,
                 offset, return_residual, backend, rms=True)
