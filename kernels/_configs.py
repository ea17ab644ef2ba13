"""Autotuning configurations of the Triton kernels, per GPU architecture, dtype and head dim: the one
place where tile shapes, pipeline depths and warp counts are chosen.

Each kernel's ``@triton.autotune`` list is the union of the tiles named below for it (``union``);
its ``early_config_prune`` asks this module for the ordered tiles of the call at hand — the GPU's
architecture family, the dtype, the head dim (attention) or the epilogue (gelu_ffn) — keeps those
whose estimated shared memory fits the GPU's per-block limit, and returns them in table order. The
first kept tile is the **default**: what ``FUSEDFORMER_TRITON_AUTOTUNE=0`` runs without timing, and
the best guess for an H100 (sm_90 tables) or an A100 (sm_80 tables).

How the tables were chosen (no GPU was available; nothing here is a speed measurement): every
default compiles with Triton's real NVIDIA pipeline for sm_80 and sm_90, fits the per-block shared
memory, does not spill registers, and on sm_90 lowers every 16-bit ``tl.dot`` to wgmma —
checked by ``scripts/triton_aot_check.py`` (CI runs it on the defaults; docs/triton_kernels.md has
the table). Among the clean tiles the default is a large one whose accumulators fit with some
headroom (the tile sizes FlashAttention-2 and Triton's tutorials use on these GPUs, where they
compile clean) — a guess for a GPU to time; the other entries are the few clean alternatives that
could win at other lengths or occupancies, so that autotuning stays short.

Architecture families: ``sm90`` (Hopper: wgmma wants 64-row warpgroup tiles) and ``sm80``
(Ampere / Ada: mma.sync); see ``family``. The shared-memory limit is read from the device when there is
one (``shared_memory_per_block_optin``) and from ``SMEM_PER_BLOCK`` when compiling ahead of time
for a named target (``aot_target``) — tables cannot tell an sm_86 from an sm_80 otherwise.

float32 inputs: ``tl.dot`` runs IEEE float32 products on the FMA units (no tensor cores, no TF32:
TF32 misses the project's float32 tolerances). The float32 tables are small tiles that compile
without spills; float32 on the Triton backend is a correctness path, not a fast one.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Sequence

import torch

# Opt-in shared memory per block, bytes (CUDA C Programming Guide, "Technical Specifications per
# Compute Capability"): what a kernel may allocate dynamically.
SMEM_PER_BLOCK = {
    80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
    90: 227 * 1024, 100: 227 * 1024, 103: 227 * 1024, 120: 99 * 1024,
}
# Without a device or a named target (the CPU interpreter): Hopper, the tables' first audience.
DEFAULT_ARCH = 90

_AOT_TARGET: Optional[int] = None


@contextlib.contextmanager
def aot_target(arch: int):
    """Within this block the pruners choose for GPU ``arch`` (e.g. 90) whatever the tensors' device:
    used by scripts/triton_aot_check.py, which calls the launchers with CPU tensors and compiles
    what they would launch for a named GPU."""
    global _AOT_TARGET
    if arch not in SMEM_PER_BLOCK:
        raise ValueError(f"unknown arch {arch}; known: {sorted(SMEM_PER_BLOCK)}")
    old, _AOT_TARGET = _AOT_TARGET, int(arch)
    try:
        yield
    finally:
        _AOT_TARGET = old


def device_arch(device: torch.device) -> int:
    """Compute capability as ``10 * major + minor`` (90 for an H100): the ahead-of-time target
    inside ``aot_target``, else the device's own, else ``DEFAULT_ARCH``."""
    if _AOT_TARGET is not None:
        return _AOT_TARGET
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return DEFAULT_ARCH


def smem_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on ``device`` (or on the ahead-of-time target)."""
    if _AOT_TARGET is None and device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).shared_memory_per_block_optin)
    arch = device_arch(device)
    if arch in SMEM_PER_BLOCK:
        return SMEM_PER_BLOCK[arch]
    known = [a for a in SMEM_PER_BLOCK if a <= arch]
    return SMEM_PER_BLOCK[max(known)] if known else min(SMEM_PER_BLOCK.values())


def family(arch: int) -> str:
    """``"sm90"`` (Hopper, and the data-centre Blackwells with the same 227 KB of shared memory) or
    ``"sm80"`` (mma.sync: Ampere, Ada, and the 99 KB consumer Blackwell sm_120). Only sm_80 and
    sm_90 are checked ahead of time; other archs get the family's tables, pruned to their limit."""
    return "sm90" if 90 <= arch < 120 else "sm80"


def _dtype_class(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "f16"


def union(*lists: Iterable[Sequence]) -> list[tuple]:
    """Every tile of ``lists``, first occurrence first (the autotune decorator's config list)."""
    out: list[tuple] = []
    for lst in lists:
        for t in lst:
            if tuple(t) not in out:
                out.append(tuple(t))
    return out


def select(configs, tiles: Sequence[tuple], key, smem, limit: int) -> list:
    """The configs of ``configs`` whose ``key(config)`` is in ``tiles``, in ``tiles``' order, whose
    estimated shared memory ``smem(config)`` is within ``limit``; if none is, the one with the
    smallest estimate (a launch that cannot fit then fails loudly, with a tile the table names)."""
    by_key = {key(c): c for c in configs}
    ordered = [by_key[t] for t in tiles if t in by_key] or list(configs)
    kept = [c for c in ordered if smem(c) <= limit]
    return kept or [min(ordered, key=smem)]


# ================================================================================================
# attention: (BLOCK_M, BLOCK_N, num_stages, num_warps)
# ================================================================================================
# forward and dQ: BLOCK_M query rows resident, BLOCK_N keys streamed; dK/dV: BLOCK_N keys resident,
# BLOCK_M query rows streamed. Keyed by (family, dtype class, head-dim bucket) and then by variant:
# "heavy" with dropout or an additive mask (the Philox draws and the bias tile take registers),
# "light" otherwise. The bucket is max(BLOCK_D, BLOCK_DV): 64 (<= 64), 128, 256.
#
# Why these (static evidence, sm_90 / sm_80, triton 3.8; docs/triton_kernels.md has the table):
# * wgmma needs 64 rows per warpgroup in the first operand: the dK/dV kernel's products have BLOCK_N
#   rows, so its sm_90 tiles keep BLOCK_N >= 64 (BLOCK_N = 32 falls back to mma.sync there).
# * The register file bounds the accumulators: dK and dV are (BLOCK_N, D) float32 each, the forward's
#   output (BLOCK_M, D). With 8 warps the products split across two warpgroups (or four mma.sync
#   warp pairs), halving the per-thread share: at head dim 128 every 4-warp tile with a 128-row
#   accumulator spills, and at 256 only 16x64 (dK/dV) keeps wgmma without spilling.
# * Shared memory: the estimate below is within 1 KB of what the compiler allocates on sm_90, so
#   128x128 tiles fit the 227 KB of an H100 at head dim 128 (160 KB at 2 stages) but not an A100's
#   163 KB with 3 stages. The sm80 head-dim-256 lists end with a small tile for the 99 KB GPUs
#   (sm_86 / sm_89 / sm_120), where the others do not fit.
def _same(tiles):
    return {"light": tiles, "heavy": tiles}


_F16 = {
    "fwd": {
        ("sm90", 64): {"light": [(128, 128, 3, 8), (128, 64, 3, 8), (64, 64, 3, 4)],
                       "heavy": [(128, 64, 3, 8), (64, 64, 3, 4)]},
        ("sm80", 64): {"light": [(128, 64, 3, 8), (128, 128, 3, 8), (64, 64, 3, 4)],
                       "heavy": [(128, 64, 3, 8), (64, 64, 3, 4)]},
        ("sm90", 128): {"light": [(128, 128, 2, 8), (128, 64, 3, 8), (128, 128, 3, 8)],
                        "heavy": [(128, 64, 3, 8), (128, 64, 4, 8)]},
        ("sm80", 128): {"light": [(128, 32, 3, 8), (64, 64, 3, 4)],
                        "heavy": [(64, 32, 3, 4), (128, 32, 3, 8)]},
        ("sm90", 256): {"light": [(128, 64, 2, 8), (128, 32, 3, 8)],
                        "heavy": [(128, 32, 3, 8), (128, 32, 2, 8)]},
        ("sm80", 256): {"light": [(64, 64, 2, 8), (64, 32, 3, 4), (32, 32, 2, 4)],
                        "heavy": [(64, 64, 2, 8), (32, 32, 2, 4)]},
    },
    "dkdv": {
        ("sm90", 64): {"light": [(64, 128, 2, 8), (32, 128, 2, 8)],
                       "heavy": [(32, 128, 2, 8), (32, 64, 2, 8)]},
        ("sm80", 64): {"light": [(16, 128, 2, 8), (32, 64, 2, 8)],
                       "heavy": [(16, 128, 2, 8)]},
        ("sm90", 128): {"light": [(32, 128, 2, 8), (16, 128, 2, 8), (32, 64, 2, 8)],
                        "heavy": [(16, 128, 2, 8), (32, 64, 2, 8), (16, 64, 2, 8)]},
        ("sm80", 128): {"light": [(32, 64, 2, 8), (16, 64, 2, 8)],
                        "heavy": [(16, 64, 2, 8)]},
        ("sm90", 256): _same([(16, 64, 2, 8)]),
        ("sm80", 256): _same([(32, 32, 2, 8), (16, 64, 2, 8), (16, 32, 2, 4)]),
    },
    "dq": {
        ("sm90", 64): _same([(128, 64, 2, 8), (64, 64, 2, 4), (128, 32, 2, 8)]),
        ("sm80", 64): _same([(128, 32, 2, 8), (64, 32, 2, 4)]),
        ("sm90", 128): {"light": [(128, 64, 2, 8), (128, 32, 2, 8), (64, 64, 2, 8)],
                        "heavy": [(128, 32, 2, 8), (64, 64, 2, 8)]},
        ("sm80", 128): _same([(64, 64, 2, 8), (64, 32, 2, 4)]),
        ("sm90", 256): _same([(64, 32, 2, 8), (128, 32, 2, 8)]),
        ("sm80", 256): _same([(64, 32, 2, 8), (16, 32, 2, 4)]),
    },
}
# float32: IEEE products on the FMA units, whose register use grows with the tile and the head dim:
# only small tiles compile without spilling — 32x32 at head dim 64, 32x16 or 16x32 at 128, 16x16 at
# 256 (64x32 and larger spill at head dim 128, by up to tens of KB a thread). A correctness path,
# not a fast one.
_F32 = {
    "fwd": {64: [(32, 32, 2, 4), (32, 16, 2, 4)], 128: [(32, 16, 2, 4)], 256: [(16, 16, 2, 4)]},
    "dkdv": {64: [(32, 32, 2, 4), (32, 16, 2, 4)], 128: [(32, 16, 2, 4), (16, 32, 2, 4)],
             256: [(16, 16, 2, 4)]},
    "dq": {64: [(32, 32, 2, 4), (16, 32, 2, 4)], 128: [(16, 32, 2, 4), (32, 16, 2, 4)],
           256: [(16, 16, 2, 4)]},
}
_F32 = {k: {(f, b): _same(v) for f in ("sm90", "sm80") for b, v in by_bucket.items()}
        for k, by_bucket in _F32.items()}

ATTENTION = {k: {**{(f, "f16", b): v for (f, b), v in _F16[k].items()},
                 **{(f, "f32", b): v for (f, b), v in _F32[k].items()}} for k in _F16}
INTERPRETER_TILE = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (16, 32)}


def _head_bucket(block_d: int, block_dv: int) -> int:
    return max(64, block_d, block_dv)


def attention_tiles(kernel: str, arch: int, dtype: torch.dtype, block_d: int, block_dv: int,
                    heavy: bool) -> list[tuple]:
    """Ordered (BLOCK_M, BLOCK_N, stages, warps) candidates of ``kernel`` ("fwd", "dkdv", "dq");
    ``heavy``: with dropout or an additive mask."""
    entry = ATTENTION[kernel][(family(arch), _dtype_class(dtype), _head_bucket(block_d, block_dv))]
    return entry["heavy" if heavy else "light"]


def attention_all_tiles(kernel: str) -> list[tuple]:
    return union(*(lst for entry in ATTENTION[kernel].values() for lst in entry.values()))


def attention_smem(kernel: str, tile: tuple, block_d: int, block_dv: int, elem: int, has_mask: bool) -> int:
    """Estimated shared memory of one program, bytes: the resident tile plus every pipeline stage of
    the streamed ones (K/V, or Q/dO for dK/dV; and the additive mask's (BLOCK_M, BLOCK_N) tile,
    which the pipeliner stages too), plus 2 KB of reduction / layout scratch. Within 1 KB of what
    the compiler allocates on sm_90 (above it with a mask); sm_80 allocates one stage fewer."""
    bm, bn, stages, _ = tile
    if kernel == "fwd":
        resident, streamed = bm * block_d, bn * (block_d + block_dv)
    elif kernel == "dq":
        resident, streamed = bm * (block_d + block_dv), bn * (block_d + block_dv)
    else:
        resident, streamed = bn * (block_d + block_dv), bm * (block_d + block_dv)
    if has_mask:
        streamed += bm * bn
    return (resident + stages * streamed) * elem + 2048


# ================================================================================================
# gelu_ffn matmuls: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); GROUP_M = 8
# ================================================================================================
# _gemm_epilogue keyed by (family, dtype class, epilogue class): "light" (none, dropout-free bias)
# or "heavy" (GELU, dropout, GELU derivative: the epilogue's live values share the register file
# with the accumulator); _gemm_wgrad by (family, dtype class, "gelu" when B_GELU else "plain").
# Why these (static evidence, triton 3.8): 128x256x64 with 8 warps is the H100/A100 matmul tile of
# Triton's tutorial and compiles clean for the plain epilogue, but its (128, 256) float32 accumulator
# (128 registers a thread) leaves no room for the GELU, dropout and GELU-derivative epilogues, which
# spill there (up to ~1.2 KB a thread); 128x128x64 with 8 warps does not. 4-warp 128x128 tiles spill
# with those epilogues on both archs.
_GEMM16 = {
    ("sm90", "light"): [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8)],
    ("sm90", "heavy"): [(128, 128, 64, 4, 8), (128, 128, 64, 3, 8), (128, 64, 64, 4, 4)],
    ("sm80", "light"): [(128, 256, 64, 3, 8), (128, 128, 32, 4, 4)],
    ("sm80", "heavy"): [(128, 128, 64, 3, 8), (128, 128, 32, 4, 8)],
}
_WGRAD16 = {
    ("sm90", "plain"): [(128, 128, 64, 3, 8), (128, 128, 64, 4, 8)],
    ("sm90", "gelu"): [(128, 128, 64, 3, 8), (128, 128, 64, 4, 8)],
    ("sm80", "plain"): [(128, 128, 64, 3, 8), (128, 128, 32, 4, 8)],
    ("sm80", "gelu"): [(128, 128, 32, 4, 8)],           # 128x128x64 spills with the GELU prologue
}
# float32 (FMA): 128x128x32 spills by up to ~5 KB a thread and 64x32x32 by 8 B with the GELU /
# bias epilogues on sm_90; these small tiles compile clean for every epilogue on both archs.
_GEMM32 = [(32, 64, 32, 3, 4), (32, 32, 32, 3, 4), (32, 64, 16, 3, 4)]
GEMM = {**{(f, "f16", e): v for (f, e), v in _GEMM16.items()},
        **{(f, "f32", e): _GEMM32 for f in ("sm90", "sm80") for e in ("light", "heavy")}}
WGRAD = {**{(f, "f16", e): v for (f, e), v in _WGRAD16.items()},
         **{(f, "f32", e): _GEMM32 for f in ("sm90", "sm80") for e in ("plain", "gelu")}}
INTERPRETER_GEMM = (16, 16, 16, 1, 1)


def gemm_tiles(arch: int, dtype: torch.dtype, epilogue: str, has_dropout: bool) -> list[tuple]:
    heavy = epilogue in ("gelu", "gelu_grad") or (epilogue == "dropout" and has_dropout)
    return GEMM[(family(arch), _dtype_class(dtype), "heavy" if heavy else "light")]


def wgrad_tiles(arch: int, dtype: torch.dtype, b_gelu: bool) -> list[tuple]:
    return WGRAD[(family(arch), _dtype_class(dtype), "gelu" if b_gelu else "plain")]


def gemm_smem(tile: tuple, elem: int) -> int:
    """Estimated shared memory: every pipeline stage of both operand tiles (+ 2 KB scratch)."""
    bm, bn, bk, stages, _ = tile
    return stages * (bm * bk + bk * bn) * elem + 2048


# ================================================================================================
# layer_norm
# ================================================================================================
# `_rows` kernels: warps per program from the tile's elements (BLOCK_M * BLOCK_N), in preference
# order (the default is the first admissible). The forward keeps x/h and y live per element and
# compiles clean at 64 elements a thread (124 registers at width 8192); the backward keeps h, dy,
# xhat, g and dh: 254 registers at 32 a thread, spills at 64 — so it takes at most 16 (8 warps for
# BERT's 4 x 1024 tiles, 16 at width 8192).
ROWS_WARPS = {"fwd": (4, 8, 16, 2, 1), "bwd": (8, 16, 4, 2, 1)}
ROWS_MAX_ELEMS_PER_THREAD = {"fwd": 64, "bwd": 16}
# chunked kernels (rows wider than ROWS_MAX_WIDTH): (BLOCK_N, num_warps), 8 or 16 elements a thread
# (16-byte vector loads of 16-bit data need 8); they compile clean (40-64 registers).
CHUNKS = [(1024, 4), (2048, 8), (4096, 8), (2048, 4), (4096, 16)]
INTERPRETER_CHUNK = (256, 1)


def rows_warps(direction: str, elems: int) -> list[int]:
    """Warp counts for a `_rows` tile of ``elems`` elements: at least one element per thread, at
    most ``ROWS_MAX_ELEMS_PER_THREAD[direction]``."""
    cap = ROWS_MAX_ELEMS_PER_THREAD[direction]
    kept = [w for w in ROWS_WARPS[direction] if 32 * w <= max(elems, 32) and elems <= cap * 32 * w]
    return kept or [max(ROWS_WARPS[direction])]
