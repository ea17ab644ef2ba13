"""Pieces shared by the Triton kernels: the project's dropout RNG in Triton, and launch helpers.

Dropout (the mapping is written down once, in ``fusedformer.rng``): element ``i = offset + n`` of a
dropout site, with ``n`` its row-major index in the logical tensor, draws the 16-bit half ``i & 1``
(0: the low half) of word ``(i >> 1) & 3`` of

    Philox4x32_10(counter=(lo32(i >> 3), hi32(i >> 3), 0, 0), key=(lo32(seed), hi32(seed)))

and is kept iff that draw ``>= floor(p * 2**16)``. ``tl.philox(seed, c0, c1, 0, 0)`` computes the
block's four words (checked against ``fusedformer.rng`` in tests/triton/test_triton.py). Two ways
to draw a tile:

* :func:`philox_draw` — one Philox block per element, picking the element's half-word: any index
  layout, at eight times the minimum generator work (eight neighbours repeat a block);
* :func:`philox_draw_rows` — for tiles whose rows start on a block boundary (row length and
  offset multiples of 8, the common case): one block per eight neighbours, its half-words
  interleaved back into place. The kernels pick it with their ``*_ALIGNED`` constexpr.

Everything here is defined at import; nothing runs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """False with ``FUSEDFORMER_TRITON_AUTOTUNE=0``: each kernel then takes its first configuration
    that fits (no timing) — for quick correctness sweeps on a GPU. Read at each call."""
    return os.environ.get("FUSEDFORMER_TRITON_AUTOTUNE", "1") != "0"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


try:  # the one Python seed conversion and dropout constants; installed as fusedformer.kernels
    from .. import rng  # noqa: E402
except ImportError:  # loaded as a top-level ``kernels`` package (scripts/triton_aot_check.py)
    from fusedformer import rng  # noqa: E402
seed_value = rng.seed_int

# Indices per Philox block: rows of dropout indices that start on a multiple of this take
# philox_draw_rows (the launchers' *_ALIGNED constexprs, from drop_rows_aligned).
DROP_BLOCK = rng.DRAWS_PER_BLOCK


def drop_rows_aligned(row_length: int, offset: int) -> bool:
    """Whether every row of ``row_length`` dropout indices, counted from ``offset``, starts on a
    Philox block: the launchers' ``*_ALIGNED`` constexpr (tiles start on multiples of 8 columns)."""
    return int(row_length) % DROP_BLOCK == 0 and int(offset) % DROP_BLOCK == 0


def dropout_constants(p: float) -> tuple[int, float]:
    """``(threshold, keep_scale)`` for dropout probability ``p`` (see ``fusedformer.rng``)."""
    if p <= 0.0:
        return 0, 1.0
    return rng.threshold(p), rng.keep_scale(p)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision``: full IEEE float32 products for float32 inputs (TF32 would
    miss the float32 tolerance), the default for 16-bit inputs (where the argument is ignored)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def device_function(fn):
    """``@triton.jit`` for helpers that kernels call. Under the CPU interpreter the plain Python
    function is returned instead: the same code runs, minus the interpreter's costly re-patching
    of ``triton.language`` on every nested call (about 8 ms each), which dominates test time."""
    return fn if interpreting() else triton.jit(fn)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (a small constant in the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@device_function
def philox_draw(
    seed,          # scalar int: the dropout seed (64-bit)
    idx,           # int64 tensor: offset + logical element index n, any shape
):
    """The 16-bit draw of every element of ``idx`` (``fusedformer.rng``'s mapping), as uint32."""
    block = idx >> 3
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, 0, 0)
    word = (idx >> 1) & 3
    w = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return tl.where((idx & 1) == 0, w & 0xFFFF, w >> 16)


@device_function
def philox_draw_rows(
    seed,                   # scalar int: the dropout seed
    row_index,              # (R,) int64: offset + index of each row's element 0; multiples of 8
    start,                  # first column of the tile; a multiple of 8
    BLOCK_N: tl.constexpr,  # columns of the tile; a multiple of 8
):
    """The (R, BLOCK_N) draws of elements ``row_index[r] + start + c`` when every row starts on a
    Philox block: one block per eight neighbours, its half-words interleaved back into column
    order — an eighth of :func:`philox_draw`'s generator work."""
    block = ((row_index + start) >> 3)[:, None] + tl.arange(0, BLOCK_N // 8)[None, :]
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, 0, 0)
    # join(join(r0, r2), join(r1, r3))[r, j, a, b] is word 2a + b of block j; its halves joined
    # last, [r, j, a, b, h] is the draw of column 8j + 2(2a + b) + h: row-major = column order
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    halves = tl.join(words & 0xFFFF, words >> 16)
    return tl.reshape(halves, [row_index.shape[0], BLOCK_N])


@device_function
def dropout_keep_rows(
    seed,                       # scalar int: the dropout seed
    row_index,                  # (R,) int64: offset + index of each row's element at column 0
    start,                      # first column of the tile
    threshold,                  # floor(p * 2**16)
    BLOCK_N: tl.constexpr,      # columns of the tile (a multiple of 8)
    ALIGNED: tl.constexpr,      # every row_index and start a multiple of 8: philox_draw_rows
    TRANSPOSED: tl.constexpr,   # return the (BLOCK_N, R) mask
):
    """Keep-mask of the (R, BLOCK_N) tile of elements ``row_index[r] + start + c``."""
    if ALIGNED:
        draws = philox_draw_rows(seed, row_index, start, BLOCK_N)
    else:
        draws = philox_draw(seed, row_index[:, None] + (start + tl.arange(0, BLOCK_N))[None, :])
    if TRANSPOSED:
        draws = tl.trans(draws)
    return draws >= tl.to_tensor(threshold).to(tl.uint32)


@device_function
def dropout_keep(
    seed,          # scalar int: the dropout seed (64-bit)
    idx,           # int64 tensor: offset + logical element index n, any shape
    threshold,     # scalar int: floor(p * 2**16); an element is kept iff its draw >= threshold
):
    """Boolean keep-mask of ``idx``'s shape (``fusedformer.rng``'s mapping)."""
    return philox_draw(seed, idx) >= tl.to_tensor(threshold).to(tl.uint32)


# The CPU interpreter converts float32 -> bfloat16 by truncation (a GPU rounds to nearest even);
# `round_to` corrects that so interpreter runs round like the GPU and like torch.
_INTERPRETING = tl.constexpr(interpreting())


@device_function
def round_to(
    x,                      # float32 tensor
    dtype: tl.constexpr,    # target dtype (float16, bfloat16 or float32)
):
    """``x`` rounded to ``dtype``, to nearest even (as torch's ``.to(dtype)`` rounds)."""
    if dtype == tl.bfloat16:
        if _INTERPRETING:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)
    else:
        return x.to(dtype)


@device_function
def mma(
    a,                              # (M, K) tile
    b,                              # (K, N) tile
    acc,                            # (M, N) float32 accumulator
    DOT_PRECISION: tl.constexpr,    # see dot_precision()
):
    """``acc + a @ b`` with float32 accumulation (``tl.dot``). The CPU interpreter multiplies
    bfloat16 tiles as their raw 16-bit integers, so there they are widened first (exact: every
    bfloat16 value is a float32 value)."""
    if _INTERPRETING:
        if a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
