"""The attention forward kernel (FlashAttention-2; the math and the algorithm are in
``attention.py``'s header): one program per (query block, head, batch) streams K/V tiles through
an online softmax in float32 and writes the output and the log-sum-exp."""
from __future__ import annotations

import triton
import triton.language as tl

from ._attention_common import (_FWD_TUNE_KEY, _LN2, _autotune_configs, _dropout_row_index, _key_range,
                                _masked_score, _program_block, _pruner, _set_descriptor_blocks)
from ._common import device_function, dropout_keep_rows, mma, round_to


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
    DROP_ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
        keep = dropout_keep_rows(seed, drop_rows, start_n, drop_threshold, BLOCK_N, DROP_ALIGNED, False)
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
    DROP_ALIGNED: tl.constexpr,             # dropout rows start on Philox blocks (Sk, offset multiples of 8)
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,       # stream K/V with the tensor memory accelerator (Hopper and newer)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m0, h, b, q_start, q_len, k_start, k_len = _program_block(CuSeqQ, CuSeqK, seqlen_q, seqlen_k, BLOCK_M, VARLEN)
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
    full_end, hi = _key_range(m0, k_len, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, full_end, BLOCK_N):
        kt, v = _fwd_load_kv(k_base, v_base, KDesc, VDesc, b, hk, k_start, start_n, k_len, stride_ks, stride_vs,
                             HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, TMA, VARLEN)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, kt, v, mask_base, kpm_base, rows, start_n, q_len, k_len,
                                  stride_mq, stride_mk, qk_scale2, seed, drop_rows, drop_threshold, BLOCK_N,
                                  False, CAUSAL, HAS_MASK, HAS_KPM, HAS_DROPOUT, DROP_ALIGNED, DOT_PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        kt, v = _fwd_load_kv(k_base, v_base, KDesc, VDesc, b, hk, k_start, start_n, k_len, stride_ks, stride_vs,
                             HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, TMA, VARLEN)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, kt, v, mask_base, kpm_base, rows, start_n, q_len, k_len,
                                  stride_mq, stride_mk, qk_scale2, seed, drop_rows, drop_threshold, BLOCK_N,
                                  True, CAUSAL, HAS_MASK, HAS_KPM, HAS_DROPOUT, DROP_ALIGNED, DOT_PRECISION)

    empty = l_i == 0.0                           # every key masked: output 0, lse -inf
    out = acc * (drop_scale / tl.where(empty, 1.0, l_i))[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    dv = tl.arange(0, BLOCK_DV)
    o_ptrs = Out + b64 * stride_ob + h64 * stride_oh + (q_start + rows).to(tl.int64)[:, None] * stride_os + dv[None, :]
    tl.store(o_ptrs, round_to(out, Out.dtype.element_ty), mask=row_ok[:, None] & (dv < HEAD_DIM_V)[None, :])
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + (q_start + rows).to(tl.int64) * stride_ls, lse, mask=row_ok)
