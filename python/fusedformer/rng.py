"""The project's dropout random numbers: one definition every backend reproduces bit for bit.

The mapping (this docstring is the single place it is written down)
------------------------------------------------------------------
Dropout in fusedformer never draws from a stateful generator inside a kernel. Each dropout site is
given a ``seed`` (a 64-bit integer) and an ``offset`` (a non-negative element count), and each
element of the *logical* tensor the dropout applies to is identified by its row-major linear index
``n`` in that tensor — independent of memory layout, strides or how a kernel tiles the work:

* layer_norm: the input ``x`` viewed as ``(M, N)``; ``n = m * N + c``.
* gelu_ffn:   the output ``y`` viewed as ``(M, C)``; ``n = m * C + c``.
* attention:  the probabilities ``P`` of shape ``(B, H, Sq, Sk)`` with ``H`` the number of *query*
  heads; ``n = ((b * H + h) * Sq + q) * Sk + k``.
* attention_varlen (packed sequences, ``cu_seqlens``): sequence ``i`` is its own ``(1, H, Sq_i, Sk_i)``
  problem, the sequences' probabilities laid out one after another:
  ``n = base_i + (h * Sq_i + q) * Sk_i + k`` with ``base_i = sum_{j<i} H * Sq_j * Sk_j``.

For element ``n`` let ``i = offset + n``. One Philox4x32-10 block yields four 32-bit words, which
are eight 16-bit draws, so eight consecutive indices share a block::

    key     = (seed & 0xffffffff, (seed >> 32) & 0xffffffff)        # (k0, k1)
    counter = (lo32(i >> 3), hi32(i >> 3), 0, 0)                      # (c0, c1, c2, c3)
    w       = Philox4x32_10(counter, key)[(i >> 1) & 3]               # uint32
    r       = (w >> (16 * (i & 1))) & 0xffff                          # uint16: even i low half

The element is **kept** iff ``r >= threshold(p)`` with ``threshold(p) = floor(p * 2**16)``, and a
kept element is scaled by ``1 / (1 - p)`` (computed in float64, applied in float32). Comparing the
integers — not floats made from them — keeps every backend bit-identical.

Why 16 bits a draw: the generator is most of what dropout costs inside the attention kernels
(ten rounds of two 32x32-bit multiplies per block), and eight draws a block halve it against one
32-bit word per element. The price is the resolution of ``p``: an element is dropped with
probability ``floor(p * 2**16) / 2**16``, less than ``2**-16`` below ``p`` (``p = 0.1`` drops
0.0999908); a ``p`` under ``2**-16`` drops nothing. The kept values are still scaled by
``1 / (1 - p)``, torch's factor, so ``E[dropout(x)]`` is ``x`` within that ``2**-16``.
Eight-bit draws (FlashAttention-2's choice) would move ``p = 0.1`` to 0.0977.

Philox4x32-10 is the counter-based generator of Salmon et al., "Parallel random numbers: as easy as
1, 2, 3" (SC'11): ten rounds, multipliers ``0xD2511F53`` / ``0xCD9E8D57``, Weyl key increments
``0x9E3779B9`` / ``0xBB67AE85``. It is the same function as cuRAND's and Triton's ``tl.philox``
(``tl.philox(seed, c0, c1, 0, 0)`` in a Triton kernel gives the four words above).

Choosing seeds and offsets: callers that leave ``seed=None`` get a fresh seed drawn from torch's
default CPU generator (so ``torch.manual_seed`` makes runs repeatable). Several dropout sites in one
step either use different seeds or disjoint offset ranges.

This module implements the generator in plain PyTorch (int64 arithmetic on 32-bit halves), for the
reference backend and for tests.
"""
from __future__ import annotations

import torch
from .errors import InputError

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


DRAW_BITS = 16
DRAWS_PER_BLOCK = 4 * 32 // DRAW_BITS  # eight consecutive indices share one Philox block


def threshold(p: float) -> int:
    """The 16-bit draw below which an element is *dropped*: ``floor(p * 2**16)``, for ``0 <= p < 1``."""
    if not 0.0 <= p < 1.0:
        raise InputError(f"dropout_p must be in [0, 1), got {p}")
    return int(p * 65536.0)


def keep_scale(p: float) -> float:
    """The factor a kept element is multiplied by: ``1 / (1 - p)``."""
    return 1.0 / (1.0 - p)


def seed_key(seed: int) -> tuple[int, int]:
    """Split a seed (any Python int; taken modulo 2**64) into the Philox key ``(k0, k1)``."""
    seed &= (1 << 64) - 1
    return seed & MASK32, (seed >> 32) & MASK32


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and a tensor ``b`` of uint32
    values held in int64. ``b`` is split in 16-bit halves so no product overflows int64."""
    p_lo = a * (b & 0xFFFF)                      # < 2**48
    p_hi = a * (b >> 16)                         # < 2**48; the full product is p_hi * 2**16 + p_lo
    t = p_lo + ((p_hi & 0xFFFF) << 16)           # < 2**49
    return (p_hi >> 16) + (t >> 32), t & MASK32


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int],
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on int64 tensors holding uint32 values: ``counter`` is ``(c0, c1, c2, c3)``,
    ``key`` is ``(k0, k1)``. Returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def draws(seed: int, offset: int, numel: int, device=None) -> torch.Tensor:
    """The 16-bit draw ``r`` for logical indices ``n = 0 .. numel-1`` (as int64 values)."""
    if offset < 0:
        raise InputError(f"offset must be >= 0, got {offset}")
    if numel == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    first_block, last_block = offset >> 3, (offset + numel - 1) >> 3
    blocks = torch.arange(first_block, last_block + 1, dtype=torch.int64, device=device)
    zero = torch.zeros_like(blocks)
    words = philox4x32((blocks & MASK32, blocks >> 32, zero, zero), seed_key(seed))
    # halves[b, j, h] is half h (0: low) of word j of block b: the draw for index 8 * (first_block
    # + b) + 2 * j + h, so the row-major order is index order
    halves = torch.stack([torch.stack((w & 0xFFFF, w >> 16), dim=1) for w in words], dim=1)
    start = offset - 8 * first_block
    return halves.reshape(-1)[start:start + numel]


def keep_mask(shape, p: float, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """Boolean keep-mask of ``shape`` for dropout probability ``p`` (True = kept)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    r = draws(seed, offset, numel, device=device)
    return (r >= threshold(p)).reshape(tuple(shape))


def dropout_multiplier(shape, p: float, seed: int, offset: int = 0, device=None,
                       dtype=torch.float32) -> torch.Tensor:
    """``keep_mask * 1/(1-p)`` as a ``dtype`` tensor: what dropout multiplies its input by."""
    keep = keep_mask(shape, p, seed, offset, device=device)
    return keep.to(dtype) * keep_scale(p)


def new_seed() -> torch.Tensor:
    """A fresh seed drawn from torch's default CPU generator, as a one-element int64 tensor.

    It stays a tensor so that ``torch.compile`` traces it without a graph break."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def seed_int(seed) -> int:
    """The seed as the generator takes it: the op-level seed tensor (one integer, see
    ``ops/_common.py: make_seed``) as a Python int, 0 for None (no dropout). The one Python-side
    conversion (the reference and the Triton launchers); the C++ ops take the tensor
    (``csrc/common/checks.h: seed_value``)."""
    return 0 if seed is None else int(seed.reshape(-1)[0])
