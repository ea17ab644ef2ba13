"""``fusedformer.attention_varlen``: exact attention over variable-length sequences packed without
padding (FlashAttention's ``varlen`` convention).

    q (Tq, H, D), k (Tk, Hk, D), v (Tk, Hk, Dv): the sequences one after another;
    sequence i owns q[cu_seqlens_q[i] : cu_seqlens_q[i+1]] and k, v[cu_seqlens_k[i] : cu_seqlens_k[i+1]].

Each sequence is attended independently, exactly as batch element 0 of a (1, H, Sq_i, Sk_i)
``fusedformer.attention`` call:
* ``is_causal`` is top-left aligned within each sequence (query j sees keys 0..j, like SDPA and
  ``fusedformer.attention``; FlashAttention aligns bottom-right when Sq_i != Sk_i);
* dropout element (i, h, q, k) has index ``base_i + (h * Sq_i + q) * Sk_i + k`` with
  ``base_i = sum_{j<i} H * Sq_j * Sk_j`` (``fusedformer.rng`` documents the mapping);
* GQA / MQA: H must be a multiple of Hk; query head h reads key/value head h // (H / Hk).
The log-sum-exp, when returned, is (H, Tq) float32.

Custom ops ``fusedformer::attention_varlen_fwd`` / ``_bwd`` carry every backend (fake
implementations for ``torch.compile``; one autograd formula). Backends: ``reference`` and ``triton``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends, reference
from . import _common as common
from ..errors import InputError, InputTypeError

OP = "attention_varlen"


def _load_triton():
    from ..kernels import attention as kernels
    return kernels.attention_varlen_fwd, kernels.attention_varlen_bwd


# The Triton backend's limits are declared in ops/limits.py (ATTENTION_VARLEN); reasons() come
# from them. No native implementation.
TABLE: dict[str, backends.Impl] = common.backend_table(
    OP, lambda: (reference.attention_varlen_fwd, reference.attention_varlen_bwd), None, _load_triton, "attention")


@torch.library.custom_op("fusedformer::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, dropout_p: float, is_causal: bool, scale: float, seed: Optional[Tensor], offset: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    fwd, _ = TABLE[backend].fns()
    return fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale,
               seed, offset)


@attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale, seed,
      offset, backend):
    T, H, _ = q.shape
    return q.new_empty(T, H, v.shape[-1]), q.new_empty(H, T, dtype=common.stat_dtype(q.dtype))


@torch.library.custom_op("fusedformer::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, is_causal: bool, scale: float,
    seed: Optional[Tensor], offset: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _, bwd = TABLE[backend].fns()
    return bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
               is_causal, scale, seed, offset)


@attention_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal,
      scale, seed, offset, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale, seed, offset,
     backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed)
    ctx.max_seqlen_q, ctx.max_seqlen_k = max_seqlen_q, max_seqlen_k
    ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.offset, ctx.backend = dropout_p, is_causal, scale, offset, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed = ctx.saved_tensors
    if dout is None:  # only the log-sum-exp was used; it carries no gradient here
        return (None,) * 13
    dq, dk, dv = OPS.backward(ctx, dout.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                              ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.dropout_p, ctx.is_causal, ctx.scale,
                              seed, ctx.offset, ctx.backend)
    return (dq, dk, dv) + (None,) * 10


OPS = common.FusedOp(OP, TABLE, attention_varlen_fwd, attention_varlen_bwd, _setup_context, _backward)


def _check_cu_seqlens(op: str, name: str, cu, total: int, device: torch.device, max_name: str, max_len) -> int:
    if not isinstance(cu, Tensor):
        raise InputTypeError(f"{op}: {name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise InputTypeError(f"{op}: {name} must be an int32 tensor, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise InputError(f"{op}: {name} must be 1-D with at least 2 entries (nseq + 1), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise InputError(f"{op}: {name} is on {cu.device} but query is on {device}; expected the same device")
    if isinstance(max_len, bool) or not isinstance(max_len, int):
        raise InputTypeError(f"{op}: {max_name} must be an int, got {type(max_len).__name__}")
    if max_len < 0:
        raise InputError(f"{op}: {max_name} must be >= 0, got {max_len}")
    # Contents are validated where that costs no device synchronization (CPU tensors, eager mode).
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        lens = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or bool((lens < 0).any()) or int(cu[-1]) > total:
            raise InputError(f"{op}: {name} must start at 0, never decrease and end at most at the token "
                             f"count {total}; got {cu.tolist()}")
        if int(lens.max()) > max_len:
            raise InputError(f"{op}: {max_name} = {max_len} is shorter than the longest sequence "
                             f"({int(lens.max())}) in {name}")
    return max_len


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    *,
    seed: common.SeedLike = None,
    offset: int = 0,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """Attention over packed variable-length sequences (see the module docstring).

    Args:
        q: (Tq, H, D) packed queries; k: (Tk, Hk, D); v: (Tk, Hk, Dv). The last dim must be
            contiguous (strided views such as slices of a packed qkv tensor are fine).
        cu_seqlens_q, cu_seqlens_k: (nseq + 1,) int32 cumulative sequence lengths on q's device.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence (the kernels size their grids
            by them; checked against cu_seqlens only for CPU tensors in eager mode, where that
            costs no device synchronization).
        dropout_p, is_causal, scale, seed, offset, backend: as in ``fusedformer.attention``.
        return_lse: also return the natural-log log-sum-exp, (H, Tq) float32.

    Returns ``out`` (Tq, H, Dv) in q's dtype, or ``(out, lse)``.
    """
    op = "attention_varlen"
    q = common.check_tensor(op, "q", q, ndim=3, nonempty=True)
    k = common.check_tensor(op, "k", k, ndim=3, nonempty=True)
    v = common.check_tensor(op, "v", v, ndim=3, nonempty=True)
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise InputError(f"{op}: {name} is on {t.device} but q is on {q.device}; expected the same device")
        if t.dtype != q.dtype:
            raise InputTypeError(f"{op}: {name} has dtype {t.dtype}; expected {q.dtype} (the dtype of q)")
    Tq, H, D = q.shape
    Tk, Hk = k.shape[0], k.shape[1]
    if k.shape[2] != D:
        raise InputError(f"{op}: k's head dim {k.shape[2]} must equal q's head dim {D} (layout T, H, D)")
    if v.shape[0] != Tk or v.shape[1] != Hk:
        raise InputError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must agree in tokens and heads "
                         "(layout T, H, D)")
    if H % Hk:
        raise InputError(f"{op}: query heads ({H}) must be a multiple of key/value heads ({Hk})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise InputError(f"{op}: {name} must have a contiguous last (head) dimension; got strides "
                             f"{tuple(t.stride())} — call .contiguous() first")
    max_seqlen_q = _check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, Tq, q.device, "max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, Tk, q.device, "max_seqlen_k", max_seqlen_k)
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise InputError(f"{op}: cu_seqlens_q has {cu_seqlens_q.shape[0]} entries but cu_seqlens_k has "
                         f"{cu_seqlens_k.shape[0]}; expected the same number of sequences")
    if not isinstance(is_causal, bool):
        raise InputTypeError(f"{op}: is_causal must be a bool, got {type(is_causal).__name__}")
    scale = 1.0 / math.sqrt(D) if scale is None else common.check_finite(op, "scale", scale)
    dropout_p = common.check_probability(op, "dropout_p", dropout_p)
    offset = common.check_offset(op, offset)
    seed_t = common.make_seed(op, seed, dropout_p)
    inputs = {"device": q.device, "dtype": q.dtype, "head_dim": D, "head_dim_v": v.shape[-1],
              "seqlen_q": max_seqlen_q, "seqlen_k": max_seqlen_k, "dropout_p": dropout_p}
    name = backends.resolve(OP, TABLE, backend, inputs, q.device)
    out, lse = OPS(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                    is_causal, scale, seed_t, offset, name)
    return (out, lse) if return_lse else out
