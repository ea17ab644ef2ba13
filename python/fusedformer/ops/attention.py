"""``fusedformer.attention``: exact attention with the arguments and masking semantics of
``torch.nn.functional.scaled_dot_product_attention``, plus key padding, a dropout seed and the
log-sum-exp on request.

Custom ops ``fusedformer::attention_fwd`` / ``fusedformer::attention_bwd`` carry every backend
(fake implementations for ``torch.compile``; one autograd formula for all backends).

Shapes as SDPA takes them: (*batch, H, S, D) with batch dims that broadcast, or (N, S, E) / (S, E)
without heads; key / value with one head broadcast over the query heads (``enable_gqa`` for other
divisors). Empty inputs give torch's empty or zero-sum results.

Mask conventions (each as in the torch API it comes from):
* ``attn_mask`` (SDPA): bool, True = *may attend*; or additive, in query's dtype or float32,
  broadcastable to (*batch, H, Sq, Sk); or a ``torch.nn.attention.bias.CausalBias``.
* ``key_padding_mask`` (``nn.MultiheadAttention``): bool (*batch, Sk), True = *padding, ignored*.
* ``is_causal`` (SDPA): query i attends keys j <= i (top-left aligned); may be combined with masks.
A query row whose every key is masked by -inf (bool masks, padding, causal) gets output 0 and
log-sum-exp -inf (and no gradient), as torch's math path gives for bool masks. Finite additive
values at or below -2^17 (``finfo.min`` masks) are *masking values* (``reference.py``): a row
whose every key has one attends uniformly, as torch's math path does.
Masks are constants: they receive no gradient (a mask that requires grad is refused).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from .. import _compat, backends, reference
from . import _autocast
from . import _common as common
from ..errors import InputError, InputTypeError

OP = "attention"


def _load_native():
    # The C++ ops take the op-level arguments as they are, the seed tensor included.
    return common.native_op("attention_fwd"), common.native_op("attention_bwd")


def _load_triton():
    from ..kernels import attention as kernels
    return kernels.attention_fwd, kernels.attention_bwd


# Each backend's limits are declared in ops/limits.py (ATTENTION); reasons() come from them.
TABLE: dict[str, backends.Impl] = common.backend_table(
    OP, lambda: (reference.attention_fwd, reference.attention_bwd), _load_native, _load_triton, "attention")


def cuda_shared_memory_reasons(inputs: dict) -> list[str]:
    """The one limit that depends on the GPU: a CTA's shared memory (``_C``'s
    ``attention_cuda_smem_bytes``, declared once in csrc/attention/attention_cuda_config.h) against
    the device's opt-in limit per block. sm_86 / sm_89 allow 99 KiB: there the head-dim-256
    backward and the deterministic head-dim-128 / 256 backward do not fit. The backward counts when
    the call will need gradients (the backward runs on the backend the forward picked)."""
    device = inputs["device"]
    if inputs.get("probe") or device.type != "cuda" or not torch.cuda.is_available():
        return []
    index = device.index if device.index is not None else torch.cuda.current_device()
    return list(_shared_memory_reasons(index, int(inputs["head_dim"]), int(inputs["head_dim_v"]),
                                       bool(inputs.get("needs_grad")), torch.are_deterministic_algorithms_enabled()))


@backends._constant  # under torch.compile: called at trace time, its result a constant (not traced)
@functools.lru_cache(maxsize=None)
def _shared_memory_reasons(device_index: int, D: int, Dv: int, needs_grad: bool,
                           deterministic: bool) -> tuple[str, ...]:
    limit = torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin
    why = []
    for backward in (False, True) if needs_grad else (False,):
        need = torch.ops.fusedformer_C.attention_cuda_smem_bytes(D, Dv, backward, deterministic)
        if need > limit:
            what = ("deterministic backward" if deterministic else "backward") if backward else "forward"
            why.append(f"head dims ({D}, {Dv}): the cuda {what} needs {need} bytes of shared memory per block; "
                       f"this GPU allows {limit}")
    return tuple(why)


if "cuda" in TABLE:
    _declared_cuda_reasons = TABLE["cuda"].reasons
    TABLE["cuda"].reasons = lambda inputs: _declared_cuda_reasons(inputs) or cuda_shared_memory_reasons(inputs)


@torch.library.custom_op("fusedformer::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
    dropout_p: float, is_causal: bool, scale: float, seed: Optional[Tensor], offset: int, backend: str,
) -> tuple[Tensor, Tensor]:
    fwd, _ = common.fns(TABLE, backend, q, k, v)
    return fwd(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, offset)


@attention_fwd.register_fake
def _(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, offset, backend):
    B, H, Sq, _ = q.shape
    out = q.new_empty(B, H, Sq, v.shape[-1])
    return out, q.new_empty(B, H, Sq, dtype=common.stat_dtype(q.dtype))


@torch.library.custom_op("fusedformer::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor], dropout_p: float, is_causal: bool, scale: float,
    seed: Optional[Tensor], offset: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _, bwd = common.fns(TABLE, backend, q, k, v)
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


OPS = common.FusedOp(OP, TABLE, attention_fwd, attention_bwd, _setup_context, _backward)


def _check_qkv(op: str, query, key, value, enable_gqa: bool):
    """query (*batch, H, Sq, D), key (*batch, Hk, Sk, D), value (*batch, Hk, Sk, Dv) — or 3-D
    (N, S, E) / 2-D (S, E) without a heads dim, as SDPA takes them. Batch dims broadcast; a key /
    value head count of 1 broadcasts over the query heads (SDPA's broadcasting, computed as GQA
    with one group), others must equal H or, with ``enable_gqa``, divide it.

    Returns ``(q, k, v, batch, heads)``: 4-D (B, H, S, D) views (expanded where batch broadcasts),
    the broadcast batch shape and whether the inputs had a heads dim, to shape the result back."""
    q = common.check_tensor(op, "query", query, min_ndim=2)
    k = common.check_tensor(op, "key", key, min_ndim=2)
    v = common.check_tensor(op, "value", value, min_ndim=2)
    for name, t in (("key", k), ("value", v)):
        if t.device != q.device:
            raise InputError(f"{op}: {name} is on {t.device} but query is on {q.device}; expected the same device")
        if t.dtype != q.dtype:
            raise InputTypeError(f"{op}: {name} has dtype {t.dtype}; expected {q.dtype} (the dtype of query)")
    if not (q.dim() == k.dim() == v.dim()):
        raise InputError(f"{op}: query, key and value must have the same number of dimensions; got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    heads = q.dim() >= 4
    if not heads:  # (N, S, E) or (S, E): one head
        q, k, v = (t.reshape(*t.shape[:-2], 1, *t.shape[-2:]) for t in (q, k, v))
        if q.dim() == 3:
            q, k, v = q[None], k[None], v[None]
    shapes = f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
    if k.shape[-1] != q.shape[-1]:
        raise InputError(f"{op}: key's head dim {k.shape[-1]} must equal query's head dim {q.shape[-1]} "
                         f"(layout ..., S, D); got shapes {shapes}")
    if k.shape[-2] != v.shape[-2] or k.shape[-3] != v.shape[-3]:
        raise InputError(f"{op}: key and value must agree in heads and sequence length (layout ..., H, S, D); "
                         f"got shapes {shapes}")
    try:
        batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError:
        raise InputError(f"{op}: the batch dims of query, key and value do not broadcast; got shapes {shapes}") from None
    H, Hk = q.shape[-3], k.shape[-3]
    if Hk != H and Hk != 1:
        if not enable_gqa:
            raise InputError(f"{op}: query has {H} heads but key/value have {Hk}; pass enable_gqa=True for "
                             "grouped-query attention")
        if H % Hk:
            raise InputError(f"{op}: query heads ({H}) must be a multiple of key/value heads ({Hk}) for GQA")

    def to_4d(t: Tensor) -> Tensor:
        if len(batch) == 1 and tuple(t.shape[:-3]) == tuple(batch):
            return t  # the common case: no copy, no new view
        t = t.expand(*batch, *t.shape[-3:])
        return t.reshape(-1, *t.shape[-3:])

    q, k, v = to_4d(q), to_4d(k), to_4d(v)
    if query.dim() == 2:
        batch = torch.Size()  # (S, E): no batch dims in the result either
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.stride(-1) != 1 and t.numel() > 0:
            raise InputError(f"{op}: {name} must have a contiguous last (head) dimension; got strides "
                             f"{tuple(t.stride())} — call .contiguous() first")
    return q, k, v, tuple(batch), heads


def _causal_bias(op: str, attn_mask, is_causal, q: Tensor, k: Tensor):
    """A CausalBias mask (``torch.nn.attention.bias.causal_upper_left / causal_lower_right``) as
    what SDPA makes of it: ``is_causal`` for the upper-left variant (and for lower-right when
    Sq == Sk), a bool mask for lower-right otherwise."""
    info = _compat.causal_bias(attn_mask)
    if info is None:
        return attn_mask, is_causal
    lower_right, sq, sk = info
    if (sq, sk) != (q.shape[-2], k.shape[-2]):
        raise InputError(f"{op}: the CausalBias attn_mask is for (Sq, Sk) = {(sq, sk)} but query and key "
                         f"have Sq = {q.shape[-2]}, Sk = {k.shape[-2]}")
    if is_causal:
        raise InputError(f"{op}: attn_mask is a CausalBias, which already makes the attention causal; "
                         "pass is_causal=False")
    if not lower_right or sq == sk:
        return None, True
    return _compat.lower_right_causal_mask(sq, sk, q.device), False


def _normalize_masks(op: str, q: Tensor, k: Tensor, attn_mask, key_padding_mask, batch: tuple, heads: bool):
    """attn_mask broadcastable to (*batch, H, Sq, Sk) ((*batch, Sq, Sk) without a heads dim): bool,
    or additive in query's dtype or float32 (as SDPA takes them) -> additive (B, H, Sq, Sk), a view
    where it broadcasts. key_padding_mask (*batch, Sk) bool -> (B, Sk)."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise InputTypeError(f"{op}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.device != q.device:
            raise InputError(f"{op}: attn_mask is on {attn_mask.device} but query is on {q.device}")
        if attn_mask.dtype not in (torch.bool, q.dtype, torch.float32):
            raise InputTypeError(f"{op}: attn_mask must be bool, float32 or query's dtype {q.dtype}; "
                                 f"got {attn_mask.dtype}")
        if attn_mask.requires_grad and torch.is_grad_enabled():
            raise InputError(f"{op}: attn_mask requires grad, but fusedformer computes no gradient for masks "
                             "(they are constants); pass attn_mask.detach() if it is one, or use "
                             "torch.nn.functional.scaled_dot_product_attention for a learned bias")
        full = (*batch, H, Sq, Sk) if heads else (*batch, Sq, Sk)
        try:
            shape = torch.broadcast_shapes(attn_mask.shape, full)
        except RuntimeError:
            shape = None
        if shape != full:
            raise InputError(f"{op}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"{'(*batch, H, Sq, Sk)' if heads else '(*batch, Sq, Sk)'} = {full}")
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                ~attn_mask, float("-inf"))
        attn_mask = attn_mask.expand(full)
        if not heads:
            attn_mask = attn_mask.unsqueeze(-3)
        if attn_mask.dim() != 4:
            attn_mask = attn_mask.reshape(B, H, Sq, Sk)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise InputTypeError(f"{op}: key_padding_mask must be a torch.Tensor or None, got "
                                 f"{type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise InputTypeError(f"{op}: key_padding_mask must be a bool tensor (True = padding), got "
                                 f"{key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (*batch, Sk):
            raise InputError(f"{op}: key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected "
                             f"(*batch, Sk) = {(*batch, Sk)}")
        if key_padding_mask.device != q.device:
            raise InputError(f"{op}: key_padding_mask is on {key_padding_mask.device} but query is on {q.device}")
        key_padding_mask = key_padding_mask.reshape(B, Sk).contiguous()
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
    seed: common.SeedLike = None,
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
    attn_mask, is_causal = _causal_bias(op, attn_mask, is_causal, query, key)
    # under torch.autocast: cast as SDPA's inputs are (ops/_autocast.py)
    query, key, value, attn_mask = _autocast.lower_precision(_autocast.SDPA, query, key, value, attn_mask)
    q, k, v, batch, heads = _check_qkv(op, query, key, value, enable_gqa)
    attn_mask, key_padding_mask = _normalize_masks(op, q, k, attn_mask, key_padding_mask, batch, heads)
    if not isinstance(is_causal, bool):
        raise InputTypeError(f"{op}: is_causal must be a bool, got {type(is_causal).__name__}")
    D = q.shape[-1]
    scale = (1.0 / math.sqrt(D) if D else 1.0) if scale is None else common.check_finite(op, "scale", scale)
    dropout_p = common.check_probability(op, "dropout_p", dropout_p)
    offset = common.check_offset(op, offset)
    seed_t = common.make_seed(op, seed, dropout_p)
    inputs = {"device": q.device, "dtype": q.dtype, "head_dim": D, "head_dim_v": v.shape[-1],
              "seqlen_q": q.shape[2], "seqlen_k": k.shape[2], "has_attn_mask": attn_mask is not None,
              "has_key_padding_mask": key_padding_mask is not None, "dropout_p": dropout_p,
              "needs_grad": torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)}
    name = backends.resolve(OP, TABLE, backend, inputs, q.device)
    if common.any_empty(q, k, v):
        name = "reference"  # nothing to compute: torch's empty / zero-sum results and gradients
    out, lse = OPS(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed_t, offset, name)
    if not heads or len(batch) != 1:  # back to the inputs' leading dims
        out = out.reshape(*batch, *(out.shape[1:] if heads else out.shape[2:]))
        lse = lse.reshape(*batch, *(lse.shape[1:] if heads else lse.shape[2:]))
    return (out, lse) if return_lse else out
