"""``fusedformer.attention``: exact attention with the arguments and masking semantics of
``torch.nn.functional.scaled_dot_product_attention``, plus key padding, a dropout seed and the
log-sum-exp on request.

Custom ops ``fusedformer::attention_fwd`` / ``fusedformer::attention_bwd`` carry every backend
(fake implementations for ``torch.compile``; one autograd formula for all backends).

Mask conventions (each as in the torch API it comes from):
* ``attn_mask`` (SDPA): bool, True = *may attend*; or additive float, broadcastable to (B, H, Sq, Sk).
* ``key_padding_mask`` (``nn.MultiheadAttention``): bool (B, Sk), True = *padding, ignored*.
* ``is_causal`` (SDPA): query i attends keys j <= i (top-left aligned); may be combined with masks.
A query row whose every key is masked gets output 0 and log-sum-exp -inf (and no gradient).
Masks are constants: they receive no gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends, reference
from . import _common as C

OP = "attention"


def _load_native():
    fwd_op, bwd_op = C.native_op("attention_fwd"), C.native_op("attention_bwd")

    def fwd(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, offset):
        return fwd_op(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, C.seed_int(seed), offset)

    def bwd(dout, q, k, v, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, offset):
        return bwd_op(dout, q, k, v, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
                      C.seed_int(seed), offset)

    return fwd, bwd


def _load_triton():
    from ..kernels import attention as kernels
    return kernels.attention_fwd, kernels.attention_bwd



def _cuda_limits(i: dict) -> list[str]:
    """What the CUDA kernels (csrc/attention/attention_cuda.cuh) do not take."""
    why = []
    if i.get("dtype") == torch.float32:
        why.append("dtype torch.float32: the cuda kernels take float16 / bfloat16 (tensor cores)")
    for key, name in (("head_dim", "head dim"), ("head_dim_v", "value head dim")):
        d = i.get(key, 8)
        if d > 256:
            why.append(f"{name} {d} > 256")
        elif d % 8:
            why.append(f"{name} {d} is not a multiple of 8 (16-byte copies)")
    return why


TABLE: dict[str, backends.Impl] = {
    "reference": backends.Impl(lambda: (reference.attention_fwd, reference.attention_bwd),
                               C.reference_reasons),
    "cpu": backends.Impl(_load_native, C.native_reasons(OP, "cpu")),
    "cuda": backends.Impl(_load_native, C.native_reasons(OP, "cuda", extra=_cuda_limits)),
}
if C.triton_kernels_installed("attention"):
    TABLE["triton"] = backends.Impl(_load_triton, C.triton_reasons(OP, extra=lambda i: [
        f"{name} {i[key]} > 256" for key, name in (("head_dim", "head dim"), ("head_dim_v", "value head dim"))
        if i.get(key, 0) > 256]))


@torch.library.custom_op("fusedformer::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
    dropout_p: float, is_causal: bool, scale: float, seed: Optional[Tensor], offset: int, backend: str,
) -> tuple[Tensor, Tensor]:
    fwd, _ = TABLE[backend].fns()
    return fwd(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, offset)


@attention_fwd.register_fake
def _(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, offset, backend):
    B, H, Sq, _ = q.shape
    out = q.new_empty(B, H, Sq, v.shape[-1])
    return out, q.new_empty(B, H, Sq, dtype=C.stat_dtype(q.dtype))


@torch.library.custom_op("fusedformer::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor], dropout_p: float, is_causal: bool, scale: float,
    seed: Optional[Tensor], offset: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _, bwd = TABLE[backend].fns()
    return bwd(dout, q, k, v, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, offset)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, offset, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, offset, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_padding_mask, seed)
    ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.offset, ctx.backend = dropout_p, is_causal, scale, offset, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, attn_mask, key_padding_mask, seed = ctx.saved_tensors
    if dout is None:  # only the log-sum-exp was used; it carries no gradient here
        return (None,) * 11
    dq, dk, dv = OPS.backward(ctx, dout.contiguous(), q, k, v, out, lse, attn_mask, key_padding_mask,
                              ctx.dropout_p, ctx.is_causal, ctx.scale, seed, ctx.offset, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None


OPS = C.FusedOp(OP, TABLE, attention_fwd, attention_bwd, _setup_context, _backward)


def _check_qkv(op: str, query, key, value, enable_gqa: bool):
    q = C.check_tensor(op, "query", query, ndim=4)
    k = C.check_tensor(op, "key", key, ndim=4)
    v = C.check_tensor(op, "value", value, ndim=4)
    for name, t in (("key", k), ("value", v)):
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but query is on {q.device}; expected the same device")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected {q.dtype} (the dtype of query)")
    B, H, Sq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{op}: query, key and value must share the batch size (dim 0); got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"{op}: key's head dim {k.shape[3]} must equal query's head dim {D} (layout B, H, S, D)")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"{op}: key {tuple(k.shape)} and value {tuple(v.shape)} must agree in heads and "
                         "sequence length (layout B, H, S, D)")
    Hk = k.shape[1]
    if Hk != H:
        if not enable_gqa:
            raise ValueError(f"{op}: query has {H} heads but key/value have {Hk}; pass enable_gqa=True for "
                             "grouped-query attention")
        if H % Hk:
            raise ValueError(f"{op}: query heads ({H}) must be a multiple of key/value heads ({Hk}) for GQA")
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have a contiguous last (head) dimension; got strides "
                             f"{tuple(t.stride())} — call .contiguous() first")
    return q, k, v


def _normalize_masks(op: str, q: Tensor, k: Tensor, attn_mask, key_padding_mask):
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"{op}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.device != q.device:
            raise ValueError(f"{op}: attn_mask is on {attn_mask.device} but query is on {q.device}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise TypeError(f"{op}: attn_mask must be bool or have query's dtype {q.dtype}; got {attn_mask.dtype}")
        try:
            shape = torch.broadcast_shapes(attn_mask.shape, (B, H, Sq, Sk))
        except RuntimeError:
            shape = None
        if shape != (B, H, Sq, Sk):
            raise ValueError(f"{op}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(B, H, Sq, Sk) = {(B, H, Sq, Sk)}")
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                ~attn_mask, float("-inf"))
        attn_mask = attn_mask.expand(B, H, Sq, Sk)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(f"{op}: key_padding_mask must be a torch.Tensor or None, got "
                            f"{type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{op}: key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Sk):
            raise ValueError(f"{op}: key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected (B, Sk) = {(B, Sk)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"{op}: key_padding_mask is on {key_padding_mask.device} but query is on {q.device}")
        key_padding_mask = key_padding_mask.contiguous()
    return attn_mask, key_padding_mask


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    key_padding_mask: Optional[Tensor] = None,
    seed: C.SeedLike = None,
    offset: int = 0,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on (B, H, S, D) tensors.

    Extras: ``key_padding_mask`` (B, Sk) bool, True = padding; ``seed``/``offset`` of the dropout
    RNG (``fusedformer.rng``; dropout element (b, h, q, k)); ``return_lse=True`` also returns the
    natural-log log-sum-exp of the scaled, masked scores (B, H, Sq), float32.
    Inputs may be strided views (for example a (B, S, H, D) tensor transposed to (B, H, S, D)) as
    long as the head dimension is contiguous.
    """
    op = "attention"
    q, k, v = _check_qkv(op, query, key, value, enable_gqa)
    attn_mask, key_padding_mask = _normalize_masks(op, q, k, attn_mask, key_padding_mask)
    if not isinstance(is_causal, bool):
        raise TypeError(f"{op}: is_causal must be a bool, got {type(is_causal).__name__}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else C.check_finite(op, "scale", scale)
    dropout_p = C.check_probability(op, "dropout_p", dropout_p)
    offset = C.check_offset(op, offset)
    seed_t = C.make_seed(op, seed, dropout_p)
    inputs = {"device": q.device, "dtype": q.dtype, "head_dim": q.shape[-1], "head_dim_v": v.shape[-1],
              "seqlen_q": q.shape[2], "seqlen_k": k.shape[2], "has_attn_mask": attn_mask is not None,
              "has_key_padding_mask": key_padding_mask is not None, "dropout_p": dropout_p}
    name = backends.resolve(OP, TABLE, backend, inputs, q.device)
    out, lse = OPS(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed_t, offset, name)
    return (out, lse) if return_lse else out
