"""The SIMT emulator (csrc/simt/simt_emu.h) against expectations derived here from the PTX ISA and
the CUDA programming guide — fragment layouts of mma.m16n8k16 and ldmatrix, cp.async group
semantics, shuffle semantics — and its error paths. The kernels are in csrc/tests/emu/emu_simt.cpp;
they pass registers through unchanged, so every layout formula below is the test's own."""
import time

import pytest
import torch

from emu_build import load_emu

SRC = ["csrc/tests/emu/emu_simt.cpp"]


@pytest.fixture(scope="module")
def emu():
    return load_emu("emu_simt", SRC)


def bits16(x: torch.Tensor) -> torch.Tensor:
    """The 16-bit patterns of a half/bfloat16 tensor as int64 in [0, 65536)."""
    return x.view(torch.int16).to(torch.int64) & 0xFFFF


def pack(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Two 16-bit patterns into one 32-bit register (lo in the low half), as int32."""
    v = lo | (hi << 16)
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def unpack(r: torch.Tensor):
    r = r.to(torch.int64) & 0xFFFFFFFF
    return r & 0xFFFF, r >> 16


# PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type": groupID = lane >> 2,
# threadID_in_group = lane % 4. A (16x16) element a_i of a lane: row groupID (+8 for i in {2,3,6,7}),
# column 2*threadID_in_group + (i & 1) (+8 for i >= 4); registers hold (a0,a1), (a2,a3), (a4,a5), (a6,a7).
# B (16x8): b_i at row 2*threadID_in_group + (i & 1) (+8 for i >= 2), column groupID; registers
# (b0,b1), (b2,b3). C/D (16x8): c_i at row groupID (+8 for i >= 2), column 2*threadID_in_group + (i & 1).
def a_pos(lane, i):
    g, t = lane >> 2, lane % 4
    return g + (8 if i in (2, 3, 6, 7) else 0), 2 * t + (i & 1) + (8 if i >= 4 else 0)


def b_pos(lane, i):
    g, t = lane >> 2, lane % 4
    return 2 * t + (i & 1) + (8 if i >= 2 else 0), g


def c_pos(lane, i):
    g, t = lane >> 2, lane % 4
    return g + (8 if i >= 2 else 0), 2 * t + (i & 1)


def fragments(A, B, C):
    a_bits, b_bits = bits16(A), bits16(B)
    ra = torch.zeros(32, 4, dtype=torch.int32)
    rb = torch.zeros(32, 2, dtype=torch.int32)
    rc = torch.zeros(32, 4, dtype=torch.float32)
    for lane in range(32):
        for r in range(4):
            ra[lane, r] = pack(a_bits[a_pos(lane, 2 * r)], a_bits[a_pos(lane, 2 * r + 1)])
            rc[lane, r] = C[c_pos(lane, r)]
        for r in range(2):
            rb[lane, r] = pack(b_bits[b_pos(lane, 2 * r)], b_bits[b_pos(lane, 2 * r + 1)])
    return ra, rb, rc


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_m16n8k16(emu, dtype):
    g = torch.Generator().manual_seed(1 if dtype == torch.float16 else 2)
    A = torch.randn(16, 16, generator=g).to(dtype)
    B = torch.randn(16, 8, generator=g).to(dtype)
    C = torch.randn(16, 8, generator=g)
    ra, rb, rc = fragments(A, B, C)
    d = emu.mma(ra, rb, rc, dtype == torch.bfloat16, 1)
    D = torch.empty(16, 8)
    for lane in range(32):
        for i in range(4):
            D[c_pos(lane, i)] = d[lane, i]
    want = A.double() @ B.double() + C.double()
    # 17 float32 roundings of sums bounded by sum |a b| + |c|
    bound = 17 * 2.0**-24 * ((A.double().abs() @ B.double().abs()) + C.double().abs()) + 1e-30
    assert ((D.double() - want).abs() <= bound).all(), (D.double() - want).abs().max()
    # a wrong layout would be off by O(1), not by rounding
    assert (D.double() - want).abs().max() < 1e-4


def test_mma_accumulates(emu):
    A = torch.eye(16, dtype=torch.float16)
    B = torch.arange(128, dtype=torch.float32).reshape(16, 8).to(torch.float16)
    ra, rb, rc = fragments(A, B, torch.zeros(16, 8))
    d = emu.mma(ra, rb, rc, False, 3)  # three applications of D += A B
    D = torch.empty(16, 8)
    for lane in range(32):
        for i in range(4):
            D[c_pos(lane, i)] = d[lane, i]
    torch.testing.assert_close(D, 3 * B.float(), rtol=0, atol=0)


# PTX ISA, ldmatrix: for .x1/.x2/.x4, threads 0-7 / 0-15 / 0-31 give the row addresses, lanes
# 8m..8m+7 the rows 0..7 of matrix m. Each thread receives, for matrix m, the two 16-bit elements
# at row lane/4, columns 2*(lane%4) and +1 (the low half holds the first); with .trans the matrix
# is transposed, i.e. elements at rows 2*(lane%4), +1 and column lane/4.
@pytest.mark.parametrize("variant,nmat,trans", [(0, 4, False), (1, 4, True), (2, 2, False), (3, 2, True)])
def test_ldmatrix(emu, variant, nmat, trans):
    g = torch.Generator().manual_seed(10 + variant)
    n = 64 * 16  # 64 rows of 16 elements
    image = torch.randint(-(2**15), 2**15, (n,), generator=g, dtype=torch.int16)
    rows = torch.randperm(64, generator=g)[:32]
    offsets = (rows * 16 + 8 * torch.randint(0, 2, (32,), generator=g)).to(torch.int32)  # 16-byte aligned
    if nmat == 2:
        offsets[16:] = 7 * 8  # lanes 16-31's addresses are ignored by .x2 (any value)
    r = emu.ldmatrix(image, offsets, variant)
    img = image.to(torch.int64) & 0xFFFF

    def elem(m, row, col):
        return int(img[int(offsets[8 * m + row]) + col])

    for lane in range(32):
        gq, t = lane // 4, lane % 4
        lo, hi = unpack(r[lane])
        for m in range(nmat):
            if trans:
                want = (elem(m, 2 * t, gq), elem(m, 2 * t + 1, gq))
            else:
                want = (elem(m, gq, 2 * t), elem(m, gq, 2 * t + 1))
            assert (int(lo[m]), int(hi[m])) == want, (lane, m)


def test_cp_async_groups_zero_fill_and_stale_reads(emu):
    n = 64
    g = torch.Generator().manual_seed(3)
    src = torch.randn(n, 4, generator=g)
    src2 = torch.randn(n, 4, generator=g)
    pred = torch.rand(n, generator=g) < 0.7
    pred[0], pred[1] = True, False
    out = emu.cp_async(src, src2, pred, -7.0)
    # before any wait the issued copies have not landed: the old contents
    assert (out[0] == -7.0).all()
    # wait<1> retires group 0: its copies (zeros where pred is false) ...
    want0 = torch.where(pred[:, None], src, torch.zeros(()))
    torch.testing.assert_close(out[1], want0, rtol=0, atol=0)
    # ... but not group 1, whose slot still holds the 0xff fill of fresh shared memory (NaN)
    assert torch.isnan(out[2]).all()
    torch.testing.assert_close(out[3], src2, rtol=0, atol=0)


def shfl_expected(value, arg, mode, width):
    out = torch.empty_like(value)
    for i in range(value.numel()):
        lane, base = i % 32, i - i % 32
        start = lane - lane % width
        end = start + width - 1
        a = int(arg[lane])
        if mode == 0:  # xor: a later group's lane gives back the caller's own value
            src = lane ^ a
            src = lane if src > end else src
        elif mode == 1:  # idx: srcLane modulo width, within the caller's group
            src = start + a % width
        elif mode == 2:  # up: lanes below the group's start keep their value
            src = lane - a
            src = lane if src < start else src
        else:  # down
            src = lane + a
            src = lane if src > end else src
        out[i] = value[base + src]
    return out


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("width", [32, 8, 1])
def test_shuffles(emu, mode, width):
    g = torch.Generator().manual_seed(100 * mode + width)
    value = torch.randn(64, generator=g)
    hi = 32 if mode < 2 else width + 1
    arg = torch.randint(0, hi, (32,), generator=g, dtype=torch.int32)
    got = emu.shfl(value, arg, mode, width)
    torch.testing.assert_close(got, shfl_expected(value, arg, mode, width), rtol=0, atol=0)


@pytest.mark.parametrize("blocks,threads", [(3, 256), (2000, 64), (1, 1024)])
def test_warp_block_sum_and_atomic_add(emu, blocks, threads):
    g = torch.Generator().manual_seed(blocks)
    x = torch.randn(blocks, threads, generator=g)
    ow, ob, total = emu.reduce(x)
    xd = x.double()
    tol = dict(rtol=0, atol=1e-4 * threads**0.5)
    torch.testing.assert_close(ow.double(), xd.reshape(blocks, threads // 32, 32).sum(-1), **tol)
    torch.testing.assert_close(ob.double(), xd.sum(-1), **tol)
    torch.testing.assert_close(total.double(), xd.sum().reshape(1), rtol=0, atol=1e-4 * (blocks * threads) ** 0.5)


def test_builtins_and_warp_composition(emu):
    grid, block = (3, 2, 2), (8, 4, 2)
    out = emu.builtins(list(grid), list(block))
    nt = 64
    for b in range(12):
        bx, by, bz = b % 3, (b // 3) % 2, b // 6
        for lin in range(nt):
            tx, ty, tz = lin % 8, (lin // 8) % 4, lin // 32
            row = out[b, lin].tolist()
            assert row[:6] == [bx, by, bz, tx, ty, tz]
            assert row[6:8] == [80402, 30202]
            assert row[8] == lin - lin % 32  # warps are consecutive linear ids, x fastest
            ballot = sum(1 << l for l in range(32) if (lin - lin % 32 + l) % 3 == 0)
            assert row[9] & 0xFFFFFFFF == ballot


def test_missing_barrier_is_visible(emu):
    want = torch.arange(32, dtype=torch.float32)
    for _ in range(3):
        torch.testing.assert_close(emu.handoff(True), want, rtol=0, atol=0)
    # Without the barrier, warp 1 runs before warp 0 in some schedules and reads unwritten (NaN)
    # shared memory; 16 launches with the random scheduler all agreeing would be a miracle.
    results = [emu.handoff(False) for _ in range(16)]
    assert any(torch.isnan(r).any() for r in results)


def test_uninitialised_shared_memory_is_nan(emu):
    assert torch.isnan(emu.uninit()).all()


def test_philox_compiles_and_matches_host(emu):
    from fusedformer import rng

    got = emu.philox(1234, 8, 0.3)
    want = rng.dropout_multiplier((64,), 0.3, 1234, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert 0 < int((got == 0).sum()) < 64


def test_byte_perm(emu):
    """Byte k of __byte_perm(x, y, s) is byte (s >> 4k) & 7 of the eight bytes y:x, computed here
    byte by byte, for the selectors the attention dropout transposes use and others; selector
    nibbles above 7 (sign replication in PTX's prmt) are refused, not emulated."""
    g = torch.Generator().manual_seed(5)
    words = torch.randint(0, 2**32, (24, 2), generator=g, dtype=torch.int64).tolist()
    for x, y in words:
        both = x | (y << 32)
        for s in (0x3210, 0x7654, 0x5410, 0x7632, 0x3254, 0x3276, 0x7610, 0x0123, 0x4444, 0x1756):
            want = sum(((both >> (8 * ((s >> (4 * k)) & 7))) & 0xFF) << (8 * k) for k in range(4))
            assert emu.byte_perm(x, y, s) == want, (hex(x), hex(y), hex(s))
    assert emu.byte_perm(0x33221100, 0x77665544, 0x5410) == 0x55441100
    with pytest.raises(RuntimeError, match="not emulated"):
        emu.byte_perm(1, 2, 0x8000)


def test_mma_loop_is_fast(emu):
    t0 = time.perf_counter()
    out = emu.mma_loop(4, 400)
    dt = time.perf_counter() - t0
    assert torch.isfinite(out).all()
    assert (out[:32] == out[32:64]).all()  # the warps computed the same thing
    # 4 warps x 400 x (2 ldmatrix + 1 mma); measured ~0.05 s on the 2-core dev machine
    assert dt < 1.0, f"emulated mma loop took {dt:.2f} s"


@pytest.mark.parametrize(
    "which,pattern",
    [
        (0, r"__syncthreads.*wait for this lane at __shfl_xor_sync|__shfl_xor_sync.*wait at __syncthreads"),
        (1, r"divergent warp collectives"),
        # which side is seen first depends on the (seeded, per-launch) fiber order
        (2, r"lanes [\d,-]+ of this warp have already exited but the collective needs them"
            r"|the thread exits while lanes [\d,-]+ of its warp wait for it"),
        (3, r"exits with 1 cp.async copies never retired"),
        (4, r"cp_async_16 at emu_simt.cpp:\d+: destination .* outside the block's dynamic shared memory"),
        (5, r"ldmatrix_x4: lane 7's row address .* not 16-byte aligned"),
        (6, r"divergent warp collectives"),
        (7, r"reads lane 20, which is not in the mask 0xffff"),
        (8, r"divergent warp"),
        (9, r"kernel-side failure"),
    ],
)
def test_errors_name_kernel_thread_and_collective(emu, which, pattern):
    with pytest.raises(RuntimeError, match=pattern) as e:
        emu.bad(which)
    msg = str(e.value)
    assert "simt emulation: " in msg and "bad_kernel" in msg and "block (" in msg and "thread (" in msg
    # the emulator is usable after a failed launch
    torch.testing.assert_close(emu.handoff(True), torch.arange(32, dtype=torch.float32), rtol=0, atol=0)
