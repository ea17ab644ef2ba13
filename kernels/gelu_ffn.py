"""The Transformer feed-forward block ``Linear -> +b1 -> GELU -> Linear -> +b2 -> dropout`` in Triton,
forward and backward, as matmuls with fused prologues and epilogues.

Math
----
Rows ``x`` (M, C); weights in the ``nn.Linear`` layout ``w1`` (F, C), ``w2`` (C2, F):

    pre = x w1^T + b1                     (M, F)
    g   = gelu(pre)                       gelu(u) = u Phi(u) = 0.5 u (1 + erf(u / sqrt 2))       exact
                                                  ~ 0.5 u (1 + tanh(k (u + 0.044715 u^3))), k = sqrt(2/pi)
    y   = dropout(g w2^T + b2)            (M, C2); dropout element n = m * C2 + c (fusedformer.rng)

Backward (vector-Jacobian product), with ``Z`` the dropout multiplier:

    dz   = dy * Z                         db2 = sum_m dz        dW2 = dz^T g
    dpre = (dz w2) * gelu'(pre)           db1 = sum_m dpre      dW1 = dpre^T x      dx = dpre w1
    gelu'(u) = Phi(u) + u phi(u)                                                         exact
             = 0.5 (1 + t) + 0.5 u (1 - t^2) k (1 + 3 * 0.044715 u^2),  t = tanh(...)      'tanh'

What is fused (one kernel launch per product):
* forward ``x w1^T``: epilogue adds ``b1``, writes ``pre``, applies GELU and writes ``g``;
* forward ``g w2^T``: epilogue adds ``b2`` and applies dropout (mask generated from the seed);
* backward ``dz w2``: epilogue multiplies by ``gelu'(pre)`` (``pre`` read tile by tile) -> ``dpre``;
* backward ``dz^T g``: ``g = gelu(pre)`` is recomputed while loading ``pre``'s tiles (prologue),
  and ``db2`` is the column sum of the ``dz`` tiles this product already loads;
* backward ``dpre^T x``: ``db1`` likewise from the ``dpre`` tiles (no extra pass over activations);
* backward ``dpre w1``: a plain matmul.
With dropout, ``dz`` is written once by an elementwise kernel (regenerating the mask inside each
of the two products that read ``dz`` would redo the RNG once per output tile).

Saved for the backward: the pre-activation ``pre`` (M, F), not recomputed. Recomputing it would
cost a third matmul (``x w1^T``, as many FLOPs as either forward product) to save one (M, F)
tensor; GELU itself is cheap, so ``g`` is *not* saved — the backward recomputes it from ``pre``
inside the ``dW2`` product.

Numerics: float32 accumulation (``tl.dot``; IEEE float32 products, no TF32, for float32 inputs);
``pre``, ``g`` and ``y`` are rounded to the input dtype where the reference rounds them (GELU is
applied to the rounded ``pre``, dropout to the rounded ``y``).

Limits: float16 / bfloat16 / float32; ``x`` contiguous (M, C); any M, C, F, C2 >= 1.

Strategies: ``_gemm_epilogue`` (a tiled matmul, grouped tile order for L2 reuse, with the epilogue
chosen by ``EPILOGUE``) and ``_gemm_wgrad`` (weight gradients: reduction over the M rows, with
the fused bias gradient and optional GELU prologue).

References: Hendrycks & Gimpel, "Gaussian Error Linear Units (GELUs)" (2016); Triton tutorial 03
(matrix multiplication, grouped ordering).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _configs as _cfg
from ._common import (autotune_enabled, device_function, dot_precision, drop_rows_aligned, dropout_constants,
                      dropout_keep_rows, interpreting, mma, round_to, seed_value)

_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_INV_SQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))


# ------------------------------------------------------------------------------------------------
# autotuning configurations
# ------------------------------------------------------------------------------------------------
def _gemm_configs():
    """Every tile _configs names for ``_gemm_epilogue`` on any GPU; ``_prune_gemm`` picks."""
    if interpreting():
        m, n, k, _, w = _cfg.INTERPRETER_GEMM
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 2}, num_warps=w)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in _cfg.union(*_cfg.GEMM.values())]


def _wgrad_configs():
    """Every tile _configs names for ``_gemm_wgrad``; ``_prune_wgrad`` picks."""
    if interpreting():
        p, q, r, _, w = _cfg.INTERPRETER_GEMM
        return [triton.Config({"BLOCK_P": p, "BLOCK_Q": q, "BLOCK_R": r, "GROUP_P": 2}, num_warps=w)]
    return [triton.Config({"BLOCK_P": p, "BLOCK_Q": q, "BLOCK_R": r, "GROUP_P": 8}, num_stages=s, num_warps=w)
            for p, q, r, s, w in _cfg.union(*_cfg.WGRAD.values())]


def _gemm_tile(c):
    k = c.kwargs
    return (k.get("BLOCK_M", k.get("BLOCK_P")), k.get("BLOCK_N", k.get("BLOCK_Q")), k.get("BLOCK_K", k.get("BLOCK_R")),
            c.num_stages, c.num_warps)


def _keep_fitting(configs, tiles, a):
    """The tiles of ``tiles`` (in order) whose pipelined operand tiles fit the GPU's shared memory
    (read from the device, or the ahead-of-time target's table); the first only with autotuning off."""
    limit = _cfg.smem_limit(a.device)
    kept = _cfg.select(configs, tiles, _gemm_tile, lambda c: _cfg.gemm_smem(_gemm_tile(c), a.element_size()), limit)
    return kept if autotune_enabled() else kept[:1]


def _prune_gemm(configs, named_args, **kwargs):
    a = named_args["A"]
    tiles = _cfg.gemm_tiles(_cfg.device_arch(a.device), a.dtype, kwargs["EPILOGUE"], kwargs["HAS_DROPOUT"])
    return _keep_fitting(configs, tiles, a)


def _prune_wgrad(configs, named_args, **kwargs):
    a = named_args["A"]
    return _keep_fitting(configs, _cfg.wgrad_tiles(_cfg.device_arch(a.device), a.dtype, kwargs["B_GELU"]), a)


# ------------------------------------------------------------------------------------------------
# GELU and its derivative (float32 in, float32 out)
# ------------------------------------------------------------------------------------------------
@device_function
def _tanh(z):
    # tanh(z) = 2 sigmoid(2z) - 1; saturates correctly to +-1 as exp over/underflows
    return 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0


@device_function
def _gelu(u, TANH: tl.constexpr):
    if TANH:
        return 0.5 * u * (1.0 + _tanh((u + 0.044715 * u * u * u) * _SQRT_2_OVER_PI))
    else:
        return 0.5 * u * (1.0 + tl.erf(u * _INV_SQRT_2))


@device_function
def _gelu_grad(u, TANH: tl.constexpr):
    if TANH:
        t = _tanh((u + 0.044715 * u * u * u) * _SQRT_2_OVER_PI)
        return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * (1.0 + 3.0 * 0.044715 * u * u) * _SQRT_2_OVER_PI
    else:
        return 0.5 * (1.0 + tl.erf(u * _INV_SQRT_2)) + u * tl.exp(-0.5 * u * u) * _INV_SQRT_2PI


@device_function
def _grouped_tile(pid, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """Tile coordinates of program ``pid`` in grouped order: GROUP row-tiles sweep the columns
    together, so the operand tiles they share stay in L2."""
    n_r = tl.cdiv(rows, BLOCK_R)
    n_c = tl.cdiv(cols, BLOCK_C)
    per_group = GROUP * n_c
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_r - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


# ------------------------------------------------------------------------------------------------
# C = A B (+ epilogue)
# ------------------------------------------------------------------------------------------------
@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "EPILOGUE", "TANH", "HAS_BIAS", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _gemm_epilogue(
    A,               # (M, K) left operand, read through (stride_am, stride_ak)
    Bm,              # (K, N) right operand, read through (stride_bk, stride_bn) (W^T of a Linear)
    Bias,            # (N,) added in the epilogue if HAS_BIAS
    Aux,             # (M, N) contiguous: the pre-activation, for EPILOGUE == "gelu_grad"
    C,               # (M, N) contiguous output ("gelu": the pre-activation)
    C2,              # (M, N) contiguous second output ("gelu": the activation)
    M, N, K,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    seed, offset, drop_threshold, drop_scale,
    EPILOGUE: tl.constexpr,       # "none", "gelu", "dropout" or "gelu_grad"
    TANH: tl.constexpr,           # tanh approximation of GELU instead of erf
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DROP_ALIGNED: tl.constexpr,   # N and offset multiples of 8: one Philox block per eight outputs
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = Bm + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=(rows < M)[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (cols < N)[None, :], other=0.0)
        acc = mma(a, b, acc, DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_ty = C.dtype.element_ty
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == "gelu":
        pre = round_to(acc, out_ty)
        tl.store(C + offs, pre, mask=mask)
        tl.store(C2 + offs, round_to(_gelu(pre.to(tl.float32), TANH), out_ty), mask=mask)
    elif EPILOGUE == "dropout":
        y = round_to(acc, out_ty)
        if HAS_DROPOUT:
            keep = dropout_keep_rows(seed, offset + rows * N, pid_n * BLOCK_N, drop_threshold, BLOCK_N,
                                     DROP_ALIGNED, False)
            y = round_to(tl.where(keep, y.to(tl.float32) * drop_scale, 0.0), out_ty)
        tl.store(C + offs, y, mask=mask)
    elif EPILOGUE == "gelu_grad":
        pre = tl.load(Aux + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(C + offs, round_to(acc * _gelu_grad(pre, TANH), out_ty), mask=mask)
    else:
        tl.store(C + offs, round_to(acc, out_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# weight gradients: C = A^T B over the R rows (+ column sums of A, + GELU on B's tiles)
# ------------------------------------------------------------------------------------------------
@triton.autotune(configs=_wgrad_configs(), key=["P", "Q", "R", "B_GELU", "TANH", "BIAS_GRAD"],
                 prune_configs_by={"early_config_prune": _prune_wgrad})
@triton.jit
def _gemm_wgrad(
    A,               # (R, P) contiguous: the output-side gradient (dz or dpre)
    Bm,              # (R, Q) contiguous: the input side (pre, turned into gelu(pre), or x)
    C,               # (P, Q) contiguous weight gradient
    DBias,           # (P,) bias gradient = sum_r A[r, :] (written if BIAS_GRAD)
    P, Q, R,
    B_GELU: tl.constexpr,         # apply GELU to B's tiles as they are loaded
    TANH: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_P: tl.constexpr,
):
    pid_p, pid_q = _grouped_tile(tl.program_id(0), P, Q, BLOCK_P, BLOCK_Q, GROUP_P)
    ps = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    qs = (pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    rs = tl.arange(0, BLOCK_R).to(tl.int64)
    at_ptrs = A + rs[None, :] * P + ps[:, None]           # (BLOCK_P, BLOCK_R) tile of A^T
    b_ptrs = Bm + rs[:, None] * Q + qs[None, :]           # (BLOCK_R, BLOCK_Q) tile of B
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    colsum = tl.zeros([BLOCK_P], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rs) < R
        at = tl.load(at_ptrs, mask=(ps < P)[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=r_ok[:, None] & (qs < Q)[None, :], other=0.0)
        if B_GELU:
            b = round_to(_gelu(b.to(tl.float32), TANH), at.dtype)
        acc = mma(at, b, acc, DOT_PRECISION)
        if BIAS_GRAD:
            if pid_q == 0:       # one column of programs reduces the bias gradient
                colsum += tl.sum(at.to(tl.float32), axis=1)
        at_ptrs += BLOCK_R * P
        b_ptrs += BLOCK_R * Q
    mask = (ps < P)[:, None] & (qs < Q)[None, :]
    tl.store(C + ps[:, None] * Q + qs[None, :], round_to(acc, C.dtype.element_ty), mask=mask)
    if BIAS_GRAD:
        if pid_q == 0:
            tl.store(DBias + ps, round_to(colsum, DBias.dtype.element_ty), mask=ps < P)


@triton.jit
def _dropout_scale(
    X,               # (numel,) contiguous input (dy)
    Y,               # (numel,) output (dz = dy * Z)
    numel,
    seed, offset, drop_threshold, drop_scale,
    BLOCK: tl.constexpr,
    DROP_ALIGNED: tl.constexpr,   # offset a multiple of 8
):
    first = tl.program_id(0).to(tl.int64) * BLOCK
    offs = first + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    one_row = tl.zeros([1], dtype=tl.int64) + offset + first
    keep = tl.reshape(dropout_keep_rows(seed, one_row, 0, drop_threshold, BLOCK, DROP_ALIGNED, False), [BLOCK])
    tl.store(Y + offs, round_to(tl.where(keep, x * drop_scale, 0.0), Y.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
def _gemm(a, b_t, bias, aux, out, out2, *, epilogue, tanh=False, dropout=(0, 1.0, 0, 0)):
    """out = a @ b_t (+ epilogue); ``b_t`` is (K, N), any strides."""
    M, K = a.shape
    N = b_t.shape[1]
    threshold, scale, seed, offset = dropout
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemm_epilogue[grid](
        a, b_t, bias if bias is not None else out, aux if aux is not None else out, out,
        out2 if out2 is not None else out,
        M, N, K, a.stride(0), a.stride(1), b_t.stride(0), b_t.stride(1),
        seed, offset, threshold, scale,
        EPILOGUE=epilogue, TANH=tanh, HAS_BIAS=bias is not None, HAS_DROPOUT=threshold > 0,
        DROP_ALIGNED=threshold > 0 and drop_rows_aligned(N, offset),
        DOT_PRECISION=dot_precision(a.dtype))


def _wgrad(a, b, out, dbias, *, b_gelu=False, tanh=False):
    """out = a^T @ b over rows; dbias = column sums of a (if given)."""
    R, P = a.shape
    Q = b.shape[1]
    grid = lambda meta: (triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(Q, meta["BLOCK_Q"]),)  # noqa: E731
    _gemm_wgrad[grid](a, b, out, dbias if dbias is not None else out, P, Q, R,
                      B_GELU=b_gelu, TANH=tanh, BIAS_GRAD=dbias is not None,
                      DOT_PRECISION=dot_precision(a.dtype))


def gelu_ffn_fwd(
    x: torch.Tensor,                    # (M, C) input rows
    w1: torch.Tensor,                   # (F, C) first linear weight
    b1: Optional[torch.Tensor],         # (F,) or None
    w2: torch.Tensor,                   # (C2, F) second linear weight
    b2: Optional[torch.Tensor],         # (C2,) or None
    approximate: str,                   # 'none' (erf) or 'tanh'
    dropout_p: float,                   # dropout on the output
    seed: Optional[torch.Tensor],       # (1,) int64 CPU tensor, or None without dropout
    offset: int,                        # dropout counter offset
):
    """Returns ``(y (M, C2), pre (M, F))`` like ``fusedformer.reference.gelu_ffn_fwd``."""
    x = x.contiguous()
    M = x.shape[0]
    F, C2 = w1.shape[0], w2.shape[0]
    tanh = approximate == "tanh"
    pre = x.new_empty(M, F)
    g = x.new_empty(M, F)
    _gemm(x, w1.t(), b1, None, pre, g, epilogue="gelu", tanh=tanh)
    y = x.new_empty(M, C2)
    threshold, scale = dropout_constants(dropout_p)
    _gemm(g, w2.t(), b2, None, y, None, epilogue="dropout",
          dropout=(threshold, scale, seed_value(seed), int(offset)))
    return y, pre


def gelu_ffn_bwd(
    dy: torch.Tensor,                   # (M, C2) gradient of y
    x: torch.Tensor,                    # (M, C)
    w1: torch.Tensor,                   # (F, C)
    w2: torch.Tensor,                   # (C2, F)
    pre: torch.Tensor,                  # (M, F) saved pre-activation
    approximate: str,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    offset: int,
    has_b1: bool,
    has_b2: bool,
):
    """Returns ``(dx, dw1, db1 or empty, dw2, db2 or empty)`` like the reference."""
    dy, x, pre = dy.contiguous(), x.contiguous(), pre.contiguous()
    w1, w2 = w1.contiguous(), w2.contiguous()
    M, C = x.shape
    F, C2 = w1.shape[0], w2.shape[0]
    tanh = approximate == "tanh"
    dz = dy
    if dropout_p > 0.0:
        threshold, scale = dropout_constants(dropout_p)
        dz = torch.empty_like(dy)
        block = 1024
        _dropout_scale[(triton.cdiv(dy.numel(), block),)](
            dy, dz, dy.numel(), seed_value(seed), int(offset), threshold, scale, BLOCK=block,
            DROP_ALIGNED=drop_rows_aligned(block, offset))
    dpre = x.new_empty(M, F)
    _gemm(dz, w2, None, pre, dpre, None, epilogue="gelu_grad", tanh=tanh)
    dw2 = torch.empty_like(w2)
    db2 = dy.new_empty(C2) if has_b2 else dy.new_empty(0)
    _wgrad(dz, pre, dw2, db2 if has_b2 else None, b_gelu=True, tanh=tanh)
    dw1 = torch.empty_like(w1)
    db1 = x.new_empty(F) if has_b1 else x.new_empty(0)
    _wgrad(dpre, x, dw1, db1 if has_b1 else None)
    dx = torch.empty_like(x)
    _gemm(dpre, w1, None, None, dx, None, epilogue="none")
    return dx, dw1, db1, dw2, db2
