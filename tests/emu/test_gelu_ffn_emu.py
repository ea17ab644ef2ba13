"""The gelu_ffn CUDA kernels (csrc/gelu_ffn/gelu_ffn_cuda.cuh, launchers gelu_ffn_cuda_*.cu) and their
host code (gelu_ffn_cuda.cpp) on the CPU through the SIMT emulator: the same sources nvcc and the host
compiler build into fusedformer._C, compiled by g++ with -DFF_SIMT_EMULATION into a test-only
extension (csrc/tests/emu/emu_gelu_ffn.cpp).

Forward and backward against the float64 reference by the 2x rule (y, pre, dx, dw1, db1, dw2,
db2), on widths that are multiples of 8 but not of the tiles (C = 40, F = 136, C2 = 24), 1 to 130
rows, both GELUs, dropout (the mask compared with fusedformer.rng's), with and without biases,
both tile configurations; the GEMM alone in both layouts against torch.matmul; every output
written inside a NaN-filled buffer whose guard bands must come back untouched."""

import pytest
import torch

from fusedformer import reference, rng
from fusedformer.testing import gelu_ffn_inputs
from numerics import assert_2x

import emu_build  # noqa: E402  (tests/emu/; a broken emulator build fails, never skips)

OP = "gelu_ffn"
C, F, C2 = 40, 136, 24           # multiples of 8, not of the 64 / 128 tiles
AUTO, LARGE, SMALL = 0, 1, 2     # tile choice (TileChoice in gelu_ffn_cuda.cuh)
GUARD = 24                       # guard elements each side (48 bytes: keeps 16-byte alignment)


@pytest.fixture(scope="module")
def emu():
    return emu_build.load_emu("emu_gelu_ffn", ["csrc/tests/emu/emu_gelu_ffn.cpp", "csrc/gelu_ffn/gelu_ffn_cuda.cpp"])


class Guarded:
    """A NaN-filled flat buffer with ``GUARD`` elements either side of the tensor the kernel writes."""

    def __init__(self, shape, dtype, row_pad=0):
        rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        self.ld = cols + row_pad
        self.buf = torch.full((GUARD + rows * self.ld + GUARD,), float("nan"), dtype=dtype)
        inner = self.buf[GUARD:GUARD + rows * self.ld].view(rows, self.ld)[:, :cols]
        self.view = inner.reshape(shape) if row_pad == 0 else inner
        self.pristine = self.buf.clone()
        self.mask = torch.ones_like(self.buf, dtype=torch.bool)  # True: must stay untouched
        self.mask[GUARD:GUARD + rows * self.ld].view(rows, self.ld)[:, :cols] = False

    def assert_untouched(self, name):
        bits = torch.int16
        assert torch.equal(self.buf.view(bits)[self.mask], self.pristine.view(bits)[self.mask]), \
            f"{name}: the kernel wrote outside its output"


def _masters(M, biases, gen_seed):
    g = torch.Generator().manual_seed(gen_seed)
    t = gelu_ffn_inputs(g, (M,), C, F, C2, x_scale=2.0, biases=biases)
    t["dy"] = torch.randn(M, C2, generator=g, dtype=torch.float64)
    return t


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _reference(m, dtype, approximate, p, seed, offset):
    """The reference forward and backward in ``dtype``: (y, pre, dx, dw1, db1, dw2, db2)."""
    t = {k: _cast(v, dtype) for k, v in m.items()}
    seed_t = torch.tensor([seed]) if p > 0 else None
    y, pre = reference.gelu_ffn_fwd(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], approximate, p, seed_t, offset)
    grads = reference.gelu_ffn_bwd(t["dy"], t["x"], t["w1"], t["w2"], pre, approximate, p, seed_t, offset,
                                   m["b1"] is not None, m["b2"] is not None)
    return (y, pre) + tuple(grads)


# (M, dtype, approximate, dropout_p, biases, tile)
CASES = [
    (1, torch.float16, "none", 0.0, True, AUTO),
    (5, torch.bfloat16, "tanh", 0.2, True, SMALL),
    (70, torch.float16, "tanh", 0.2, False, LARGE),
    (70, torch.bfloat16, "none", 0.0, False, SMALL),
    (130, torch.float16, "none", 0.2, True, SMALL),
    (130, torch.bfloat16, "tanh", 0.0, True, LARGE),
]


@pytest.mark.parametrize("M,dtype,approximate,p,biases,tile", CASES,
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, bool) else
                         ("biases" if v else "no_biases"))
def test_forward_backward(emu, M, dtype, approximate, p, biases, tile):
    seed, offset = 2**33 + 17, 77  # an odd offset: column pairs that straddle two Philox blocks
    m = _masters(M, biases, gen_seed=M * 7 + int(p * 10) + tile)
    t = {k: _cast(v, dtype) for k, v in m.items()}
    tanh = approximate == "tanh"

    y, pre = Guarded((M, C2), dtype), Guarded((M, F), dtype)
    emu.fwd(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], y.view, pre.view, tanh, p, seed, offset, tile, 132)
    grads = {"dx": Guarded((M, C), dtype), "dw1": Guarded((F, C), dtype), "dw2": Guarded((C2, F), dtype),
             "db1": Guarded((F,), dtype) if biases else None, "db2": Guarded((C2,), dtype) if biases else None}
    view = {k: (g.view if g is not None else None) for k, g in grads.items()}
    emu.bwd(t["dy"], t["x"], t["w1"], t["w2"], pre.view, view["dx"], view["dw1"], view["db1"], view["dw2"],
            view["db2"], tanh, p, seed, offset, tile, 132)

    names = ["y", "pre", "dx", "dw1", "db1", "dw2", "db2"]
    outs = [y, pre] + [grads[n] for n in names[2:]]
    ref64 = _reference(m, torch.float64, approximate, p, seed, offset)
    base = _reference(m, dtype, approximate, p, seed, offset)
    for name, out, r, b in zip(names, outs, ref64, base):
        if out is None:
            continue
        out.assert_untouched(name)
        assert_2x(name, OP, out.view, r, b)
    if p > 0:
        keep = rng.keep_mask((M, C2), p, seed, offset)
        assert torch.equal(y.view != 0, keep), "dropped outputs differ from fusedformer.rng's mask"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["NT", "NN"])
@pytest.mark.parametrize("tile", [LARGE, SMALL], ids=["large", "small"])
def test_gemm(emu, dtype, layout, tile):
    """c = a b^T (NT: b is (N, K)) or a b (NN: b is (K, N)), M, N, K ragged against both tiles, c a
    strided view inside a guard-banded buffer."""
    M, K, N = 131, 72, 136
    g = torch.Generator().manual_seed(3 + tile)
    a64 = torch.randn(M, K, generator=g, dtype=torch.float64)
    b64 = torch.randn(N, K, generator=g, dtype=torch.float64)
    if layout == "NN":
        b64 = b64.t().contiguous()
    a, b = a64.to(dtype), b64.to(dtype)
    c = Guarded((M, N), dtype, row_pad=8)
    emu.gemm(a, b, c.view, layout == "NN", tile)
    c.assert_untouched("c")
    bt = b if layout == "NN" else b.t()
    ref64 = a.double() @ bt.double()  # the rounded inputs: only the GEMM's own error is measured
    assert_2x("c", OP, c.view, ref64, a @ bt)
