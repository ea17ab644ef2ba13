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

Limits: float16 / bfloat16 / float32; head dims 1..256 (``MAX_HEAD_DIM``, Q/K and V separately;
non-powers of two are padded to the next power of two in registers and masked in memory); any
sequence lengths; Q/K/V may be strided views with a contiguous last dim; the additive mask is read
through its strides (an expanded (B, H, Sq, Sk) view is never materialized).

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
import triton.language as tl

from . import _configs as _cfg
from ._common import (autotune_enabled, device_function, dot_precision, dropout_constants, dropout_keep_rows,
                      interpreting, mma, next_pow2, round_to, seed_value)

try:                            # host-side tensor descriptors (TMA): triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:             # pragma: no cover - older triton: the pointer path only
    TensorDescriptor = None

MAX_HEAD_DIM = 256
MAX_GRID_BATCH = 65535          # grid axis 2 (batch / sequence) limit; larger batches are split

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# Masking values (the reference's rule, fusedformer/reference.py): a finite mask value at or below
# -2^17 makes the score -256, whatever q . k is.
_MASKING_THRESHOLD = tl.constexpr(-131072.0)   # -2^17
_MASKED_SCORE2 = tl.constexpr(-256.0 * 1.4426950408889634)   # in log2 units


def _check_head_dims(D: int, Dv: int) -> None:
    for name, d in (("head dim", D), ("value head dim", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"attention (triton): {name} {d} is out of range; "
                             f"the Triton kernels take 1..{MAX_HEAD_DIM}")


# ------------------------------------------------------------------------------------------------
# autotuning configurations
# ------------------------------------------------------------------------------------------------
# Tiles (BLOCK_M, BLOCK_N, stages, warps) come from kernels/_configs.py, per architecture family,
# dtype and head dim, best default first: with autotuning switched off
# (FUSEDFORMER_TRITON_AUTOTUNE=0) the first tile that fits is used without timing.
# Lengths enter the key as power-of-two buckets, so a new length does not re-tune.
_TUNE_KEY = ["TUNE_SQ", "TUNE_SK", "HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "HAS_DROPOUT", "HAS_MASK", "DROP_ALIGNED4"]
_FWD_TUNE_KEY = _TUNE_KEY + ["TMA"]


def _set_descriptor_blocks(nargs):
    """Config pre-hook: give the K/V tensor descriptors (TMA path) this configuration's tile."""
    for name, width in (("KDesc", "BLOCK_D"), ("VDesc", "BLOCK_DV")):
        desc = nargs[name]
        if isinstance(desc, TensorDescriptor):
            n, d = nargs["BLOCK_N"], nargs[width]
            desc.block_shape = [1, 1, n, d] if len(desc.shape) == 4 else [n, 1, d]


def _autotune_configs(kernel, pre_hook=None):
    """Every tile _configs names for ``kernel`` ("fwd", "dkdv", "dq") on any GPU; the pruner picks."""
    if interpreting():   # one configuration: nothing to time on the CPU
        bm, bn = _cfg.INTERPRETER_TILE[kernel]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=1, pre_hook=pre_hook)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w, pre_hook=pre_hook)
            for bm, bn, s, w in _cfg.attention_all_tiles(kernel)]


def _tile(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, c.num_warps


def _pruner(kernel):
    """``early_config_prune`` for ``kernel``: the tiles _configs lists for this GPU (or the
    ahead-of-time target), dtype and head dim, in its order, minus those whose estimated shared
    memory exceeds the GPU's per-block limit; only the first with autotuning off."""
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        bd, bdv = kwargs["BLOCK_D"], kwargs["BLOCK_DV"]
        arch, limit = _cfg.device_arch(q.device), _cfg.smem_limit(q.device)
        tiles = _cfg.attention_tiles(kernel, arch, q.dtype, bd, bdv, kwargs["HAS_DROPOUT"] or kwargs["HAS_MASK"])
        kept = _cfg.select(configs, tiles, _tile,
                           lambda c: _cfg.attention_smem(kernel, _tile(c), bd, bdv, q.element_size(),
                                                        kwargs["HAS_MASK"]), limit)
        return kept if autotune_enabled() else kept[:1]
    return prune


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------
@device_function
def _fwd_tile(
    acc, l_i, m_i,           # (BLOCK_M, BLOCK_DV) output accumulator, (BLOCK_M,) running sum and max
    q,                       # (BLOCK_M, BLOCK_D) query tile
    kt, v,                   # (BLOCK_D, BLOCK_N) K^T and (BLOCK_N, BLOCK_DV) V tiles of this key block
    mask_base, kpm_base,     # additive mask of this (batch, head); key padding row of this batch
    rows, start_n,           # (BLOCK_M,) query positions; first key of this tile
    q_len, k_len,
    stride_mq, stride_mk,
    qk_scale2,               # scale * log2(e)
    seed, drop_rows, drop_threshold,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,    # tile straddles the sequence end or the causal diagonal
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DROP_ALIGNED4: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < k_len
    s = mma(q, kt, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_PRECISION) * qk_scale2
    if HAS_MASK:
        bias = tl.load(mask_base + rows[:, None] * stride_mq + cols[None, :] * stride_mk,
                       mask=(rows < q_len)[:, None] & col_ok[None, :], other=0.0)
        s = _masked_score(s, bias.to(tl.float32))
    if HAS_KPM:
        pad = tl.load(kpm_base + cols, mask=col_ok, other=1) != 0
        s = tl.where(pad[None, :], float("-inf"), s)
    if MASKED:
        valid = col_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)      # rows with no visible key so far
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        keep = dropout_keep_rows(seed, drop_rows, start_n, drop_threshold, BLOCK_N, DROP_ALIGNED4, False)
        p = tl.where(keep, p, 0.0)
    acc = mma(round_to(p, v.dtype), v, acc, DOT_PRECISION)
    return acc, l_i, m_new


@device_function
def _fwd_load_kv(
    k_base, v_base,          # pointer path: K and V of this (batch, kv head, sequence start)
    KDesc, VDesc,            # TMA path: tensor descriptors of the whole K and V
    b, hk, k_start, start_n, k_len,
    stride_ks, stride_vs,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    TMA: tl.constexpr, VARLEN: tl.constexpr,
):
    """K^T (BLOCK_D, BLOCK_N) and V (BLOCK_N, BLOCK_DV) for keys start_n .. start_n + BLOCK_N - 1.

    Pointer path: masked loads, zero past the sequence and the head dim. TMA path (Hopper): the
    copy engine fills zeros past the tensor's bounds; in a packed (varlen) tensor the keys past a
    sequence's end belong to the next sequence — only masked tiles reach there, and they mask them."""
    if TMA:
        if VARLEN:
            row = (k_start + start_n).to(tl.int32)
            k = KDesc.load([row, hk, 0]).reshape(BLOCK_N, BLOCK_D)
            v = VDesc.load([row, hk, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            k = KDesc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
            v = VDesc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        kt = tl.trans(k)
    else:
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < k_len
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        kt = tl.load(k_base + cols[None, :] * stride_ks + d[:, None],
                     mask=(d < HEAD_DIM)[:, None] & col_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + dv[None, :],
                    mask=col_ok[:, None] & (dv < HEAD_DIM_V)[None, :], other=0.0)
    return kt, v


@device_function
def _sequence_bounds(CuSeqQ, CuSeqK, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first token, length) of batch element / sequence ``b`` for queries and keys (int64 when VARLEN)."""
    if VARLEN:
        q_start = tl.load(CuSeqQ + b).to(tl.int64)
        q_len = tl.load(CuSeqQ + b + 1).to(tl.int64) - q_start
        k_start = tl.load(CuSeqK + b).to(tl.int64)
        k_len = tl.load(CuSeqK + b + 1).to(tl.int64) - k_start
    else:
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k
    return q_start, q_len, k_start, k_len


@device_function
def _dropout_row_index(DropBase, b, h, rows, q_len, k_len, n_heads, seqlen_q, seqlen_k, offset,
                       VARLEN: tl.constexpr):
    """offset + the dropout index of element (row, key 0) for each row (int64)."""
    if VARLEN:
        seq_base = tl.load(DropBase + b)
    else:
        seq_base = b.to(tl.int64) * n_heads * seqlen_q * seqlen_k
    return offset + seq_base + (h.to(tl.int64) * q_len + rows) * k_len


@triton.jit
def _masked_score(s2, bias):
    """Scores in log2 units plus the additive mask ``bias`` (natural units), masking values
    (``bias <= -2^17``, finite) giving the fixed score -256 (reference.py)."""
    masking = bias <= _MASKING_THRESHOLD
    return tl.where(masking, tl.where(bias == float("-inf"), bias, _MASKED_SCORE2), s2 + bias * _LOG2E)


@triton.autotune(configs=_autotune_configs("fwd", _set_descriptor_blocks), key=_FWD_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit
def _attention_fwd(
    Q,               # (B, H, Sq, D) or packed (Tq, H, D), read through strides
    K,               # (B, Hk, Sk, D) or (Tk, Hk, D)
    V,               # (B, Hk, Sk, Dv) or (Tk, Hk, Dv)
    KDesc,           # TMA: tensor descriptor of K (4-D, or 3-D when VARLEN); else unused
    VDesc,           # TMA: tensor descriptor of V
    Out,             # (B, H, Sq, Dv) or (Tq, H, Dv)
    LSE,             # (B, H, Sq) or (H, Tq) float32
    Mask,            # additive mask, (B, H, Sq, Sk) through strides (stride 0 where broadcast)
    KPM,             # (B, Sk) uint8 key padding mask, nonzero = padding
    CuSeqQ,          # (nseq + 1,) int32 query offsets (VARLEN)
    CuSeqK,          # (nseq + 1,) int32 key offsets (VARLEN)
    DropBase,        # (nseq,) int64 first dropout index of each sequence (VARLEN with dropout)
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_pb,
    n_heads,         # H (query heads)
    kv_group,        # H // Hk
    seqlen_q, seqlen_k,
    qk_scale2,       # scale * log2(e)
    seed, offset, drop_threshold, drop_scale,
    TUNE_SQ, TUNE_SK,                       # power-of-two length buckets: autotuning keys only
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DROP_ALIGNED4: tl.constexpr,            # dropout rows start on Philox blocks (Sk, offset multiples of 4)
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,       # stream K/V with the tensor memory accelerator (Hopper and newer)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = _sequence_bounds(CuSeqQ, CuSeqK, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    hk = h // kv_group
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qs
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_ks
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vs
    mask_base = Mask + b64 * stride_mb + h64 * stride_mh
    kpm_base = KPM + b64 * stride_pb

    rows = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    q = tl.load(q_base + rows[:, None] * stride_qs + d[None, :],
                mask=row_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    drop_rows = rows.to(tl.int64)
    if HAS_DROPOUT:
        drop_rows = _dropout_row_index(DropBase, b, h, rows.to(tl.int64), q_len, k_len, n_heads,
                                       seqlen_q, seqlen_k, offset, VARLEN)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum(k_len, m0 + BLOCK_M)
        full_end = tl.minimum(k_len, m0 + 1)     # keys < m0 + 1 are visible to every row of the block
    else:
        hi = k_len
        full_end = k_len
    full_end = (full_end // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        kt, v = _fwd_load_kv(k_base, v_base, KDesc, VDesc, b, hk, k_start, start_n, k_len, stride_ks, stride_vs,
                             HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, TMA, VARLEN)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, kt, v, mask_base, kpm_base, rows, start_n, q_len, k_len,
                                  stride_mq, stride_mk, qk_scale2, seed, drop_rows, drop_threshold, BLOCK_N,
                                  False, CAUSAL, HAS_MASK, HAS_KPM, HAS_DROPOUT, DROP_ALIGNED4, DOT_PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        kt, v = _fwd_load_kv(k_base, v_base, KDesc, VDesc, b, hk, k_start, start_n, k_len, stride_ks, stride_vs,
                             HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, TMA, VARLEN)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, kt, v, mask_base, kpm_base, rows, start_n, q_len, k_len,
                                  stride_mq, stride_mk, qk_scale2, seed, drop_rows, drop_threshold, BLOCK_N,
                                  True, CAUSAL, HAS_MASK, HAS_KPM, HAS_DROPOUT, DROP_ALIGNED4, DOT_PRECISION)

    empty = l_i == 0.0                           # every key masked: output 0, lse -inf
    out = acc * (drop_scale / tl.where(empty, 1.0, l_i))[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    dv = tl.arange(0, BLOCK_DV)
    o_ptrs = Out + b64 * stride_ob + h64 * stride_oh + (q_start + rows).to(tl.int64)[:, None] * stride_os + dv[None, :]
    tl.store(o_ptrs, round_to(out, Out.dtype.element_ty), mask=row_ok[:, None] & (dv < HEAD_DIM_V)[None, :])
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + (q_start + rows).to(tl.int64) * stride_ls, lse, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_delta(
    O,               # (R, Dv) contiguous forward output rows
    DO,              # (R, Dv) contiguous output-gradient rows
    Delta,           # (R,) float32 rowsum(dO * O)
    R,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    dv = tl.arange(0, BLOCK_DV)
    mask = (rows < R)[:, None] & (dv < HEAD_DIM_V)[None, :]
    offs = rows[:, None] * HEAD_DIM_V + dv[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + rows, tl.sum(o * do, axis=1), mask=rows < R)


@device_function
def _bwd_lse2(LSE, row_ok):
    """Saved lse in base 2; +inf for rows past the end and for fully masked rows, so that
    exp2(s - lse2) is exactly 0 there."""
    lse = tl.load(LSE, mask=row_ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E


@device_function
def _bwd_dkdv_tile(
    dk, dv,                  # (BLOCK_N, BLOCK_D), (BLOCK_N, BLOCK_DV) float32 accumulators
    k, v,                    # (BLOCK_N, BLOCK_D), (BLOCK_N, BLOCK_DV) this program's keys/values
    q_base, do_base, lse_base, delta_base, mask_base,
    cols, pad, start_n, start_m,   # (BLOCK_N,) key positions and padding flags; first key; first query row
    q_len, k_len,
    stride_qs, stride_dos, stride_ls, stride_ds, stride_mq, stride_mk,
    qk_scale2,
    seed, drop_base, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr,    # tile straddles the causal diagonal
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DROP_ALIGNED4: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Work in the transposed orientation (keys x queries) so that dK, dV come out row-major.
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    d = tl.arange(0, BLOCK_D)
    dvr = tl.arange(0, BLOCK_DV)
    qt = tl.load(q_base + rows[None, :] * stride_qs + d[:, None],
                 mask=(d < HEAD_DIM)[:, None] & row_ok[None, :], other=0.0)            # (BLOCK_D, BLOCK_M)
    do = tl.load(do_base + rows[:, None] * stride_dos + dvr[None, :],
                 mask=row_ok[:, None] & (dvr < HEAD_DIM_V)[None, :], other=0.0)        # (BLOCK_M, BLOCK_DV)
    lse2 = _bwd_lse2(lse_base + rows * stride_ls, row_ok)
    delta = tl.load(delta_base + rows * stride_ds, mask=row_ok, other=0.0)
    st = mma(k, qt, tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), DOT_PRECISION) * qk_scale2
    if HAS_MASK:
        bias = tl.load(mask_base + rows[None, :] * stride_mq + cols[:, None] * stride_mk,
                       mask=row_ok[None, :] & (cols < k_len)[:, None], other=0.0)
        st = _masked_score(st, bias.to(tl.float32))
    pt = tl.math.exp2(st - lse2[None, :])
    if MASKED:
        if CAUSAL:
            pt = tl.where(cols[:, None] <= rows[None, :], pt, 0.0)
    if HAS_KPM:
        pt = tl.where(pad[:, None], 0.0, pt)
    dpt = mma(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), DOT_PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep_rows(seed, drop_base + rows.to(tl.int64) * k_len, start_n, drop_threshold, BLOCK_N,
                             DROP_ALIGNED4, True)
        dv = mma(round_to(tl.where(keep, pt, 0.0), do.dtype), do, dv, DOT_PRECISION)
        dpt = tl.where(keep, dpt * drop_scale, 0.0)
    else:
        dv = mma(round_to(pt, do.dtype), do, dv, DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk = mma(round_to(dst, qt.dtype), tl.trans(qt), dk, DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_autotune_configs("dkdv"), key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner("dkdv")})
@triton.jit
def _attention_bwd_dkdv(
    Q, K, V,         # as in the forward
    DO,              # like Out
    LSE,             # like the forward's LSE
    Delta,           # rowsum(dO * O), float32, through its own strides
    DK,              # like K (contiguous)
    DV,              # like V (contiguous)
    Mask, KPM, CuSeqQ, CuSeqK, DropBase,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_lb, stride_lh, stride_ls,
    stride_db, stride_dh, stride_ds,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_pb,
    n_heads, kv_group, seqlen_q, seqlen_k,
    qk_scale2, sm_scale,
    seed, offset, drop_threshold, drop_scale,
    TUNE_SQ, TUNE_SK,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DROP_ALIGNED4: tl.constexpr,            # dropout rows start on Philox blocks (Sk, offset multiples of 4)
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = _sequence_bounds(CuSeqQ, CuSeqK, b, seqlen_q, seqlen_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < k_len
    d = tl.arange(0, BLOCK_D)
    dvr = tl.arange(0, BLOCK_DV)
    k_rows = (k_start + cols).to(tl.int64)
    k = tl.load(K + b64 * stride_kb + hk64 * stride_kh + k_rows[:, None] * stride_ks + d[None, :],
                mask=col_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    v = tl.load(V + b64 * stride_vb + hk64 * stride_vh + k_rows[:, None] * stride_vs + dvr[None, :],
                mask=col_ok[:, None] & (dvr < HEAD_DIM_V)[None, :], other=0.0)
    pad = col_ok                    # placeholder: read only with a key padding mask
    if HAS_KPM:
        pad = tl.load(KPM + b64 * stride_pb + cols, mask=col_ok, other=1) != 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    if CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M                                  # rows < n0 see none of these keys
        full_start = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M      # rows >= this see all of them
        full_start = tl.minimum(full_start, q_len)
    else:
        lo = 0
        full_start = 0
    for g in range(0, kv_group):
        h64 = hk64 * kv_group + g
        row0 = q_start
        q_base = Q + b64 * stride_qb + h64 * stride_qh + row0 * stride_qs
        do_base = DO + b64 * stride_dob + h64 * stride_doh + row0 * stride_dos
        lse_base = LSE + b64 * stride_lb + h64 * stride_lh + row0 * stride_ls
        delta_base = Delta + b64 * stride_db + h64 * stride_dh + row0 * stride_ds
        mask_base = Mask + b64 * stride_mb + h64 * stride_mh
        drop_base = offset
        if HAS_DROPOUT:
            drop_base = _dropout_row_index(DropBase, b, h64, 0, q_len, k_len, n_heads, seqlen_q, seqlen_k,
                                           offset, VARLEN)
        for start_m in range(lo, full_start, BLOCK_M):
            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, cols, pad,
                                    n0, start_m, q_len, k_len, stride_qs, stride_dos, stride_ls, stride_ds,
                                    stride_mq, stride_mk, qk_scale2, seed, drop_base, drop_threshold, drop_scale,
                                    HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, True, CAUSAL, HAS_MASK,
                                    HAS_KPM, HAS_DROPOUT, DROP_ALIGNED4, DOT_PRECISION)
        for start_m in range(full_start, q_len, BLOCK_M):
            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, cols, pad,
                                    n0, start_m, q_len, k_len, stride_qs, stride_dos, stride_ls, stride_ds,
                                    stride_mq, stride_mk, qk_scale2, seed, drop_base, drop_threshold, drop_scale,
                                    HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, False, CAUSAL, HAS_MASK,
                                    HAS_KPM, HAS_DROPOUT, DROP_ALIGNED4, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + k_rows[:, None] * stride_dks + d[None, :],
             round_to(dk, DK.dtype.element_ty), mask=col_ok[:, None] & (d < HEAD_DIM)[None, :])
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + k_rows[:, None] * stride_dvs + dvr[None, :],
             round_to(dv * drop_scale, DV.dtype.element_ty), mask=col_ok[:, None] & (dvr < HEAD_DIM_V)[None, :])


@device_function
def _bwd_dq_tile(
    dq,                      # (BLOCK_M, BLOCK_D) float32 accumulator
    q, do, lse2, delta,      # this program's query rows: tiles and per-row statistics
    k_base, v_base, mask_base, kpm_base,
    rows, start_n,
    q_len, k_len,
    stride_ks, stride_vs, stride_mq, stride_mk,
    qk_scale2,
    seed, drop_rows, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DROP_ALIGNED4: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < k_len
    d = tl.arange(0, BLOCK_D)
    dvr = tl.arange(0, BLOCK_DV)
    kt = tl.load(k_base + cols[None, :] * stride_ks + d[:, None],
                 mask=(d < HEAD_DIM)[:, None] & col_ok[None, :], other=0.0)            # (BLOCK_D, BLOCK_N)
    vt = tl.load(v_base + cols[None, :] * stride_vs + dvr[:, None],
                 mask=(dvr < HEAD_DIM_V)[:, None] & col_ok[None, :], other=0.0)        # (BLOCK_DV, BLOCK_N)
    s = mma(q, kt, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_PRECISION) * qk_scale2
    if HAS_MASK:
        bias = tl.load(mask_base + rows[:, None] * stride_mq + cols[None, :] * stride_mk,
                       mask=(rows < q_len)[:, None] & col_ok[None, :], other=0.0)
        s = _masked_score(s, bias.to(tl.float32))
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        valid = col_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        p = tl.where(valid, p, 0.0)
    if HAS_KPM:
        pad = tl.load(kpm_base + cols, mask=col_ok, other=1) != 0
        p = tl.where(pad[None, :], 0.0, p)
    dp = mma(do, vt, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep_rows(seed, drop_rows, start_n, drop_threshold, BLOCK_N, DROP_ALIGNED4, False)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    return mma(round_to(ds, kt.dtype), tl.trans(kt), dq, DOT_PRECISION)


@triton.autotune(configs=_autotune_configs("dq"), key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit
def _attention_bwd_dq(
    Q, K, V, DO, LSE, Delta,
    DQ,              # like Q (contiguous)
    Mask, KPM, CuSeqQ, CuSeqK, DropBase,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_lb, stride_lh, stride_ls,
    stride_db, stride_dh, stride_ds,
    stride_dqb, stride_dqh, stride_dqs,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_pb,
    n_heads, kv_group, seqlen_q, seqlen_k,
    qk_scale2, sm_scale,
    seed, offset, drop_threshold, drop_scale,
    TUNE_SQ, TUNE_SK,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DROP_ALIGNED4: tl.constexpr,            # dropout rows start on Philox blocks (Sk, offset multiples of 4)
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = _sequence_bounds(CuSeqQ, CuSeqK, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // kv_group).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    t_rows = (q_start + rows).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dvr = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + t_rows[:, None] * stride_qs + d[None, :],
                mask=row_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + t_rows[:, None] * stride_dos + dvr[None, :],
                 mask=row_ok[:, None] & (dvr < HEAD_DIM_V)[None, :], other=0.0)
    lse2 = _bwd_lse2(LSE + b64 * stride_lb + h64 * stride_lh + t_rows * stride_ls, row_ok)
    delta = tl.load(Delta + b64 * stride_db + h64 * stride_dh + t_rows * stride_ds, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_ks
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vs
    mask_base = Mask + b64 * stride_mb + h64 * stride_mh
    kpm_base = KPM + b64 * stride_pb
    drop_rows = rows.to(tl.int64)
    if HAS_DROPOUT:
        drop_rows = _dropout_row_index(DropBase, b, h, rows.to(tl.int64), q_len, k_len, n_heads,
                                       seqlen_q, seqlen_k, offset, VARLEN)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum(k_len, m0 + BLOCK_M)
        full_end = tl.minimum(k_len, m0 + 1)
    else:
        hi = k_len
        full_end = k_len
    full_end = (full_end // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, mask_base, kpm_base, rows, start_n, q_len, k_len,
                          stride_ks, stride_vs, stride_mq, stride_mk, qk_scale2, seed, drop_rows, drop_threshold,
                          drop_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, False, CAUSAL, HAS_MASK,
                          HAS_KPM, HAS_DROPOUT, DROP_ALIGNED4, DOT_PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, mask_base, kpm_base, rows, start_n, q_len, k_len,
                          stride_ks, stride_vs, stride_mq, stride_mk, qk_scale2, seed, drop_rows, drop_threshold,
                          drop_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, True, CAUSAL, HAS_MASK,
                          HAS_KPM, HAS_DROPOUT, DROP_ALIGNED4, DOT_PRECISION)
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + t_rows[:, None] * stride_dqs + d[None, :],
             round_to(dq * sm_scale, DQ.dtype.element_ty), mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])


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
        # Every row of P starts on a Philox block: one block serves four neighbouring keys.
        self.drop_aligned4 = self.has_dropout and not varlen and self.Sk % 4 == 0 and self.offset % 4 == 0
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
                    HAS_KPM=self.kpm is not None, HAS_DROPOUT=self.has_dropout, DROP_ALIGNED4=self.drop_aligned4,
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
