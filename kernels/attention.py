"""Exact attention, forward and backward, in Triton: the FlashAttention-2 algorithm.

Math
----
For one (batch b, query head h) with key/value head ``hk = h // (H / Hk)`` (GQA / MQA):

    S   = scale * Q K^T + bias            bias = the additive attn_mask (a masking value, at or
                                          below -2^17, gives S = -256: reference.py), -inf where is_causal and
                                          k > q (top-left aligned, like SDPA), -inf where
                                          key_padding_mask[b, k]
    lse = logsumexp_k S                   (B, H, Sq), float32, natural log; -inf for a row whose
                                          every key is masked (its output is 0)
    P   = exp(S - lse),   O = (P * Z) V   Z = dropout multiplier of element
                                          n = ((b * H + h) * Sq + q) * Sk + k  (fusedformer.rng)

Backward (vector-Jacobian product), with ``Delta = rowsum(dO * O)`` (= rowsum(P * dP) below):

    dV = (P * Z)^T dO,   dP = (dO V^T) * Z,   dS = P * (dP - Delta)
    dQ = scale * dS K,   dK = scale * dS^T Q            (dK, dV summed over a GQA group's heads)

Forward (FlashAttention-2): one program per (query block, head, batch) keeps a Q tile in
registers and streams K/V tiles, updating an online softmax in float32 with base-2 exponentials
(``exp2((S - m) * log2 e)``: the ``log2 e`` is folded into the score scale); the running max ``m``
and sum ``l`` give ``lse = (m + log2 l) * ln 2``, saved for the backward. Key blocks wholly inside
every row's causal window and wholly inside the sequence skip the masking code (the split loop);
causal programs stop at their diagonal.

Backward: a preprocess kernel computes ``Delta``; a dK/dV kernel (one program per key block and
K/V head) loops over the query blocks — and over every query head of its GQA group — accumulating
dK and dV in registers; a dQ kernel (one program per query block and head) loops over the key
blocks. No atomics: the backward is deterministic. P is recomputed from Q, K and the saved lse.

Dropout is generated inside the kernels from the seed (Philox, ``fusedformer.rng``'s mapping, bit
identical to the reference's mask); the backward regenerates it. The mask is never stored.

Hopper (opt-in, ``FUSEDFORMER_TRITON_TMA=1``): the forward streams K/V through tensor descriptors
(TMA) built over the tensors' own strides; other GPUs and unaligned layouts use pointer loads.

Saved for the backward: the output and ``lse`` (B, H, Sq) float32 — O(S) memory, never P.

Variable length (``attention_varlen_fwd/bwd``): packed (total tokens, heads, dim) tensors with
``cu_seqlens`` offsets; sequence i is treated as batch element i of a (1, H, Sq_i, Sk_i)
problem: causal alignment top-left within each sequence, dropout element
``base_i + (h * Sq_i + q) * Sk_i + k`` with ``base_i = sum_{j<i} H * Sq_j * Sk_j``.

Limits (declared once, in ``fusedformer/ops/limits.py`` as ``ATTENTION["triton"]``: dispatch's
reasons and the launchers' head-dim check both come from it): float16 / bfloat16 / float32; head dims 1..256 (Q/K and V separately;
non-powers of two are padded to the next power of two in registers and masked in memory); any
sequence lengths; Q/K/V may be strided views with a contiguous last dim; the additive mask is read
through its strides (an expanded (B, H, Sq, Sk) view is never materialized).

Files, by concern: this one (the math, the limits and the launchers), ``attention_fwd.py`` (the
forward kernel), ``attention_bwd.py`` (the backward kernels), ``_attention_common.py`` (what both
share: autotuning tiles and pruners, masking constants, sequence bounds, dropout indices).

References: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning" (2023); Dao et al., "FlashAttention" (2022); Milakov & Gimelshein, "Online
normalizer calculation for softmax" (2018); Triton tutorial 06 (fused attention).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton

from . import _configs as _cfg
from ._attention_common import TensorDescriptor
from ._common import dot_precision, drop_rows_aligned, dropout_constants, next_pow2, seed_value
# The kernels, by concern: forward, backward, and what they share (tiles, pruners, masking).
from .attention_bwd import _attention_bwd_dkdv, _attention_bwd_dq, _bwd_delta
from .attention_fwd import _attention_fwd

try:                            # installed as fusedformer.kernels
    from ..ops.limits import ATTENTION as _LIMITS
except ImportError:             # loaded as a top-level ``kernels`` package (scripts/triton_aot_check.py)
    from fusedformer.ops.limits import ATTENTION as _LIMITS

MAX_GRID_BATCH = 65535          # grid axis 2 (batch / sequence) limit; larger batches are split


def _check_head_dims(D: int, Dv: int) -> None:
    """The declared head-dim limits; empty inputs are the caller's to avoid (the ops route them to
    the reference)."""
    _LIMITS["triton"].check("attention (triton)", head_dim=D, head_dim_v=Dv)
    if D < 1 or Dv < 1:
        raise ValueError(f"attention (triton): head dims must be >= 1, got {D} and {Dv} (empty inputs)")


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
def _bhs(t: Optional[torch.Tensor], varlen: bool) -> tuple[int, int, int]:
    """(batch, head, sequence) strides of a (B, H, S, D) tensor or a packed (T, H, D) one."""
    if t is None:
        return 0, 0, 0
    return (0, t.stride(1), t.stride(0)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


class _Problem:
    """Everything a launch needs besides the tensors that differ between passes."""

    def __init__(self, q, k, v, attn_mask, kpm, dropout_p, is_causal, scale, seed, offset, *,
                 varlen=False, cu_q=None, cu_k=None, max_q=0, max_k=0):
        self.varlen = varlen
        if varlen:
            self.n_batch, self.H, self.D = cu_q.shape[0] - 1, q.shape[1], q.shape[2]
            self.Hk, self.Dv = k.shape[1], v.shape[2]
            self.Sq, self.Sk = int(max_q), int(max_k)
        else:
            self.n_batch, self.H, self.Sq, self.D = q.shape
            self.Hk, self.Sk, self.Dv = k.shape[1], k.shape[2], v.shape[3]
        _check_head_dims(self.D, self.Dv)
        self.q, self.k, self.v = q, k, v
        self.mask, self.kpm = attn_mask, kpm
        self.cu_q, self.cu_k = cu_q, cu_k
        self.causal = bool(is_causal)
        self.scale = float(scale)
        self.threshold, self.drop_scale = dropout_constants(dropout_p)
        self.has_dropout = dropout_p > 0.0
        self.seed, self.offset = seed_value(seed), int(offset)
        # Every row of P starts on a Philox block: one block serves eight neighbouring keys.
        self.drop_aligned = self.has_dropout and not varlen and drop_rows_aligned(self.Sk, self.offset)
        self.drop_base = None
        if varlen and self.has_dropout:
            lq = (cu_q[1:] - cu_q[:-1]).to(torch.int64)
            lk = (cu_k[1:] - cu_k[:-1]).to(torch.int64)
            sizes = self.H * lq * lk
            self.drop_base = torch.cumsum(sizes, 0) - sizes

    def common_args(self, b0: int, b1: int):
        """Arguments shared by all kernels, for batch elements / sequences [b0, b1)."""
        m = self.mask
        mask_strides = (m.stride(0), m.stride(1), m.stride(2), m.stride(3)) if m is not None else (0, 0, 0, 0)
        if self.varlen:
            offset = self.offset
            tensors = (m, self.kpm, self.cu_q[b0:], self.cu_k[b0:],
                       self.drop_base[b0:] if self.drop_base is not None else self.cu_q)
        else:
            offset = self.offset + b0 * self.H * self.Sq * self.Sk
            tensors = (m[b0:b1] if m is not None else None, self.kpm[b0:b1] if self.kpm is not None else None,
                       self.q, self.q, self.q)
        return tensors, mask_strides, offset

    def constexprs(self):
        return dict(HEAD_DIM=self.D, HEAD_DIM_V=self.Dv, BLOCK_D=max(16, next_pow2(self.D)),
                    BLOCK_DV=max(16, next_pow2(self.Dv)), CAUSAL=self.causal, HAS_MASK=self.mask is not None,
                    HAS_KPM=self.kpm is not None, HAS_DROPOUT=self.has_dropout, DROP_ALIGNED=self.drop_aligned,
                    VARLEN=self.varlen,
                    DOT_PRECISION=dot_precision(self.q.dtype))

    def chunks(self):
        for b0 in range(0, self.n_batch, MAX_GRID_BATCH):
            yield b0, min(self.n_batch, b0 + MAX_GRID_BATCH)

    def batch_view(self, t, b0, b1):
        return t if (self.varlen or t is None) else t[b0:b1]


def _placeholder(t, fallback):
    return t if t is not None else fallback


def tma_enabled() -> bool:
    """The TMA forward path is opt-in (``FUSEDFORMER_TRITON_TMA=1``) until it has been validated and
    timed on a Hopper GPU (docs/triton_kernels.md); read at each call."""
    return os.environ.get("FUSEDFORMER_TRITON_TMA", "0") == "1"


def _tma_descriptor(t: torch.Tensor, block: list[int]):
    """A host-side tensor descriptor over ``t`` (its strides), or None where TMA cannot take it
    (a GPU older than Hopper, a base or stride not 16-byte aligned)."""
    if TensorDescriptor is None:
        return None
    if _cfg.device_arch(t.device) < 90:     # the device's (or the ahead-of-time target's) arch
        return None
    if t.data_ptr() % 16 or any((s * t.element_size()) % 16 for s in t.stride()[:-1]):
        return None
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def _forward(pb: _Problem, out, lse, lse_strides):
    for b0, b1 in pb.chunks():
        (mask, kpm, cu_q, cu_k, drop_base), mask_strides, offset = pb.common_args(b0, b1)
        q, k, v = (pb.batch_view(t, b0, b1) for t in (pb.q, pb.k, pb.v))
        o, lse_v = pb.batch_view(out, b0, b1), pb.batch_view(lse, b0, b1)
        k_desc = v_desc = None
        if tma_enabled():   # block shapes are set per autotuning configuration (_set_descriptor_blocks)
            lead = [16, 1] if pb.varlen else [1, 1, 16]
            k_desc = _tma_descriptor(k, lead + [max(16, next_pow2(pb.D))])
            v_desc = _tma_descriptor(v, lead + [max(16, next_pow2(pb.Dv))])
        use_tma = k_desc is not None and v_desc is not None
        grid = lambda meta: (triton.cdiv(pb.Sq, meta["BLOCK_M"]), pb.H, b1 - b0)  # noqa: E731
        _attention_fwd[grid](
            q, k, v, k_desc if use_tma else k, v_desc if use_tma else v, o, lse_v,
            _placeholder(mask, q), _placeholder(kpm, q), cu_q, cu_k, drop_base,
            *_bhs(q, pb.varlen), *_bhs(k, pb.varlen), *_bhs(v, pb.varlen), *_bhs(o, pb.varlen), *lse_strides,
            *mask_strides, kpm.stride(0) if kpm is not None else 0,
            pb.H, pb.H // pb.Hk, pb.Sq, pb.Sk, pb.scale * math.log2(math.e),
            pb.seed, offset, pb.threshold, pb.drop_scale, next_pow2(pb.Sq), next_pow2(pb.Sk),
            TMA=use_tma, **pb.constexprs())


def _backward(pb: _Problem, dout, out, lse, lse_strides, delta_strides, dq, dk, dv):
    # Delta = rowsum(dO * O) over the rows of the (contiguous) output layout.
    R = out.numel() // pb.Dv
    delta = torch.empty(R, dtype=torch.float32, device=out.device)
    block_dv = max(16, next_pow2(pb.Dv))
    # 4096 elements a program (32 a thread), 2048 in float32: (16, 256) float32 tiles spill on sm_90
    block_r = max(1, min(64, (2048 if out.element_size() > 2 else 4096) // block_dv))
    _bwd_delta[(triton.cdiv(R, block_r),)](out, dout, delta, R, HEAD_DIM_V=pb.Dv, BLOCK_R=block_r,
                                           BLOCK_DV=block_dv)
    for b0, b1 in pb.chunks():
        (mask, kpm, cu_q, cu_k, drop_base), mask_strides, offset = pb.common_args(b0, b1)
        q, k, v, do, lse_v, dq_v, dk_v, dv_v = (pb.batch_view(t, b0, b1) for t in (pb.q, pb.k, pb.v, dout, lse,
                                                                                   dq, dk, dv))
        delta_v = delta if pb.varlen else delta[b0 * pb.H * pb.Sq:]
        common = (_placeholder(mask, q), _placeholder(kpm, q), cu_q, cu_k, drop_base)
        strides = (*_bhs(q, pb.varlen), *_bhs(k, pb.varlen), *_bhs(v, pb.varlen), *_bhs(do, pb.varlen),
                   *lse_strides, *delta_strides)
        tail = (*mask_strides, kpm.stride(0) if kpm is not None else 0,
                pb.H, pb.H // pb.Hk, pb.Sq, pb.Sk, pb.scale * math.log2(math.e), pb.scale,
                pb.seed, offset, pb.threshold, pb.drop_scale, next_pow2(pb.Sq), next_pow2(pb.Sk))
        grid_kv = lambda meta: (triton.cdiv(pb.Sk, meta["BLOCK_N"]), pb.Hk, b1 - b0)  # noqa: E731
        _attention_bwd_dkdv[grid_kv](q, k, v, do, lse_v, delta_v, dk_v, dv_v, *common, *strides,
                                     *_bhs(dk_v, pb.varlen), *_bhs(dv_v, pb.varlen), *tail, **pb.constexprs())
        grid_q = lambda meta: (triton.cdiv(pb.Sq, meta["BLOCK_M"]), pb.H, b1 - b0)  # noqa: E731
        _attention_bwd_dq[grid_q](q, k, v, do, lse_v, delta_v, dq_v, *common, *strides,
                                  *_bhs(dq_v, pb.varlen), *tail, **pb.constexprs())


def _kpm_bytes(key_padding_mask):
    return key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else None


def attention_fwd(
    q: torch.Tensor,                              # (B, H, Sq, D), last dim contiguous
    k: torch.Tensor,                              # (B, Hk, Sk, D)
    v: torch.Tensor,                              # (B, Hk, Sk, Dv)
    attn_mask: Optional[torch.Tensor],            # additive, q's dtype, (B, H, Sq, Sk) (expanded view)
    key_padding_mask: Optional[torch.Tensor],     # (B, Sk) bool, True = padding
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: Optional[torch.Tensor],                 # (1,) int64 CPU tensor, or None without dropout
    offset: int,
):
    """Returns ``(out (B, H, Sq, Dv), lse (B, H, Sq) float32)`` like ``reference.attention_fwd``."""
    pb = _Problem(q, k, v, attn_mask, _kpm_bytes(key_padding_mask), dropout_p, is_causal, scale, seed, offset)
    out = q.new_empty(pb.n_batch, pb.H, pb.Sq, pb.Dv)
    lse = q.new_empty(pb.n_batch, pb.H, pb.Sq, dtype=torch.float32)
    _forward(pb, out, lse, lse.stride())
    return out, lse


def attention_bwd(
    dout: torch.Tensor,                           # (B, H, Sq, Dv)
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor,                            # (B, H, Sq, Dv) forward output
    lse: torch.Tensor,                            # (B, H, Sq) float32
    attn_mask: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: Optional[torch.Tensor],
    offset: int,
):
    """Returns ``(dq, dk, dv)`` (the shapes and layouts of q, k, v) like ``reference.attention_bwd``."""
    pb = _Problem(q, k, v, attn_mask, _kpm_bytes(key_padding_mask), dropout_p, is_causal, scale, seed, offset)
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    # Gradients in the layout of their inputs (as the custom op's fake implementation promises).
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # Delta follows the output rows (b, h, q): the same strides as lse.
    _backward(pb, dout, out, lse, lse.stride(), lse.stride(), dq, dk, dv)
    return dq, dk, dv


def attention_varlen_fwd(
    q: torch.Tensor,                              # (Tq, H, D) packed queries, last dim contiguous
    k: torch.Tensor,                              # (Tk, Hk, D)
    v: torch.Tensor,                              # (Tk, Hk, Dv)
    cu_seqlens_q: torch.Tensor,                   # (nseq + 1,) int32 query offsets
    cu_seqlens_k: torch.Tensor,                   # (nseq + 1,) int32 key offsets
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: Optional[torch.Tensor],
    offset: int,
):
    """Returns ``(out (Tq, H, Dv), lse (H, Tq) float32)`` like ``reference.attention_varlen_fwd``."""
    pb = _Problem(q, k, v, None, None, dropout_p, is_causal, scale, seed, offset, varlen=True,
                  cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, max_q=max_seqlen_q, max_k=max_seqlen_k)
    # Tokens outside every sequence (cu_seqlens_q[-1] < Tq) keep output 0 and lse -inf.
    out = q.new_zeros(q.shape[0], pb.H, pb.Dv)
    lse = q.new_full((pb.H, q.shape[0]), float("-inf"), dtype=torch.float32)
    _forward(pb, out, lse, (0, lse.stride(0), lse.stride(1)))
    return out, lse


def attention_varlen_bwd(
    dout: torch.Tensor,                           # (Tq, H, Dv)
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor,                            # (Tq, H, Dv)
    lse: torch.Tensor,                            # (H, Tq) float32
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: Optional[torch.Tensor],
    offset: int,
):
    """Returns ``(dq, dk, dv)`` (the shapes and layouts of q, k, v) like ``reference.attention_varlen_bwd``."""
    pb = _Problem(q, k, v, None, None, dropout_p, is_causal, scale, seed, offset, varlen=True,
                  cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, max_q=max_seqlen_q, max_k=max_seqlen_k)
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    # Zero-filled (tokens outside every sequence get no gradient), in the layout of their inputs.
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # Delta follows the output rows (t, h) of the packed (Tq, H, Dv) output.
    _backward(pb, dout, out, lse, (0, lse.stride(0), lse.stride(1)), (0, 1, pb.H), dq, dk, dv)
    return dq, dk, dv
