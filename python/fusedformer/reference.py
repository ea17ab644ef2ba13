"""Every op in plain PyTorch: forward and hand-written backward. The ground truth.

Each op is a pair following the project's contract (DESIGN.md, "one op, one contract"):

    <op>_fwd(inputs...)        -> (out, *saved)
    <op>_bwd(grad_out, *saved) -> grads

with exactly the arguments of the matching ``torch.ops.fusedformer.<op>_fwd/_bwd`` custom ops, so
every backend is interchangeable. Saved statistics (mean, rstd, log-sum-exp) are float32 for
float16 / bfloat16 / float32 inputs (float64 for float64 inputs, which only this backend takes).
Tensors that an op has no use for (say ``mean`` for RMSNorm) are returned as empty tensors: custom
ops return tensors only.

Shape letters: B batch, H query heads, Hk key/value heads, Sq / Sk query / key length, D head dim,
Dv value head dim, M rows, N normalized width, C model width, F feed-forward width.

Dropout uses the project's counter-based RNG (``fusedformer.rng``): the same ``seed`` and
``offset`` give the same mask here and in every fused kernel.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import rng


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _multiplier(shape, p: float, seed: Optional[Tensor], offset: int, device, dtype) -> Tensor:
    return rng.dropout_multiplier(shape, p, rng.seed_int(seed), offset, device=device, dtype=dtype)


def _row_mean(h: Tensor) -> Tensor:
    """The mean of each row, refined once: ``m0 + mean(h - m0)``. A plain float32 mean of a
    constant row is not exactly that constant (the sum rounds), and with BERT's eps = 1e-12 the
    tiny variance that leaves behind is normalised up to O(1); the refinement makes a constant row's
    mean exact and halves the error of rows far from zero."""
    m0 = h.mean(-1)
    return m0 + (h - m0[:, None]).mean(-1)


# ---------------------------------------------------------------------------------------------
# layer_norm
#
#   h = dropout(x) + residual          (each term optional; the pre-norm sum, kept for pre-LN)
#   LayerNorm: y = (h - mean(h)) * rstd * w + b,   rstd = 1 / sqrt(var(h) + eps)   (biased var)
#   RMSNorm:   y = h * rstd * w,                   rstd = 1 / sqrt(mean(h^2) + eps)
#
# Backward with xhat = (h - mean) * rstd (RMSNorm: h * rstd), g = dy * w:
#   dh  = rstd * (g - xhat * mean(g * xhat) - mean(g))      (RMSNorm drops the last term)
#       + dh_out                                            (gradient of the returned pre-norm sum)
#   dw  = sum_rows(dy * xhat),   db = sum_rows(dy)
#   dresidual = dh,   dx = dh * dropout_multiplier
# ---------------------------------------------------------------------------------------------
def layer_norm_fwd(
    x: Tensor,                    # (M, N) input rows
    residual: Optional[Tensor],   # (M, N) added after dropout, or None
    weight: Optional[Tensor],     # (N,) scale, or None
    bias: Optional[Tensor],       # (N,) shift, or None (always None for RMSNorm)
    eps: float,
    dropout_p: float,             # dropout on x, applied before the residual add
    seed: Optional[Tensor],       # (1,) int64 dropout seed
    offset: int,                  # dropout counter offset
    rms: bool,                    # RMSNorm instead of LayerNorm
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y (M, N), h (M, N) or empty, mean (M,) or empty, rstd (M,))``.

    ``h`` (the pre-norm sum, in x's dtype) is returned only when it differs from ``x``, that is
    with a residual or dropout; the backward then reads it instead of ``x``."""
    stat = _stat_dtype(x.dtype)
    h = x
    if dropout_p > 0.0:
        h = (x.to(stat) * _multiplier(x.shape, dropout_p, seed, offset, x.device, stat)).to(x.dtype)
    if residual is not None:
        h = (h.to(stat) + residual.to(stat)).to(x.dtype)
    hf = h.to(stat)
    if rms:
        mean = hf.new_empty(0)
        rstd = torch.rsqrt(hf.square().mean(-1) + eps)
        xhat = hf * rstd[:, None]
    else:
        mean = _row_mean(hf)
        rstd = torch.rsqrt((hf - mean[:, None]).square().mean(-1) + eps)
        xhat = (hf - mean[:, None]) * rstd[:, None]
    y = xhat
    if weight is not None:
        y = y * weight.to(stat)
    if bias is not None:
        y = y + bias.to(stat)
    h_out = h if (h is not x) else x.new_empty(0)
    return y.to(x.dtype), h_out, mean, rstd


def layer_norm_bwd(
    dy: Tensor,                   # (M, N) gradient of y
    dh_out: Optional[Tensor],     # (M, N) gradient of the returned pre-norm sum, or None
    h: Tensor,                    # (M, N) the pre-norm sum (x itself when there was none)
    weight: Optional[Tensor],     # (N,)
    mean: Tensor,                 # (M,) float32, empty for RMSNorm
    rstd: Tensor,                 # (M,) float32
    dropout_p: float,
    seed: Optional[Tensor],
    offset: int,
    rms: bool,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dh (M, N), dx (M, N) or empty, dweight (N,) or empty, dbias (N,) or empty)``.

    ``dh`` is the gradient of the pre-norm sum (= the residual's gradient); ``dx`` is returned
    only with dropout (otherwise it equals ``dh``)."""
    stat = mean.dtype if mean.numel() else rstd.dtype
    hf, dyf = h.to(stat), dy.to(stat)
    xhat = (hf * rstd[:, None]) if rms else ((hf - mean[:, None]) * rstd[:, None])
    g = dyf * weight.to(stat) if weight is not None else dyf
    c1 = (g * xhat).mean(-1, keepdim=True)
    if rms:
        dh = rstd[:, None] * (g - xhat * c1)
    else:
        dh = rstd[:, None] * (g - xhat * c1 - g.mean(-1, keepdim=True))
    if dh_out is not None:
        dh = dh + dh_out.to(stat)
    dx = h.new_empty(0)
    if dropout_p > 0.0:
        dx = (dh * _multiplier(h.shape, dropout_p, seed, offset, h.device, stat)).to(h.dtype)
    dweight = (dyf * xhat).sum(0).to(weight.dtype) if weight is not None else h.new_empty(0)
    dbias = dyf.sum(0).to(dy.dtype if weight is None else weight.dtype) if has_bias else h.new_empty(0)
    return dh.to(h.dtype), dx, dweight, dbias


# ---------------------------------------------------------------------------------------------
# gelu_ffn
#
#   pre = x W1^T + b1;  g = gelu(pre);  y = dropout(g W2^T + b2)
#   gelu(u)  = u * Phi(u) = 0.5 u (1 + erf(u / sqrt 2))                               (exact)
#            ~ 0.5 u (1 + tanh(k (u + 0.044715 u^3))),  k = sqrt(2 / pi)               ('tanh')
#   gelu'(u) = Phi(u) + u phi(u)                                                       (exact)
#            = 0.5 (1 + t) + 0.5 u (1 - t^2) k (1 + 3 * 0.044715 u^2),  t = tanh(...)  ('tanh')
#
# Backward: dz = dy * dropout_multiplier;  db2 = sum_rows dz;  dW2 = dz^T g
#           dpre = (dz W2) * gelu'(pre);   db1 = sum_rows dpre;  dW1 = dpre^T x;  dx = dpre W1
# The pre-activation is saved (M x F); recomputing it would cost a third GEMM.
# ---------------------------------------------------------------------------------------------
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = 0.044715


def gelu(u: Tensor, approximate: str) -> Tensor:
    """GELU in plain arithmetic (same math as ``F.gelu``)."""
    if approximate == "tanh":
        return 0.5 * u * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (u + _TANH_C * u * u * u)))
    return 0.5 * u * (1.0 + torch.erf(u * _INV_SQRT_2))


def gelu_grad(u: Tensor, approximate: str) -> Tensor:
    """d gelu(u) / du."""
    if approximate == "tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (u + _TANH_C * u * u * u))
        return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_C * u * u)
    return 0.5 * (1.0 + torch.erf(u * _INV_SQRT_2)) + u * torch.exp(-0.5 * u * u) * _INV_SQRT_2PI


def gelu_ffn_fwd(
    x: Tensor,                    # (M, C) input rows
    w1: Tensor,                   # (F, C) first linear weight (nn.Linear layout)
    b1: Optional[Tensor],         # (F,)
    w2: Tensor,                   # (C2, F) second linear weight
    b2: Optional[Tensor],         # (C2,)
    approximate: str,             # 'none' (erf) or 'tanh'
    dropout_p: float,             # dropout on the output
    seed: Optional[Tensor],
    offset: int,
) -> tuple[Tensor, Tensor]:
    """Returns ``(y (M, C2), pre (M, F))``; ``pre`` is the saved pre-activation."""
    stat = _stat_dtype(x.dtype)
    pre = torch.nn.functional.linear(x, w1, b1)
    g = gelu(pre.to(stat), approximate).to(x.dtype)
    y = torch.nn.functional.linear(g, w2, b2)
    if dropout_p > 0.0:
        y = (y.to(stat) * _multiplier(y.shape, dropout_p, seed, offset, y.device, stat)).to(x.dtype)
    return y, pre


def gelu_ffn_bwd(
    dy: Tensor,                   # (M, C2)
    x: Tensor,                    # (M, C)
    w1: Tensor,                   # (F, C)
    w2: Tensor,                   # (C2, F)
    pre: Tensor,                  # (M, F) saved pre-activation
    approximate: str,
    dropout_p: float,
    seed: Optional[Tensor],
    offset: int,
    has_b1: bool,
    has_b2: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dw1, db1 or empty, dw2, db2 or empty)``."""
    stat = _stat_dtype(x.dtype)
    dz = dy
    if dropout_p > 0.0:
        dz = (dy.to(stat) * _multiplier(dy.shape, dropout_p, seed, offset, dy.device, stat)).to(dy.dtype)
    pre_f = pre.to(stat)
    g = gelu(pre_f, approximate).to(x.dtype)
    dw2 = dz.t() @ g
    db2 = dz.to(stat).sum(0).to(dy.dtype) if has_b2 else dy.new_empty(0)
    dg = dz @ w2
    dpre = (dg.to(stat) * gelu_grad(pre_f, approximate)).to(x.dtype)
    dw1 = dpre.t() @ x
    db1 = dpre.to(stat).sum(0).to(x.dtype) if has_b1 else x.new_empty(0)
    dx = dpre @ w1
    return dx, dw1, db1, dw2, db2


# ---------------------------------------------------------------------------------------------
# attention — the semantics of torch.nn.functional.scaled_dot_product_attention, plus key padding
# and a dropout seed.
#
#   S = scale * Q K^T + bias,  bias = additive attn_mask, -inf where a bool mask is False, where
#       is_causal and k > q (top-left aligned, like SDPA), and where key_padding_mask[b, k] is True
#   P = softmax_k S            (a row with every key at -inf: P = 0, lse = -inf, output 0)
#   O = (P * Z) V,             Z = dropout multiplier of element (b, h, q, k)
#   lse = logsumexp_k S        (saved for the fused backwards; returned with return_lse=True)
#
# Masking values. An additive mask value at or below MASKING_THRESHOLD (-2^17) but finite — the
# finfo(float32 or bfloat16).min that Hugging Face writes, -1e9 — marks a masked key. Its score
# is MASKED_SCORE (-256), whatever q . k is. Where a row has an unmasked key (a score above about
# -150) such keys get weight exp(-256 - max) = 0 in float32, as they would with the raw value. A row
# whose every finite score is a masking value attends uniformly to those keys, which is what
# torch's math path gives for finfo.min masks (q . k is absorbed in S there); unlike the raw value,
# -256 keeps lse = -256 + log(n) exact enough in float32 for the backwards' P = exp(S - lse)
# (with finfo(float32).min, lse would round to the mask value and P would not sum to 1). The
# gradient flows through such scores as if S were q . k + bias (straight through), again as in
# torch's math path.
#
# Everything is computed in float32 (float64 for float64 inputs) and rounded once at the end, as
# torch's math path does on the CPU: this is the base of the 2x rule.
# GQA: query head h reads key/value head h // (H / Hk).
# Backward: dV = (P*Z)^T dO;  dP = (dO V^T) * Z;  dS = P * (dP - rowsum(P * dP))
#           dQ = scale * dS K;  dK = scale * dS^T Q  (dK, dV summed over the heads of a group)
# Masks are constants: they get no gradient.
# ---------------------------------------------------------------------------------------------
MASKING_THRESHOLD = -2.0 ** 17
MASKED_SCORE = -256.0


def attention_bias(
    q: Tensor, k: Tensor,
    attn_mask: Optional[Tensor],          # broadcastable to (B, H, Sq, Sk): bool (True = attend) or additive
    key_padding_mask: Optional[Tensor],   # (B, Sk) bool, True = padding (ignored key)
    is_causal: bool,
    dtype: torch.dtype,
) -> Optional[Tensor]:
    """The additive bias (broadcastable to (B, H, Sq, Sk)) all masks add up to, or None."""
    Sq, Sk = q.shape[-2], k.shape[-2]
    bias = None

    def add(t):
        nonlocal bias
        bias = t if bias is None else bias + t

    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=q.device)
    zero = torch.tensor(0.0, dtype=dtype, device=q.device)
    if attn_mask is not None:
        add(torch.where(attn_mask, zero, neg_inf) if attn_mask.dtype == torch.bool else attn_mask.to(dtype))
    if is_causal:
        allowed = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril()
        add(torch.where(allowed, zero, neg_inf))
    if key_padding_mask is not None:
        add(torch.where(key_padding_mask, neg_inf, zero)[:, None, None, :])
    return bias


def _groups(q: Tensor, kv: Tensor) -> int:
    """Query heads per key/value head (1 when there are no heads at all)."""
    return q.shape[1] // kv.shape[1] if kv.shape[1] else 1


def _expand_kv(t: Tensor, groups: int) -> Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _softmax(S: Tensor) -> tuple[Tensor, Tensor]:
    """``(P, lse)`` of the scores' rows: P = 0 and lse = -inf for a row with every score -inf; NaN
    in a row gives NaN (as torch's softmax does)."""
    if S.shape[-1] == 0:
        return S, S.new_full(S.shape[:-1], float("-inf"))
    m = S.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    E = torch.exp(S - m)
    l = E.sum(-1, keepdim=True)
    P = E / torch.where(l == 0, torch.ones_like(l), l)
    return P, (m + torch.log(l)).squeeze(-1)


def _scores(q, k, attn_mask, key_padding_mask, is_causal, scale, stat) -> Tensor:
    kx = _expand_kv(k, _groups(q, k))
    S = (q.to(stat) @ kx.to(stat).transpose(-1, -2)) * scale
    bias = attention_bias(q, k, attn_mask, key_padding_mask, is_causal, stat)
    if bias is None:
        return S
    masking = (bias <= MASKING_THRESHOLD) & ~torch.isneginf(bias)
    return torch.where(masking, torch.tensor(MASKED_SCORE, dtype=stat, device=S.device), S + bias)


def attention_probabilities(q: Tensor, k: Tensor, attn_mask: Optional[Tensor],
                            key_padding_mask: Optional[Tensor], is_causal: bool, scale: float) -> Tensor:
    """P (B, H, Sq, Sk) before dropout, in float32 (float64 for float64 inputs)."""
    return _softmax(_scores(q, k, attn_mask, key_padding_mask, is_causal, scale, _stat_dtype(q.dtype)))[0]


def attention_fwd(
    q: Tensor,                            # (B, H, Sq, D)
    k: Tensor,                            # (B, Hk, Sk, D)
    v: Tensor,                            # (B, Hk, Sk, Dv)
    attn_mask: Optional[Tensor],          # broadcastable to (B, H, Sq, Sk)
    key_padding_mask: Optional[Tensor],   # (B, Sk) bool, True = padding
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: Optional[Tensor],
    offset: int,
) -> tuple[Tensor, Tensor]:
    """Returns ``(out (B, H, Sq, Dv), lse (B, H, Sq) float32)``."""
    stat = _stat_dtype(q.dtype)
    P, lse = _softmax(_scores(q, k, attn_mask, key_padding_mask, is_causal, scale, stat))
    if dropout_p > 0.0:
        P = P * _multiplier(P.shape, dropout_p, seed, offset, P.device, stat)
    out = P @ _expand_kv(v, _groups(q, v)).to(stat)
    return out.to(q.dtype), lse


def attention_bwd(
    dout: Tensor,                         # (B, H, Sq, Dv)
    q: Tensor, k: Tensor, v: Tensor,
    out: Tensor,                          # (B, H, Sq, Dv) forward output
    lse: Tensor,                          # (B, H, Sq) float32 (unused: P is recomputed exactly)
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: Optional[Tensor],
    offset: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dq, dk, dv)``."""
    stat = lse.dtype
    B, H, Sq, _ = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    groups = _groups(q, k)
    P, _ = _softmax(_scores(q, k, attn_mask, key_padding_mask, is_causal, scale, stat))
    Z = _multiplier(P.shape, dropout_p, seed, offset, P.device, stat) if dropout_p > 0.0 else None
    PZ = P * Z if Z is not None else P
    do = dout.to(stat)
    dv = PZ.transpose(-1, -2) @ do                                     # (B, H, Sk, Dv)
    dP = do @ _expand_kv(v, groups).to(stat).transpose(-1, -2)         # (B, H, Sq, Sk)
    if Z is not None:
        dP = dP * Z
    dS = P * (dP - (P * dP).sum(-1, keepdim=True))
    dq = (dS @ _expand_kv(k, groups).to(stat)) * scale
    dk = (dS.transpose(-1, -2) @ q.to(stat)) * scale                   # (B, H, Sk, D)
    if groups > 1:
        dk = dk.reshape(B, Hk, groups, Sk, -1).sum(2)
        dv = dv.reshape(B, Hk, groups, Sk, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------------
# attention_varlen — variable-length batches packed without padding (FlashAttention's varlen
# convention): q (Tq, H, D), k (Tk, Hk, D), v (Tk, Hk, Dv) hold the sequences one after another;
# sequence i owns tokens cu_seqlens_q[i] : cu_seqlens_q[i+1] of q and cu_seqlens_k[i] :
# cu_seqlens_k[i+1] of k and v.
#
# Sequence i is computed exactly as batch element 0 of a (1, H, Sq_i, Sk_i) ``attention_fwd``
# problem: is_causal is top-left aligned *within each sequence* (query j sees keys 0..j, like
# SDPA; FlashAttention aligns bottom-right when Sq_i != Sk_i), and the dropout element
# (i, h, q, k) has index  base_i + (h * Sq_i + q) * Sk_i + k  with  base_i = sum_{j<i} H*Sq_j*Sk_j
# (each sequence's (H, Sq_i, Sk_i) probabilities laid out one after another).
# lse is (H, Tq). No masks besides is_causal (sequences replace the key padding mask).
# ---------------------------------------------------------------------------------------------
def _varlen_segments(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, heads: int):
    """(q0, q1, k0, k1, dropout base) for every sequence."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    base = 0
    for i in range(len(cq) - 1):
        yield cq[i], cq[i + 1], ck[i], ck[i + 1], base
        base += heads * (cq[i + 1] - cq[i]) * (ck[i + 1] - ck[i])


def _as_batch(t: Tensor, start: int, end: int) -> Tensor:
    """Tokens start:end of a packed (T, H, D) tensor as a (1, H, S, D) view."""
    return t[start:end].transpose(0, 1).unsqueeze(0)


def attention_varlen_fwd(
    q: Tensor,                            # (Tq, H, D) packed queries
    k: Tensor,                            # (Tk, Hk, D)
    v: Tensor,                            # (Tk, Hk, Dv)
    cu_seqlens_q: Tensor,                 # (nseq + 1,) int32 query offsets, cu[0] = 0, cu[-1] = Tq
    cu_seqlens_k: Tensor,                 # (nseq + 1,) int32 key offsets
    max_seqlen_q: int,                    # longest query sequence (unused here; kernels size grids by it)
    max_seqlen_k: int,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: Optional[Tensor],
    offset: int,
) -> tuple[Tensor, Tensor]:
    """Returns ``(out (Tq, H, Dv), lse (H, Tq))``; lse float32 (float64 for float64 inputs)."""
    H = q.shape[1]
    out = q.new_zeros(q.shape[0], H, v.shape[-1])
    lse = q.new_full((H, q.shape[0]), float("-inf"), dtype=_stat_dtype(q.dtype))
    for q0, q1, k0, k1, base in _varlen_segments(cu_seqlens_q, cu_seqlens_k, H):
        if q1 == q0:
            continue
        o, l = attention_fwd(_as_batch(q, q0, q1), _as_batch(k, k0, k1), _as_batch(v, k0, k1), None, None,
                             dropout_p, is_causal, scale, seed, offset + base)
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = l[0]
    return out, lse


def attention_varlen_bwd(
    dout: Tensor,                         # (Tq, H, Dv)
    q: Tensor, k: Tensor, v: Tensor,
    out: Tensor,                          # (Tq, H, Dv) forward output
    lse: Tensor,                          # (H, Tq)
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: Optional[Tensor],
    offset: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dq, dk, dv)``; tokens outside every sequence get zero gradient."""
    H = q.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q0, q1, k0, k1, base in _varlen_segments(cu_seqlens_q, cu_seqlens_k, H):
        if q1 == q0:
            continue
        g = attention_bwd(_as_batch(dout, q0, q1), _as_batch(q, q0, q1), _as_batch(k, k0, k1),
                          _as_batch(v, k0, k1), _as_batch(out, q0, q1), lse[None, :, q0:q1], None, None,
                          dropout_p, is_causal, scale, seed, offset + base)
        dq[q0:q1] = g[0][0].transpose(0, 1)
        dk[k0:k1] = g[1][0].transpose(0, 1)
        dv[k0:k1] = g[2][0].transpose(0, 1)
    return dq, dk, dv
