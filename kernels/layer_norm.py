"""LayerNorm and RMSNorm fused with dropout and a residual add, forward and backward, in Triton.

Math
----
For each row ``m`` of the ``(M, N)`` input ``x`` (``n = m * N + c`` indexes dropout, see
``fusedformer.rng``):

    h     = round(round(dropout(x)) + residual)       each term optional; rounded to x's dtype
                                                      after each step, exactly as the reference
    mean  = (1/N) sum_c h_c                           (LayerNorm only)
    rstd  = 1 / sqrt((1/N) sum_c (h_c - mean)^2 + eps)     LayerNorm (biased variance)
          = 1 / sqrt((1/N) sum_c h_c^2 + eps)              RMSNorm (mean = 0 below)
    xhat  = (h - mean) * rstd
    y     = xhat * w + b

Backward (vector-Jacobian product), with ``g = dy * w``:

    dh    = rstd * (g - xhat * mean_c(g * xhat) - mean_c(g))   (RMSNorm drops the last term)
          + dh_out                                     (gradient of the returned pre-norm sum)
    dx    = dh * dropout_multiplier,   dresidual = dh
    dw    = sum_m dy * xhat,           db = sum_m dy

What is fused: dropout (the mask is generated in the kernel from the seed, never stored), the
residual add, the statistics and the affine transform in one pass over the row in the forward;
``dh``, ``dx`` and per-program partial sums of ``dw``/``db`` in one pass in the backward.
``dw``/``db`` are reduced deterministically in two stages: each program accumulates its rows in
float32 registers and writes one row of a ``(G, N)`` float32 buffer; a second kernel sums the
``G`` rows in a fixed order (no atomics, bit-reproducible run to run).

What is saved for the backward: ``h`` (only when it differs from ``x``; else ``x`` itself),
``mean`` and ``rstd`` (float32, per row). Statistics are always float32.

Strategies:
* ``_rows``: a whole row (``N <= ROWS_MAX_WIDTH``) lives in registers; ``BLOCK_M`` rows per
  program, so narrow rows still give each program enough work.
* ``_chunked``: wider rows are walked in ``BLOCK_N`` chunks. The forward merges per-lane Welford
  statistics (Chan et al.'s parallel update) in the first pass — writing ``h`` as it goes — and
  normalizes in a second pass that re-reads ``h`` (or ``x``). The backward first computes the
  two row means ``mean(g * xhat)``, ``mean(g)`` (``_row_sums`` kernel), then a 2-D grid of
  (row group, chunk) programs.

Limits: x float16 / bfloat16 / float32, contiguous ``(M, N)``, any ``N >= 1`` (tested to 65536
on GPU, see docs/triton_kernels.md); weight/bias x's dtype or float32.

References: Ba et al., "Layer Normalization" (2016); Zhang & Sennrich, "Root Mean Square Layer
Normalization" (2019); Chan, Golub & LeVeque, "Updating formulae and a pairwise algorithm for
computing sample variances" (1979); Triton tutorial 05 (layer norm) for the two-stage weight
gradient idea.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _configs as _cfg
from ._common import (autotune_enabled, device_function, drop_rows_aligned, dropout_constants, dropout_keep_rows,
                      interpreting, next_pow2, num_sms, round_to, seed_value)

# Widest row kept whole in registers (the `_rows` strategy); wider rows use `_chunked`. Read at
# call time (tests lower it to reach the chunked path with small shapes).
ROWS_MAX_WIDTH = 8192
# Target elements per program of the `_rows` strategy (sets rows per program for narrow rows).
ROWS_TILE_ELEMS = 4096


# ------------------------------------------------------------------------------------------------
# autotuning configurations (one small configuration under the interpreter: nothing to time there)
# ------------------------------------------------------------------------------------------------
def _rows_configs():
    if interpreting():
        return [triton.Config({}, num_warps=1)]
    return [triton.Config({}, num_warps=w) for w in _cfg.ROWS_WARPS["fwd"]]


def _rows_pruner(direction):
    """``early_config_prune`` of the `_rows` kernels: the warp counts _configs admits for this tile
    (``direction``: "fwd" or "bwd"), in its preference order; the first only with autotuning off."""
    def prune(configs, named_args, **kwargs):
        warps = _cfg.rows_warps(direction, kwargs["BLOCK_M"] * kwargs["BLOCK_N"])
        by_warps = {c.num_warps: c for c in configs}
        kept = [by_warps[w] for w in warps if w in by_warps] or configs[:1]
        return kept if autotune_enabled() else kept[:1]
    return prune


def _prune_chunks(configs, named_args, **kwargs):
    return configs if autotune_enabled() else configs[:1]


def _chunk_configs():
    if interpreting():
        bn, w = _cfg.INTERPRETER_CHUNK
        return [triton.Config({"BLOCK_N": bn}, num_warps=w)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in _cfg.CHUNKS]


# ------------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------------
@device_function
def _keep(
    seed,
    row_first,                  # offset + m * N for each row of the tile (a scalar when not ROWS)
    start,                      # first column of the tile
    threshold,
    BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr,      # N and offset multiples of 8: one Philox block per eight elements
    ROWS: tl.constexpr,         # a (rows, BLOCK_N) tile; else one row's (BLOCK_N,) chunk
):
    """Dropout keep-mask of the tile of elements ``row_first + start + c``."""
    if ROWS:
        return dropout_keep_rows(seed, row_first, start, threshold, BLOCK_N, ALIGNED, False)
    else:
        one_row = tl.zeros([1], dtype=tl.int64) + row_first
        return tl.reshape(dropout_keep_rows(seed, one_row, start, threshold, BLOCK_N, ALIGNED, False), [BLOCK_N])


@device_function
def _prenorm_sum(
    X,               # (M, N) input rows
    R,               # (M, N) residual rows (read only if HAS_RESIDUAL)
    offs,            # int64 tile of linear element indices m * N + c
    mask,            # tile of valid elements
    keep,            # tile of dropout keep flags (read only if HAS_DROPOUT)
    drop_scale,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    """h = round(round(dropout(x)) + residual) as float32 (zero where masked)."""
    x = tl.load(X + offs, mask=mask, other=0.0)
    h = x.to(tl.float32)
    if HAS_DROPOUT:
        h = round_to(tl.where(keep, h * drop_scale, 0.0), x.dtype).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + offs, mask=mask, other=0.0)
        h = round_to(h + r.to(tl.float32), x.dtype).to(tl.float32)
    return h


@triton.jit
def _sum_partials(
    Part,            # (G, N) float32 per-program partial sums
    Out,             # (N,) result, in its own dtype
    G,               # rows of Part
    N,               # columns
    BLOCK_N: tl.constexpr,
):
    """Out[c] = sum_g Part[g, c], summed in a fixed order (deterministic)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g in range(0, G):
        acc += tl.load(Part + g * N + cols, mask=mask, other=0.0)
    tl.store(Out + cols, round_to(acc, Out.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------
@triton.autotune(configs=_rows_configs(), key=["N", "BLOCK_M", "BLOCK_N"],
                 prune_configs_by={"early_config_prune": _rows_pruner("fwd")})
@triton.jit
def _layer_norm_fwd_rows(
    X,               # (M, N) input rows
    R,               # (M, N) residual
    W,               # (N,) weight
    B,               # (N,) bias
    Y,               # (M, N) output
    Hout,            # (M, N) pre-norm sum (written if STORE_H)
    Mean,            # (M,) float32 row means (written unless RMS)
    Rstd,            # (M,) float32 reciprocal standard deviations
    M, N,
    eps,
    seed, offset, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DROP_ALIGNED: tl.constexpr,   # N and offset multiples of 8 (see _keep)
    STORE_H: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    keep = mask
    if HAS_DROPOUT:
        keep = _keep(seed, offset + rows * N, 0, drop_threshold, BLOCK_N, DROP_ALIGNED, True)
    h = _prenorm_sum(X, R, offs, mask, keep, drop_scale, HAS_RESIDUAL, HAS_DROPOUT)
    if STORE_H:
        tl.store(Hout + offs, round_to(h, Hout.dtype.element_ty), mask=mask)
    if RMS:
        centered = h
    else:
        mean = tl.sum(h, axis=1) / N
        # refined once (as the reference): a float32 row sum rounds, and a constant row's mean
        # would be off by an ulp, which BERT's eps = 1e-12 blows up to O(1) in y
        mean += tl.sum(tl.where(mask, h - mean[:, None], 0.0), axis=1) / N
        centered = tl.where(mask, h - mean[:, None], 0.0)
        tl.store(Mean + rows, mean, mask=row_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / N + eps)
    tl.store(Rstd + rows, rstd, mask=row_ok)
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, round_to(y, Y.dtype.element_ty), mask=mask)


@triton.autotune(configs=_chunk_configs(), key=["N"],
                 prune_configs_by={"early_config_prune": _prune_chunks})
@triton.jit
def _layer_norm_fwd_chunked(
    X,               # (M, N) input rows
    R,               # (M, N) residual
    W,               # (N,) weight
    B,               # (N,) bias
    Y,               # (M, N) output
    Hout,            # (M, N) pre-norm sum (written if STORE_H, re-read by the second pass)
    Mean,            # (M,) float32
    Rstd,            # (M,) float32
    M, N,
    eps,
    seed, offset, drop_threshold, drop_scale,
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DROP_ALIGNED: tl.constexpr,   # N and offset multiples of 8 (see _keep)
    STORE_H: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    lanes = tl.arange(0, BLOCK_N)
    # Pass 1: h chunk by chunk; each lane keeps Welford statistics of the elements it saw.
    count = tl.zeros([BLOCK_N], dtype=tl.float32)
    mu = tl.zeros([BLOCK_N], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_N], dtype=tl.float32)       # sum of squared deviations (RMS: of squares)
    for start in range(0, N, BLOCK_N):
        cols = start + lanes
        mask = cols < N
        keep = mask
        if HAS_DROPOUT:
            keep = _keep(seed, offset + base, start, drop_threshold, BLOCK_N, DROP_ALIGNED, False)
        h = _prenorm_sum(X, R, base + cols, mask, keep, drop_scale, HAS_RESIDUAL, HAS_DROPOUT)
        if STORE_H:
            tl.store(Hout + base + cols, round_to(h, Hout.dtype.element_ty), mask=mask)
        if RMS:
            m2 += h * h
        else:
            count_new = count + mask.to(tl.float32)
            delta = h - mu
            mu = tl.where(mask, mu + delta / tl.maximum(count_new, 1.0), mu)
            m2 = tl.where(mask, m2 + delta * (h - mu), m2)
            count = count_new
    # Merge the lanes: total mean, then M2 = sum_j m2_j + count_j * (mu_j - mean)^2.
    if RMS:
        mean = 0.0
        var = tl.sum(m2, axis=0) / N
    else:
        mean = tl.sum(count * mu, axis=0) / N
        mean += tl.sum(count * (mu - mean), axis=0) / N   # refined once, as in the row-wise kernel
        spread = mu - mean
        var = (tl.sum(m2, axis=0) + tl.sum(count * spread * spread, axis=0)) / N
        tl.store(Mean + row, mean)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Rstd + row, rstd)
    # Pass 2: normalize. Each element is re-read by the thread that wrote it (same tile layout);
    # the barrier makes that explicit.
    tl.debug_barrier()
    for start in range(0, N, BLOCK_N):
        cols = start + lanes
        mask = cols < N
        if STORE_H:
            h = tl.load(Hout + base + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            h = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
        y = (h - mean) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + base + cols, round_to(y, Y.dtype.element_ty), mask=mask)


def _drop_aligned(dropout_p: float, N: int, offset: int) -> bool:
    """Every row of dropout indices starts on a Philox block (see ``_common.philox_draw_rows``)."""
    return dropout_p > 0.0 and drop_rows_aligned(N, offset)


def layer_norm_fwd(
    x: torch.Tensor,                    # (M, N) input rows, contiguous
    residual: Optional[torch.Tensor],   # (M, N) added after dropout, or None
    weight: Optional[torch.Tensor],     # (N,) scale, or None
    bias: Optional[torch.Tensor],       # (N,) shift, or None
    eps: float,
    dropout_p: float,                   # dropout on x, before the residual add
    seed: Optional[torch.Tensor],       # (1,) int64 CPU tensor, or None without dropout
    offset: int,                        # dropout counter offset
    rms: bool,                          # RMSNorm instead of LayerNorm
):
    """Returns ``(y (M, N), h (M, N) or empty, mean (M,) float32 or empty, rstd (M,) float32)``,
    exactly the contract of ``fusedformer.reference.layer_norm_fwd``."""
    M, N = x.shape
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    store_h = residual is not None or dropout_p > 0.0
    y = torch.empty_like(x)
    h = torch.empty_like(x) if store_h else x.new_empty(0)
    mean = x.new_empty(0 if rms else M, dtype=torch.float32)
    rstd = x.new_empty(M, dtype=torch.float32)
    threshold, scale = dropout_constants(dropout_p)
    args = (x, residual if residual is not None else x, weight if weight is not None else x,
            bias if bias is not None else x, y, h if store_h else x, mean if not rms else rstd, rstd,
            M, N, float(eps), seed_value(seed), int(offset), threshold, scale)
    flags = dict(HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0.0,
                 DROP_ALIGNED=_drop_aligned(dropout_p, N, offset), STORE_H=store_h,
                 HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RMS=bool(rms))
    if N <= ROWS_MAX_WIDTH:
        block_n = next_pow2(N)
        block_m = max(1, min(64, ROWS_TILE_ELEMS // block_n))
        _layer_norm_fwd_rows[(triton.cdiv(M, block_m),)](*args, BLOCK_M=block_m, BLOCK_N=block_n, **flags)
    else:
        _layer_norm_fwd_chunked[(M,)](*args, **flags)
    return y, h, mean, rstd


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------
@triton.autotune(configs=_rows_configs(), key=["N", "BLOCK_M", "BLOCK_N"],
                 prune_configs_by={"early_config_prune": _rows_pruner("bwd")})
@triton.jit
def _layer_norm_bwd_rows(
    DY,              # (M, N) gradient of y
    DHin,            # (M, N) gradient of the returned pre-norm sum (read if HAS_DH_IN)
    Hs,              # (M, N) saved pre-norm sum (x itself when there was none)
    W,               # (N,) weight
    Mean,            # (M,) float32 (unused if RMS)
    Rstd,            # (M,) float32
    DH,              # (M, N) gradient of h (= the residual's gradient)
    DX,              # (M, N) gradient of x (written if HAS_DROPOUT)
    PartW,           # (G, N) float32 partial sums of dy * xhat, one row per program
    PartB,           # (G, N) float32 partial sums of dy
    M, N,
    seed, offset, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DH_IN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DROP_ALIGNED: tl.constexpr,   # N and offset multiples of 8 (see _keep)
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    RMS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for block in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * N + cols[None, :]
        h = tl.load(Hs + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        if RMS:
            xhat = h * rstd[:, None]
        else:
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        dh = g - xhat * (tl.sum(g * xhat, axis=1) / N)[:, None]
        if not RMS:
            dh -= (tl.sum(g, axis=1) / N)[:, None]
        dh = dh * rstd[:, None]
        if HAS_DH_IN:
            dh += tl.load(DHin + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DH + offs, round_to(dh, DH.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            keep = _keep(seed, offset + rows * N, 0, drop_threshold, BLOCK_N, DROP_ALIGNED, True)
            tl.store(DX + offs, round_to(tl.where(keep, dh * drop_scale, 0.0), DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            acc_dw += tl.sum(dy * xhat, axis=0)
        if COMPUTE_DB:
            acc_db += tl.sum(dy, axis=0)
    if COMPUTE_DW:
        tl.store(PartW + pid * N + cols, acc_dw, mask=col_ok)
    if COMPUTE_DB:
        tl.store(PartB + pid * N + cols, acc_db, mask=col_ok)


@triton.autotune(configs=_chunk_configs(), key=["N"],
                 prune_configs_by={"early_config_prune": _prune_chunks})
@triton.jit
def _layer_norm_bwd_row_sums(
    DY,              # (M, N) gradient of y
    Hs,              # (M, N) saved pre-norm sum
    W,               # (N,) weight
    Mean,            # (M,) float32
    Rstd,            # (M,) float32
    C1,              # (M,) float32 out: mean_c(g * xhat)
    C2,              # (M,) float32 out: mean_c(g)   (unused if RMS)
    N,
    BLOCK_N: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    RMS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    rstd = tl.load(Rstd + row)
    if RMS:
        mean = 0.0
    else:
        mean = tl.load(Mean + row)
    sum_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        h = tl.load(Hs + base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
        sum_gx += g * xhat
        sum_g += g
    tl.store(C1 + row, tl.sum(sum_gx, axis=0) / N)
    if not RMS:
        tl.store(C2 + row, tl.sum(sum_g, axis=0) / N)


@triton.autotune(configs=_chunk_configs(), key=["N"],
                 prune_configs_by={"early_config_prune": _prune_chunks})
@triton.jit
def _layer_norm_bwd_chunked(
    DY,              # (M, N) gradient of y
    DHin,            # (M, N) gradient of the returned pre-norm sum (read if HAS_DH_IN)
    Hs,              # (M, N) saved pre-norm sum
    W,               # (N,) weight
    Mean,            # (M,) float32
    Rstd,            # (M,) float32
    C1,              # (M,) float32 mean_c(g * xhat) from _layer_norm_bwd_row_sums
    C2,              # (M,) float32 mean_c(g)
    DH,              # (M, N) gradient of h
    DX,              # (M, N) gradient of x (written if HAS_DROPOUT)
    PartW,           # (G, N) float32 partial sums of dy * xhat
    PartB,           # (G, N) float32 partial sums of dy
    M, N,
    seed, offset, drop_threshold, drop_scale,
    BLOCK_N: tl.constexpr,
    HAS_DH_IN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DROP_ALIGNED: tl.constexpr,   # N and offset multiples of 8 (see _keep)
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    RMS: tl.constexpr,
):
    """Program (g, j): rows g, g + G, g + 2G, ... of column chunk j."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(pid, M, tl.num_programs(0)):
        offs = tl.cast(row, tl.int64) * N + cols
        h = tl.load(Hs + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        if RMS:
            xhat = h * rstd
        else:
            xhat = tl.where(mask, (h - tl.load(Mean + row)) * rstd, 0.0)
        if HAS_WEIGHT:
            g = dy * w
        else:
            g = dy
        dh = g - xhat * tl.load(C1 + row)
        if not RMS:
            dh -= tl.load(C2 + row)
        dh = dh * rstd
        if HAS_DH_IN:
            dh += tl.load(DHin + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DH + offs, round_to(dh, DH.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            keep = _keep(seed, offset + tl.cast(row, tl.int64) * N, tl.program_id(1) * BLOCK_N, drop_threshold,
                         BLOCK_N, DROP_ALIGNED, False)
            tl.store(DX + offs, round_to(tl.where(keep, dh * drop_scale, 0.0), DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            acc_dw += dy * xhat
        if COMPUTE_DB:
            acc_db += dy
    if COMPUTE_DW:
        tl.store(PartW + pid * N + cols, acc_dw, mask=mask)
    if COMPUTE_DB:
        tl.store(PartB + pid * N + cols, acc_db, mask=mask)


def layer_norm_bwd(
    dy: torch.Tensor,                   # (M, N) gradient of y
    dh_out: Optional[torch.Tensor],     # (M, N) gradient of the returned pre-norm sum, or None
    h: torch.Tensor,                    # (M, N) the pre-norm sum (x itself when there was none)
    weight: Optional[torch.Tensor],     # (N,)
    mean: torch.Tensor,                 # (M,) float32, empty for RMSNorm
    rstd: torch.Tensor,                 # (M,) float32
    dropout_p: float,
    seed: Optional[torch.Tensor],
    offset: int,
    rms: bool,
    has_bias: bool,
):
    """Returns ``(dh (M, N), dx (M, N) or empty, dweight (N,) or empty, dbias (N,) or empty)``,
    exactly the contract of ``fusedformer.reference.layer_norm_bwd``."""
    M, N = h.shape
    dy, h = dy.contiguous(), h.contiguous()
    dh_out = dh_out.contiguous() if dh_out is not None else None
    has_dropout = dropout_p > 0.0
    dh = torch.empty_like(h)
    dx = torch.empty_like(h) if has_dropout else h.new_empty(0)
    threshold, scale = dropout_constants(dropout_p)
    compute_dw, compute_db = weight is not None, bool(has_bias)
    wide = N > ROWS_MAX_WIDTH
    if wide:
        block_n = block_m = None
        n_row_blocks = M
    else:
        block_n = next_pow2(N)
        block_m = max(1, min(64, ROWS_TILE_ELEMS // block_n))
        n_row_blocks = triton.cdiv(M, block_m)
    groups = max(1, min(n_row_blocks, 2 * num_sms(h.device)))
    part_w = h.new_empty((groups, N), dtype=torch.float32) if compute_dw else rstd
    part_b = h.new_empty((groups, N), dtype=torch.float32) if compute_db else rstd
    flags = dict(HAS_DH_IN=dh_out is not None, HAS_WEIGHT=weight is not None, HAS_DROPOUT=has_dropout,
                 DROP_ALIGNED=_drop_aligned(dropout_p, N, offset),
                 COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, RMS=bool(rms))
    w_arg = weight if weight is not None else h
    mean_arg = mean if not rms else rstd
    common = (M, N, seed_value(seed), int(offset), threshold, scale)
    if not wide:
        _layer_norm_bwd_rows[(groups,)](
            dy, dh_out if dh_out is not None else dy, h, w_arg, mean_arg, rstd, dh,
            dx if has_dropout else dh, part_w, part_b, *common, BLOCK_M=block_m, BLOCK_N=block_n, **flags)
    else:
        c1 = h.new_empty(M, dtype=torch.float32)
        c2 = h.new_empty(M, dtype=torch.float32) if not rms else c1
        _layer_norm_bwd_row_sums[(M,)](dy, h, w_arg, mean_arg, rstd, c1, c2, N,
                                      HAS_WEIGHT=weight is not None, RMS=bool(rms))
        grid = lambda meta: (groups, triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _layer_norm_bwd_chunked[grid](
            dy, dh_out if dh_out is not None else dy, h, w_arg, mean_arg, rstd, c1, c2, dh,
            dx if has_dropout else dh, part_w, part_b, *common, **flags)
    reduce_block = min(1024, next_pow2(N))
    dweight = h.new_empty(0)
    dbias = h.new_empty(0)
    if compute_dw:
        dweight = torch.empty(N, dtype=weight.dtype, device=h.device)
        _sum_partials[(triton.cdiv(N, reduce_block),)](part_w, dweight, groups, N, BLOCK_N=reduce_block)
    if compute_db:
        dbias = torch.empty(N, dtype=dy.dtype if weight is None else weight.dtype, device=h.device)
        _sum_partials[(triton.cdiv(N, reduce_block),)](part_b, dbias, groups, N, BLOCK_N=reduce_block)
    return dh, dx, dweight, dbias
