"""The attention CUDA kernels and launchers (csrc/attention/attention_cuda.cuh) on the CPU through the
SIMT emulator: the same templates nvcc builds into fusedformer._C, compiled by g++ with
-DFF_SIMT_EMULATION into a test-only extension (csrc/tests/emu/emu_attention.cpp).

Forward and backward against the float64 reference by the 2x rule (out, lse, dq, dk, dv), float16
and bfloat16, on small awkward shapes: sequence lengths 1, 17, 64, 77, 130 (mixed, Sq != Sk),
(B, S, H, D) storage viewed as (B, H, S, D), head dims 40, 64, 96, 128 and 256 (all three head-dim
buckets), Dv != D, B and H > 1, GQA and MQA, causal with Sq < Sk and Sq > Sk, a key padding mask
with a fully padded batch row, an additive mask broadcast (stride 0) over heads, or over heads
and keys, in float32 and in q's dtype, dropout (p = 0.3, the reference run with the same seed and
offset, so the masks must agree bit for bit), the deterministic backward (bitwise equal across
runs, and by the 2x rule); the tile paths (test_tile_paths): tiles on the plain path only, the
causal diagonal among plain tiles, right padding with boundary, skipped and empty rows, padding
with holes, dropout with the lane-shared Philox draws and with the per-lane fallback (Sk or offset
not a multiple of 8), a NaN row on the plain path; the attn_mask tile in shared memory
(test_mask_tile, test_bool_mask): cp.async and plain-load layouts, one row for every query,
partial tiles, float32 / float16 / bfloat16 masks, each kernel. Masks reach the kernels in the
layout a case builds (_set_mask). Every output is written inside a NaN-filled buffer with padded rows;
the bytes outside the view must come back untouched."""
import math

import pytest
import torch

from fusedformer import reference
from numerics import assert_2x

import emu_build  # noqa: E402  (tests/emu/; a broken emulator build fails, never skips)

OP = "attention"
GUARD = 16      # guard elements each side (32 bytes: keeps 16-byte alignment)
ROW_PAD = 8     # extra elements per output row (the views are strided)


@pytest.fixture(scope="module")
def emu():
    return emu_build.load_emu("emu_attention", ["csrc/tests/emu/emu_attention.cpp",
                                                   "csrc/attention/attention_problem.cpp"])


class Guarded:
    """A NaN-filled flat buffer holding a (..., cols) view with ``row_pad`` extra elements per row and
    ``GUARD`` elements either side; everything outside the view must stay untouched."""

    def __init__(self, shape, dtype, row_pad=ROW_PAD):
        *lead, cols = shape
        rows = math.prod(lead)
        ld = cols + row_pad
        self.buf = torch.full((GUARD + rows * ld + GUARD,), float("nan"), dtype=dtype)
        self.view = self.buf[GUARD:GUARD + rows * ld].view(rows, ld)[:, :cols].view(*lead, cols)
        self.pristine = self.buf.clone()
        self.mask = torch.ones_like(self.buf, dtype=torch.bool)
        self.mask[GUARD:GUARD + rows * ld].view(rows, ld)[:, :cols] = False

    def assert_untouched(self, name):
        bits = torch.int16 if self.buf.element_size() == 2 else torch.int32
        assert torch.equal(self.buf.view(bits)[self.mask], self.pristine.view(bits)[self.mask]), \
            f"{name}: the kernel wrote outside its output"


def _problem(B, H, Hk, Sq, Sk, D, Dv, *, gen_seed, transposed=False, mask=None, padding=False):
    """float64 masters (q, k, v, dout) and the masks. ``transposed``: q, k, v are (B, S, H, D) storage
    viewed as (B, H, S, D). ``mask``: "heads" = (B, 1, Sq, Sk) expanded over heads, "keys" =
    (B, 1, Sq, 1) expanded over heads and keys (stride 0), with some -inf entries."""
    g = torch.Generator().manual_seed(gen_seed)

    def make(heads, S, d):
        if transposed:
            return torch.randn(B, S, heads, d, generator=g, dtype=torch.float64).transpose(1, 2)
        return torch.randn(B, heads, S, d, generator=g, dtype=torch.float64)
    t = {"q": make(H, Sq, D), "k": make(Hk, Sk, D), "v": make(Hk, Sk, Dv),
         "dout": torch.randn(B, H, Sq, Dv, generator=g, dtype=torch.float64)}
    t["attn_mask"] = None
    if mask is not None:
        cols = Sk if mask == "heads" else 1
        m = torch.randn(B, 1, Sq, cols, generator=g, dtype=torch.float64)
        m = m.masked_fill(torch.rand(B, 1, Sq, cols, generator=g) < 0.2, float("-inf"))
        _set_mask(t, m, lambda s: s.expand(B, H, Sq, Sk))
    t["key_padding_mask"] = None
    if padding:  # batch row 0 fully padded, the others randomly
        kpm = torch.rand(B, Sk, generator=g) < 0.3
        kpm[0] = True
        t["key_padding_mask"] = kpm
    return t


def _set_mask(t, storage, view):
    """t's attn_mask: ``view(storage)``, (B, H, Sq, Sk). The kernels get the view of the storage
    converted to the mask dtype, so broadcast (stride 0) and strided layouts reach them as they are
    (``Tensor.to`` of the view would materialize a dense copy)."""
    t["attn_mask"] = view(storage)
    t["mask_as"] = lambda dtype: view(storage.to(dtype))


def _mask_as(t, dtype):
    if t["attn_mask"] is None:
        return None
    return t["mask_as"](dtype) if "mask_as" in t else t["attn_mask"].to(dtype)


def _reference(t, dtype, mask_dtype, p, causal, scale, seed, offset):
    """Reference (out, lse, dq, dk, dv) in ``dtype`` (float64 for the ground truth)."""
    q, k, v, dout = (t[n].to(dtype) for n in ("q", "k", "v", "dout"))
    mask = _mask_as(t, dtype if dtype == torch.float64 else mask_dtype)
    seed_t = torch.tensor([seed], dtype=torch.int64) if p > 0 else None
    kpm = t["key_padding_mask"]
    out, lse = reference.attention_fwd(q, k, v, mask, kpm, p, causal, scale, seed_t, offset)
    dq, dk, dv = reference.attention_bwd(dout, q, k, v, out, lse, mask, kpm, p, causal, scale, seed_t, offset)
    return out, lse, dq, dk, dv


def _like(x, dtype):
    """x in dtype with x's strides (a transposed view stays one)."""
    return torch.empty_strided(x.shape, x.stride(), dtype=dtype).copy_(x)


def _run_emu(emu, t, dtype, mask_dtype, p, causal, scale, seed, offset, deterministic=False, mask_tile=True):
    """The emulated kernels: (out, lse, dq, dk, dv), every output inside a guard-banded buffer."""
    q, k, v, dout = (_like(t[n], dtype) for n in ("q", "k", "v", "dout"))
    mask = _mask_as(t, mask_dtype)
    kpm = t["key_padding_mask"]
    B, H, Sq, D = q.shape
    Hk, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = Guarded((B, H, Sq, Dv), dtype)
    lse = Guarded((B, H, Sq), torch.float32, row_pad=0)
    emu.fwd(q, k, v, mask, kpm, p, causal, scale, seed, offset, out.view, lse.view, mask_tile)
    out.assert_untouched("out")
    lse.assert_untouched("lse")
    grads = [Guarded(s, dtype) for s in ((B, H, Sq, D), (B, Hk, Sk, D), (B, Hk, Sk, Dv))]
    emu.bwd(dout, q, k, v, out.view, lse.view, mask, kpm, p, causal, scale, seed, offset, deterministic,
            *(gr.view for gr in grads))
    for name, gr in zip(("dq", "dk", "dv"), grads):
        gr.assert_untouched(name)
    return (out.view, lse.view) + tuple(gr.view for gr in grads)


def _check(emu, t, dtype, *, mask_dtype=None, p=0.0, causal=False, scale=None, seed=0, offset=0,
           deterministic=False, mask_tile=True):
    D = t["q"].shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask_dtype = mask_dtype or dtype
    got = _run_emu(emu, t, dtype, mask_dtype, p, causal, scale, seed, offset, deterministic, mask_tile)
    base = _reference(t, dtype, mask_dtype, p, causal, scale, seed, offset)
    ref = _reference(t, torch.float64, mask_dtype, p, causal, scale, seed, offset)
    for name, o, b, r in zip(("out", "lse", "dq", "dk", "dv"), got, base, ref):
        assert_2x(name, OP, o, r, b, dtype)
    return got


DTYPES = [torch.float16, torch.bfloat16]

# (B, H, Hk, Sq, Sk, D, Dv, transposed, causal)
SHAPES = [
    (1, 1, 1, 1, 1, 64, 64, False, False),      # a single query and key
    (2, 2, 2, 17, 77, 40, 40, False, True),     # head dim 40 (bucket 64), causal with Sq < Sk
    (1, 4, 2, 77, 17, 96, 96, True, False),     # GQA, Sq > Sk, head dim 96 (bucket 128), strided
    (1, 4, 1, 130, 64, 64, 64, False, True),    # MQA, causal with Sq > Sk, three query tiles
    (2, 1, 1, 64, 130, 128, 40, False, False),  # Dv != D, three key tiles, ragged last one
    (2, 3, 3, 1, 130, 64, 64, True, False),     # one query row against three key tiles, strided
    (1, 2, 2, 130, 1, 40, 40, False, True),     # one key, causal
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])) + ("-T" if s[7] else "")
                         + ("-causal" if s[8] else ""))
def test_shapes(emu, dtype, shape):
    B, H, Hk, Sq, Sk, D, Dv, transposed, causal = shape
    t = _problem(B, H, Hk, Sq, Sk, D, Dv, gen_seed=sum(shape), transposed=transposed)
    _check(emu, t, dtype, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_dim_256(emu, dtype):
    _check(emu, _problem(1, 1, 1, 33, 40, 256, 256, gen_seed=256), dtype, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_padding_with_a_fully_padded_batch_row(emu, dtype):
    t = _problem(2, 2, 2, 17, 77, 64, 64, gen_seed=3, padding=True)
    out, lse, dq, dk, dv = _check(emu, t, dtype)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()


@pytest.mark.parametrize("broadcast", ["heads", "keys"])
@pytest.mark.parametrize("mask_dtype", [torch.float32, None], ids=["float32-mask", "qdtype-mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_additive_mask_broadcast(emu, dtype, mask_dtype, broadcast):
    t = _problem(2, 2, 1, 17, 77, 40, 40, gen_seed=5, mask=broadcast)
    m = _mask_as(t, mask_dtype or dtype)
    assert m.stride(1) == 0 and (broadcast == "heads") == (m.stride(3) != 0)
    _check(emu, t, dtype, mask_dtype=mask_dtype, causal=True)


# The attn_mask tile (attention_cuda_scores.cuh: MaskTile): the mask of each (query tile, key tile)
# is brought into shared memory, with 16-byte cp.async where the mask's rows allow it (keys
# contiguous, base and row stride 16-byte aligned) and plain loads otherwise, one row for every
# query when the mask is the same for all of them; the forward at head dim 256 reads it from
# global memory. Each layout below reaches the kernels as it is (_set_mask).
def _padded(n):
    return (n + 7) // 8 * 8  # a row of 8k values: 16-byte aligned rows in every mask dtype


def _mask_layout(layout, B, H, Sq, Sk):
    """(storage shape, view: storage -> the (B, H, Sq, Sk) mask the kernels get)."""
    ld = _padded(Sk)
    return {
        "queries": ((B, 1, 1, Sk), lambda s: s.expand(B, H, Sq, Sk)),
        "padded-rows": ((B, H, Sq, ld), lambda s: s[..., :Sk]),
        "heads-padded": ((B, 1, Sq, ld), lambda s: s[..., :Sk].expand(B, H, Sq, Sk)),
        "keys": ((B, 1, Sq, 1), lambda s: s.expand(B, H, Sq, Sk)),
        "row-unaligned": ((B, H, Sq, Sk + 1), lambda s: s[..., :Sk]),
        "base-unaligned": ((B * H * Sq * ld + 1,), lambda s: s[1:].view(B, H, Sq, ld)[..., :Sk]),
    }[layout]


def _tile_path(m):
    """"cp.async" where MaskTile copies with cp.async for batch 0, else "plain loads"."""
    elem = m.element_size()
    aligned = m.stride(3) == 1 and m.data_ptr() % 16 == 0 and (m.stride(2) * elem) % 16 == 0
    return "cp.async" if aligned else "plain loads"


MASK_CASES = {
    # layout: (B, H, Hk, Sq, Sk, D, causal, p, deterministic, tile path of batch 0)
    "queries": (2, 2, 1, 77, 130, 64, False, 0.0, False, "cp.async"),  # one row; batch 1's base is unaligned
    "padded-rows": (1, 2, 2, 77, 130, 128, True, 0.3, True, "cp.async"),  # partial tiles, a chunk across Sk
    "heads-padded": (2, 2, 2, 40, 96, 256, False, 0.0, True, "cp.async"),  # DP 256: fwd from global memory
    "keys": (1, 2, 1, 70, 70, 40, True, 0.0, False, "plain loads"),     # key stride 0
    "row-unaligned": (1, 2, 2, 64, 64, 64, False, 0.0, True, "plain loads"),  # rows of 65 values
    "base-unaligned": (2, 1, 1, 33, 72, 96, False, 0.0, False, "plain loads"),  # one value off 16 bytes
}
MASK_DTYPES = [(torch.float16, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("dtypes", MASK_DTYPES, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}-mask")
@pytest.mark.parametrize("layout", list(MASK_CASES))
def test_mask_tile(emu, layout, dtypes):
    dtype, mask_dtype = dtypes
    B, H, Hk, Sq, Sk, D, causal, p, deterministic, path = MASK_CASES[layout]
    t = _problem(B, H, Hk, Sq, Sk, D, D, gen_seed=len(layout) + 40)
    g = torch.Generator().manual_seed(41)
    shape, view = _mask_layout(layout, B, H, Sq, Sk)
    storage = torch.randn(shape, generator=g, dtype=torch.float64)
    storage = storage.masked_fill(torch.rand(shape, generator=g) < 0.2, float("-inf"))
    _set_mask(t, storage, view)
    assert _tile_path(_mask_as(t, mask_dtype)) == path, layout
    _check(emu, t, dtype, mask_dtype=mask_dtype, p=p, causal=causal, seed=77, deterministic=deterministic)


@pytest.mark.parametrize("D", [96, 128])
def test_forward_mask_without_the_tile(emu, D):
    """Where the DP 128 forward's mask tile does not fit the device (a float32 mask on sm_86 /
    sm_89: attention_cuda.cpp clears FwdParams::mask_tile), the general path reads the mask from
    global memory instead: the same results, partial tiles, causal and dropout included."""
    B, H, Sq, Sk = 1, 2, 77, 130
    t = _problem(B, H, H, Sq, Sk, D, D, gen_seed=D + 1)
    g = torch.Generator().manual_seed(D + 2)
    shape, view = _mask_layout("padded-rows", B, H, Sq, Sk)
    storage = torch.randn(shape, generator=g, dtype=torch.float64)
    _set_mask(t, storage.masked_fill(torch.rand(shape, generator=g) < 0.2, float("-inf")), view)
    _check(emu, t, torch.float16, mask_dtype=torch.float32, p=0.3, causal=True, seed=6, mask_tile=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bool_mask(emu, dtype):
    """A bool attn_mask (True = may attend) as the op converts it (ops/attention.py: 0 / -inf in q's
    dtype, still broadcast over heads), rows 16-byte aligned (cp.async): a query row that may attend
    to nothing gives out 0, lse -inf and no gradient."""
    from fusedformer.ops import attention as attention_op

    B, H, Sq, Sk = 2, 2, 70, 136
    t = _problem(B, H, H, Sq, Sk, 64, 64, gen_seed=31)
    allowed = torch.rand(B, 1, Sq, Sk, generator=torch.Generator().manual_seed(32)) > 0.3
    allowed[1, :, 5] = False
    q, k = t["q"].to(dtype), t["k"].to(dtype)
    additive = attention_op._normalize_masks("test", q, k, allowed, None, (B,), True)[0]
    assert additive.dtype == dtype and additive.stride(1) == 0 and _tile_path(additive) == "cp.async"
    t["attn_mask"] = additive
    t["mask_as"] = lambda dt: additive if dt == dtype else additive.to(dt)
    out, lse, dq, dk, dv = _check(emu, t, dtype)
    assert (out[1, :, 5] == 0).all() and torch.isneginf(lse[1, :, 5]).all() and (dq[1, :, 5] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_the_reference_mask(emu, dtype):
    # offset 3 puts the Philox block boundaries between the key pairs a lane owns.
    t = _problem(1, 2, 1, 77, 130, 64, 64, gen_seed=7)
    _check(emu, t, dtype, p=0.3, seed=1234, offset=3)


def test_dropout_with_masks_and_gqa(emu):
    t = _problem(2, 4, 2, 64, 17, 40, 40, gen_seed=8, mask="heads", padding=True)
    _check(emu, t, torch.bfloat16, p=0.3, causal=True, seed=99, offset=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_backward(emu, dtype):
    t = _problem(1, 4, 2, 77, 130, 64, 64, gen_seed=11)
    first = _check(emu, t, dtype, p=0.3, causal=True, seed=5, offset=0, deterministic=True)
    again = _run_emu(emu, t, dtype, dtype, 0.3, True, 1.0 / 8, 5, 0, deterministic=True)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, again):
        assert torch.equal(a, b), f"{name}: the deterministic run is not bitwise reproducible"


@pytest.mark.parametrize("Sk", [70, 80], ids=lambda n: {70: "plain-loads", 80: "cp.async"}[n])
@pytest.mark.parametrize("mask_dtype", [torch.float32, None], ids=["float32-mask", "qdtype-mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_masked_by_finfo_min(emu, dtype, mask_dtype, Sk):
    """Hugging Face's masks: finfo(mask dtype).min over whole query rows (left padding) and over
    some keys; such rows attend uniformly (reference.py, masking values), with exact gradients.
    Rows of 70 values take the mask tile's plain loads, rows of 80 its cp.async copies."""
    t = _problem(2, 2, 2, 33, Sk, 64, 64, gen_seed=14)
    low = torch.finfo(mask_dtype or dtype).min
    m = torch.zeros(2, 1, 33, Sk, dtype=torch.float64)
    m[0, :, :5, :] = low
    m[1, :, 7, 10:] = low
    m[:, :, :, 64:] = low
    _set_mask(t, m, lambda s: s.expand(2, 2, 33, Sk))
    assert _tile_path(_mask_as(t, mask_dtype or dtype)) == ("cp.async" if Sk == 80 else "plain loads")
    out, lse, *_ = _check(emu, t, dtype, mask_dtype=mask_dtype, causal=True)
    if low <= reference.MASKING_THRESHOLD:  # float16's -65504 is not a masking value (softmax of q . k)
        uniform = t["v"][0, :, :5].double().cumsum(1) / torch.arange(1, 6, dtype=torch.float64)[:, None]
        assert (out[0, :, :5].double() - uniform).abs().max() < 3e-2  # causal: row i averages keys 0..i


def test_a_nan_score_row_gives_nan(emu):
    """A NaN in a query row makes every score of that row NaN: its output is NaN (torch's), the
    other rows are unaffected (by the 2x rule)."""
    t = _problem(1, 2, 2, 17, 40, 64, 64, gen_seed=15)
    t["q"][0, 1, 3, 0] = float("nan")
    out = _run_emu(emu, t, torch.bfloat16, torch.bfloat16, 0.0, False, 1 / 8, 0, 0)[0]
    assert torch.isnan(out[0, 1, 3]).all(), f"NaN row became {out[0, 1, 3]}"
    t["q"][0, 1, 3, 0] = 0.0
    base = _reference(t, torch.bfloat16, torch.bfloat16, 0.0, False, 1 / 8, 0, 0)[0]
    ref = _reference(t, torch.float64, torch.bfloat16, 0.0, False, 1 / 8, 0, 0)[0]
    keep = torch.ones(17, dtype=torch.bool)
    keep[3] = False
    assert_2x("other rows", OP, out[0, 1][keep], ref[0, 1][keep], base[0, 1][keep], torch.bfloat16)


# Tile paths (attention_cuda.cuh: TilePath, KeyRange): a key tile nothing can hide takes the plain
# path (scale only), a tile that causal masking, key padding, an attn_mask or the key bound cuts takes
# the general one, and tiles past the last visible key are never visited (their dK / dV are zeros).
# Dropout draws are shared between lanes when offset and Sk are multiples of 8 (a Philox block's eight
# draws), else drawn per lane.
def _right_padding(Sk, lengths):
    kpm = torch.ones(len(lengths), Sk, dtype=torch.bool)
    for b, n in enumerate(lengths):
        kpm[b, :n] = False
    return kpm


TILE_CASES = {
    # name: (B, H, Hk, Sq, Sk, D, causal, padding, p, offset)
    "plain": (1, 4, 2, 128, 192, 64, False, None, 0.0, 0),               # every tile plain, GQA
    "causal-diagonal": (1, 2, 2, 192, 192, 128, True, None, 0.0, 0),     # plain below the diagonal
    "right-padding": (4, 2, 2, 70, 192, 64, False, [192, 100, 64, 0], 0.0, 0),  # boundary, skipped, empty rows
    "padding-holes": (2, 2, 1, 70, 192, 40, False, "holes", 0.0, 0),     # clean < end: general tiles between
    "dropout-shared": (2, 2, 2, 70, 192, 64, False, [192, 77], 0.3, 0),  # Philox blocks shared by lanes
    "dropout-sk-unaligned": (1, 2, 2, 70, 190, 64, True, None, 0.3, 0),  # Sk % 8 != 0: per-lane draws
    "dropout-sk-half-block": (1, 2, 2, 70, 188, 64, False, None, 0.3, 0),  # Sk % 8 == 4: per-lane draws
    "dropout-offset-unaligned": (1, 2, 2, 70, 192, 64, False, None, 0.3, 2),
    "dropout-offset-half-block": (1, 2, 2, 70, 192, 64, False, None, 0.3, 4),
    "dropout-shared-128": (1, 2, 1, 130, 136, 128, True, [136], 0.3, 8),  # 8-warp forward, shared, offset 8
    "dropout-256": (1, 1, 1, 40, 96, 256, True, None, 0.3, 0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(TILE_CASES))
def test_tile_paths(emu, dtype, case):
    B, H, Hk, Sq, Sk, D, causal, padding, p, offset = TILE_CASES[case]
    t = _problem(B, H, Hk, Sq, Sk, D, D, gen_seed=len(case))
    if padding == "holes":
        kpm = torch.zeros(B, Sk, dtype=torch.bool)
        kpm[:, 10] = True
        kpm[1, 70:75] = True
        kpm[:, 130:] = True
        t["key_padding_mask"] = kpm
    elif padding is not None:
        t["key_padding_mask"] = _right_padding(Sk, padding)
    out, lse, dq, dk, dv = _check(emu, t, dtype, p=p, causal=causal, seed=4321, offset=offset)
    if isinstance(padding, list):
        for b, n in enumerate(padding):  # keys past the length: never visited, zero gradients
            assert (dk[b, :, n:] == 0).all() and (dv[b, :, n:] == 0).all()
            if n == 0:
                assert torch.isneginf(lse[b]).all() and (out[b] == 0).all() and (dq[b] == 0).all()


def test_tile_paths_deterministic_with_padding_and_dropout(emu):
    t = _problem(2, 2, 2, 130, 192, 64, 64, gen_seed=21)
    t["key_padding_mask"] = _right_padding(192, [150, 64])
    first = _check(emu, t, torch.bfloat16, p=0.3, seed=8, offset=0, deterministic=True)
    again = _run_emu(emu, t, torch.bfloat16, torch.bfloat16, 0.3, False, 1.0 / 8, 8, 0, deterministic=True)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, again):
        assert torch.equal(a, b), f"{name}: the deterministic run is not bitwise reproducible"


def test_a_nan_score_row_gives_nan_on_the_plain_path(emu):
    """The plain path's row max skips NaN (fmaxf) but the NaN reaches the sum: the row is NaN."""
    t = _problem(1, 1, 1, 64, 128, 64, 64, gen_seed=22)
    t["q"][0, 0, 5, 3] = float("nan")
    out = _run_emu(emu, t, torch.float16, torch.float16, 0.0, False, 1 / 8, 0, 0)[0]
    assert torch.isnan(out[0, 0, 5]).all(), f"NaN row became {out[0, 0, 5]}"
    assert not torch.isnan(out[0, 0, :5]).any() and not torch.isnan(out[0, 0, 6:]).any()
