"""The attention backward kernels (the vector-Jacobian product in ``attention.py``'s header):
``_bwd_delta`` (Delta = rowsum(dO * O)), ``_attention_bwd_dkdv`` (one program per key block and
K/V head, over the query blocks of every head of its GQA group) and ``_attention_bwd_dq`` (one
program per query block and head, over the key blocks). No atomics: deterministic."""
from __future__ import annotations

import triton
import triton.language as tl

from ._attention_common import (_LOG2E, _TUNE_KEY, _autotune_configs, _dropout_row_index, _key_range,
                                _masked_score, _program_block, _pruner)
from ._common import device_function, dropout_keep_rows, mma, round_to


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
    DROP_ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
                             DROP_ALIGNED, True)
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
    DROP_ALIGNED: tl.constexpr,             # dropout rows start on Philox blocks (Sk, offset multiples of 8)
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n0, hk, b, q_start, q_len, k_start, k_len = _program_block(CuSeqQ, CuSeqK, seqlen_q, seqlen_k, BLOCK_N, VARLEN)
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
                                    HAS_KPM, HAS_DROPOUT, DROP_ALIGNED, DOT_PRECISION)
        for start_m in range(full_start, q_len, BLOCK_M):
            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, cols, pad,
                                    n0, start_m, q_len, k_len, stride_qs, stride_dos, stride_ls, stride_ds,
                                    stride_mq, stride_mk, qk_scale2, seed, drop_base, drop_threshold, drop_scale,
                                    HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, False, CAUSAL, HAS_MASK,
                                    HAS_KPM, HAS_DROPOUT, DROP_ALIGNED, DOT_PRECISION)
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
    DROP_ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
        keep = dropout_keep_rows(seed, drop_rows, start_n, drop_threshold, BLOCK_N, DROP_ALIGNED, False)
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
    DROP_ALIGNED: tl.constexpr,             # dropout rows start on Philox blocks (Sk, offset multiples of 8)
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m0, h, b, q_start, q_len, k_start, k_len = _program_block(CuSeqQ, CuSeqK, seqlen_q, seqlen_k, BLOCK_M, VARLEN)
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
    full_end, hi = _key_range(m0, k_len, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, mask_base, kpm_base, rows, start_n, q_len, k_len,
                          stride_ks, stride_vs, stride_mq, stride_mk, qk_scale2, seed, drop_rows, drop_threshold,
                          drop_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, False, CAUSAL, HAS_MASK,
                          HAS_KPM, HAS_DROPOUT, DROP_ALIGNED, DOT_PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, mask_base, kpm_base, rows, start_n, q_len, k_len,
                          stride_ks, stride_vs, stride_mq, stride_mk, qk_scale2, seed, drop_rows, drop_threshold,
                          drop_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, True, CAUSAL, HAS_MASK,
                          HAS_KPM, HAS_DROPOUT, DROP_ALIGNED, DOT_PRECISION)
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + t_rows[:, None] * stride_dqs + d[None, :],
             round_to(dq * sm_scale, DQ.dtype.element_ty), mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])
