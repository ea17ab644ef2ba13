"""Shared by the attention kernels (``attention_fwd.py``, ``attention_bwd.py``): constants of the
masking rule, the autotuning configurations and pruners (tiles from ``_configs.py``), and the device
helpers both directions use (sequence bounds, dropout indices, masked scores). The math is in
``attention.py``'s header."""
from __future__ import annotations

import triton
import triton.language as tl

from . import _configs as _cfg
from ._common import autotune_enabled, device_function, interpreting

try:                            # host-side tensor descriptors (TMA): triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:             # pragma: no cover - older triton: the pointer path only
    TensorDescriptor = None

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# Masking values (the reference's rule, fusedformer/reference.py): a finite mask value at or below
# -2^17 makes the score -256, whatever q . k is.
_MASKING_THRESHOLD = tl.constexpr(-131072.0)   # -2^17
_MASKED_SCORE2 = tl.constexpr(-256.0 * 1.4426950408889634)   # in log2 units


# ------------------------------------------------------------------------------------------------
# autotuning configurations
# ------------------------------------------------------------------------------------------------
# Tiles (BLOCK_M, BLOCK_N, stages, warps) come from kernels/_configs.py, per architecture family,
# dtype and head dim, best default first: with autotuning switched off
# (FUSEDFORMER_TRITON_AUTOTUNE=0) the first tile that fits is used without timing.
# Lengths enter the key as power-of-two buckets, so a new length does not re-tune.
_TUNE_KEY = ["TUNE_SQ", "TUNE_SK", "HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "HAS_DROPOUT", "HAS_MASK", "DROP_ALIGNED"]
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
def _program_block(CuSeqQ, CuSeqK, seqlen_q, seqlen_k, BLOCK: tl.constexpr, VARLEN: tl.constexpr):
    """This program's place in the grid (every attention kernel's: blocks of BLOCK along axis 0, heads
    along axis 1, batch elements / sequences along axis 2): (its block's first position, its head,
    its batch element, and that element's :func:`_sequence_bounds`). The kernel returns early when
    the block starts past the sequence's end."""
    start = tl.program_id(0) * BLOCK
    head = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = _sequence_bounds(CuSeqQ, CuSeqK, b, seqlen_q, seqlen_k, VARLEN)
    return start, head, b, q_start, q_len, k_start, k_len


@device_function
def _key_range(m0, k_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """The key tiles of the query block whose first row is ``m0`` (forward and dQ): ``[0, full_end)``
    (a multiple of BLOCK_N) are visible to every row of the block and run unmasked;
    ``[full_end, hi)`` straddle the causal diagonal or the sequence's end and run masked."""
    if CAUSAL:
        hi = tl.minimum(k_len, m0 + BLOCK_M)
        full_end = tl.minimum(k_len, m0 + 1)     # keys < m0 + 1 are visible to every row of the block
    else:
        hi = k_len
        full_end = k_len
    return (full_end // BLOCK_N) * BLOCK_N, hi


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
