"""gelu_ffn on every backend against the float64 reference (the 2x rule), output and every
gradient; the dropout mask bit for bit against fusedformer.rng; the reference against
F.linear / F.gelu; bad input named in a TypeError / ValueError.

Shapes are awkward on purpose: one row, odd widths (7, 33, 1023, 1500), C2 != C, inputs with
leading batch dims and non-contiguous layouts, enough rows for several row blocks of the CPU kernel."""
import math

import pytest
import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer import reference, rng
from fusedformer.backends import BackendError
from fusedformer.ops import gelu_ffn as op_module

from conftest import HAS_GPU, args_with, dtype_for, skip_unless_available
from numerics import check_against_reference

INTERPRETER_SKIP = "interpreter: covered by tests/triton/test_triton.py; the full sweep runs on GPU"


def _skip_if_slow_here(backend, M, C, F_, C2):
    """The Triton interpreter runs a kernel element by element: only tiny problems here."""
    if backend == "triton" and not HAS_GPU and M * F_ * (C + C2) > 32768:
        pytest.skip(INTERPRETER_SKIP)


def _transposed_storage(t):
    """The same values with the storage of its transpose (as HF's Conv1D weight, seen as (out, in))."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _inputs(shape_x, C, F_, C2, *, biases=True, gen_seed=0, noncontig=False, conv1d_weights=False):
    """float64 masters: x (..., C) with entries ~N(0, 2^2) so the GELU sees both tails."""
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(*shape_x, C, generator=g, dtype=torch.float64) * 2
    if noncontig:  # same values, transposed storage
        x = _transposed_storage(x)
    w1 = torch.randn(F_, C, generator=g, dtype=torch.float64) / math.sqrt(C)
    w2 = torch.randn(C2, F_, generator=g, dtype=torch.float64) / math.sqrt(F_)
    if conv1d_weights:
        w1, w2 = _transposed_storage(w1), _transposed_storage(w2)
    return {
        "x": x,
        "w1": w1,
        "b1": torch.randn(F_, generator=g, dtype=torch.float64) if biases else None,
        "w2": w2,
        "b2": torch.randn(C2, generator=g, dtype=torch.float64) if biases else None,
    }


def _ffn_fn(approximate="none", dropout_p=0.0, seed=None, offset=0):
    def fn(t, backend):
        try:
            return ff.gelu_ffn(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], approximate, dropout_p, seed=seed,
                               offset=offset, backend=backend)
        except BackendError as exc:
            if backend in ("cpu", "reference"):
                raise
            pytest.skip(f"{backend} cannot take these inputs: {exc}")
    return fn


def _grads(biases):
    return ("x", "w1", "b1", "w2", "b2") if biases else ("x", "w1", "w2")


# (leading dims of x, C, F, C2)
SMALL = [
    ((1,), 16, 64, 16),            # one row
    ((7,), 33, 130, 33),           # odd widths
    ((3, 43), 64, 256, 48),        # batch dims, C2 != C
]
LARGE = [
    ((37,), 1023, 1500, 1023),     # the design brief's awkward widths
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Every dtype and GELU on the small shapes; on the large ones (slow low-precision GEMMs in the
# reference) float32 with erf and bfloat16 with tanh.
CASES = ([(s, d, a) for s in SMALL for d in DTYPES for a in ("none", "tanh")]
         + [(s, d, a) for s in LARGE for d, a in ((torch.float32, "none"), (torch.bfloat16, "tanh"))])


@pytest.mark.parametrize("shape,dtype,approximate", CASES,
                         ids=lambda v: "x".join(map(str, v[0] + v[1:])) if isinstance(v, tuple) else str(v))
def test_shapes(backend, dtype, approximate, shape):
    device = skip_unless_available(op_module, backend)
    lead, C, F_, C2 = shape
    M = math.prod(lead)
    _skip_if_slow_here(backend, M, C, F_, C2)
    inputs = _inputs(lead, C, F_, C2, gen_seed=C + F_)
    check_against_reference("gelu_ffn", _ffn_fn(approximate), inputs, backend, dtype, device, _grads(True))


def test_several_row_blocks(backend):
    """Long inputs run in row blocks (1024 rows at F = 8192 on the CPU), the weight gradients
    accumulated over blocks; 1030 rows make a full and a ragged block."""
    if backend == "reference":
        pytest.skip("the reference has no row blocks (it would be compared with itself)")
    device = skip_unless_available(op_module, backend)
    lead, C, F_, C2 = (1030,), 8, 8192, 12
    _skip_if_slow_here(backend, 1030, C, F_, C2)
    inputs = _inputs(lead, C, F_, C2, gen_seed=8)
    check_against_reference("gelu_ffn", _ffn_fn("tanh", 0.1, seed=5), inputs, backend, dtype_for(backend), device,
                            _grads(True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("biases", [True, False], ids=["biases", "no_biases"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.15])
def test_biases_dropout_and_layout(backend, dtype, biases, dropout_p):
    """No biases and/or dropout (same seed and offset as the reference), a non-contiguous input."""
    device = skip_unless_available(op_module, backend)
    lead, C, F_, C2 = (5, 61), 48, 200, 40
    _skip_if_slow_here(backend, 5 * 61, C, F_, C2)
    inputs = _inputs(lead, C, F_, C2, biases=biases, gen_seed=7, noncontig=True)
    fn = _ffn_fn("tanh", dropout_p, seed=2**35 + 3, offset=77)
    check_against_reference("gelu_ffn", fn, inputs, backend, dtype, device, _grads(biases))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transposed_weights(backend, dtype):
    """Weights stored transposed (HF Conv1D's (in, out), seen as (out, in)), with dropout: every
    backend within the 2x rule."""
    device = skip_unless_available(op_module, backend)
    lead, C, F_, C2 = (3, 29), 40, 136, 24
    _skip_if_slow_here(backend, 3 * 29, C, F_, C2)
    inputs = _inputs(lead, C, F_, C2, gen_seed=11, conv1d_weights=True)
    assert not inputs["w1"].is_contiguous() and inputs["w1"].t().is_contiguous()
    fn = _ffn_fn("tanh", 0.1, seed=5, offset=3)
    check_against_reference("gelu_ffn", fn, inputs, backend, dtype, device, _grads(True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_reads_transposed_weights_in_place(dtype, monkeypatch):
    """The cpu backend hands transposed weights to its GEMMs as they are: no copy of a weight is
    made on the way in (the op's input is the caller's storage), the weight gradients come back in
    the weights' layout, and the values equal those of the same weights stored row-major."""
    skip_unless_available(op_module, "cpu")
    t = _inputs((2, 17), 32, 96, 24, gen_seed=3, conv1d_weights=True)
    x, b1, b2 = (t[k].to(dtype) for k in ("x", "b1", "b2"))
    w1, w2 = (t[k].to(dtype).requires_grad_() for k in ("w1", "w2"))
    seen, real = [], op_module.OPS

    def spy(*args):  # what gelu_ffn hands the op
        seen.extend(a for a in args if isinstance(a, torch.Tensor))
        return real(*args)

    monkeypatch.setattr(op_module, "OPS", spy)
    y = ff.gelu_ffn(x, w1, b1, w2, b2, "tanh", backend="cpu")
    monkeypatch.undo()
    assert any(a.data_ptr() == w1.data_ptr() and a.stride() == w1.stride() for a in seen), "w1 was copied"
    assert any(a.data_ptr() == w2.data_ptr() and a.stride() == w2.stride() for a in seen), "w2 was copied"
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dw1, dw2 = torch.autograd.grad(y, (w1, w2), up)
    assert dw1.stride() == w1.stride() and dw2.stride() == w2.stride()
    w1r, w2r = (w.detach().contiguous().requires_grad_() for w in (w1, w2))
    yr = ff.gelu_ffn(x, w1r, b1, w2r, b2, "tanh", backend="cpu")
    dw1r, dw2r = torch.autograd.grad(yr, (w1r, w2r), up)
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(y, yr, **tol)  # the same GEMMs on a different layout: rounding may differ
    torch.testing.assert_close(dw1, dw1r, **tol)
    torch.testing.assert_close(dw2, dw2r, **tol)


def test_dropout_mask_is_the_shared_rng(backend):
    """The dropped outputs are exactly fusedformer.rng's mask (element m * C2 + c) and the kept ones
    are the undropped output / (1 - p); the same seed repeats, another seed differs."""
    device = skip_unless_available(op_module, backend)
    M, C, F_, C2 = 16, 16, 32, 40
    _skip_if_slow_here(backend, M, C, F_, C2)
    dtype = dtype_for(backend)
    t = {k: (v.to(device, dtype) if v is not None else None) for k, v in _inputs((M,), C, F_, C2, gen_seed=9).items()}
    p, seed, offset = 0.4, 31337, 5
    args = (t["x"], t["w1"], t["b1"], t["w2"], t["b2"], "none")
    plain = ff.gelu_ffn(*args, backend=backend)
    dropped = ff.gelu_ffn(*args, p, seed=seed, offset=offset, backend=backend)
    keep = rng.keep_mask((M, C2), p, seed, offset)
    assert (plain != 0).all()
    assert torch.equal(dropped.cpu() != 0, keep), "dropped entries differ from fusedformer.rng's mask"
    # 16-bit outputs: both sides are rounded once more (one ulp of the dtype)
    tol = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=1e-6)
    torch.testing.assert_close(dropped.float().cpu(), plain.float().cpu() * keep / (1 - p), **tol)
    assert torch.equal(dropped, ff.gelu_ffn(*args, p, seed=seed, offset=offset, backend=backend))
    assert not torch.equal(dropped, ff.gelu_ffn(*args, p, seed=seed + 1, offset=offset, backend=backend))
    # the backward uses the same mask: the gradient of sum(y) w.r.t. b2 counts the kept rows
    b2 = t["b2"].clone().requires_grad_()
    y = ff.gelu_ffn(t["x"], t["w1"], t["b1"], t["w2"], b2, "none", p, seed=seed, offset=offset, backend=backend)
    (db2,) = torch.autograd.grad(y.sum(), b2)
    torch.testing.assert_close(db2.float().cpu(), keep.sum(0).float() / (1 - p),
                               rtol=1e-5 if dtype == torch.float32 else 2 ** -7, atol=1e-5)


def test_deterministic(backend):
    device = skip_unless_available(op_module, backend)
    M, C, F_, C2 = 300, 40, 512, 40
    _skip_if_slow_here(backend, M, C, F_, C2)
    dtype = dtype_for(backend)
    t = {k: v.to(device, dtype).requires_grad_() for k, v in _inputs((M,), C, F_, C2, gen_seed=10).items()}
    dy = torch.randn(M, C2, device=device, dtype=dtype)

    def run():
        y = ff.gelu_ffn(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], "tanh", 0.1, seed=4, backend=backend)
        return (y,) + torch.autograd.grad(y, list(t.values()), dy)
    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The reference itself against F.linear / F.gelu (float64, autograd for the gradients)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("biases", [True, False], ids=["biases", "no_biases"])
def test_reference_matches_torch_functional(approximate, biases):
    t = _inputs((4, 9), 20, 70, 12, biases=biases, gen_seed=11)
    names = _grads(biases)
    leaves = [t[n].requires_grad_() for n in names]
    y = ff.gelu_ffn(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], approximate, backend="reference")
    expected = F.linear(F.gelu(F.linear(t["x"], t["w1"], t["b1"]), approximate=approximate), t["w2"], t["b2"])
    torch.testing.assert_close(y, expected)
    dy = torch.randn(y.shape, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(expected, leaves, dy)):
        torch.testing.assert_close(a, e)
    u = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    torch.testing.assert_close(reference.gelu(u, approximate), F.gelu(u, approximate=approximate))


# ---------------------------------------------------------------------------------------------
# Bad input: a TypeError / ValueError naming the argument, from the Python API and the native op
# ---------------------------------------------------------------------------------------------
def _good():
    g = torch.Generator().manual_seed(12)
    return {"input": torch.randn(3, 8, generator=g), "w1": torch.randn(16, 8, generator=g),
            "b1": torch.randn(16, generator=g), "w2": torch.randn(8, 16, generator=g), "b2": torch.randn(8, generator=g)}


def _with(**changes):
    return args_with(_good(), **changes)


BAD = {
    "input_int": (_with(input=lambda t: t.long()), TypeError, "input"),
    "input_not_tensor": (_with(input=[[1.0]]), TypeError, "input"),
    "w1_dtype": (_with(w1=lambda t: t.double()), TypeError, "w1"),
    "w1_on_meta": (_with(w1=lambda t: t.to("meta")), ValueError, "w1"),
    "w1_vector": (_with(w1=lambda t: t[0]), ValueError, "w1"),
    "w1_width_mismatch": (_with(w1=lambda t: t[:, :7]), ValueError, "w1"),
    "w2_width_mismatch": (_with(w2=lambda t: t[:, :15]), ValueError, "w2"),
    "w2_on_meta": (_with(w2=lambda t: t.to("meta")), ValueError, "w2"),
    "b1_shape": (_with(b1=lambda t: t[:15]), ValueError, "b1"),
    "b1_not_tensor": (_with(b1=[0.0] * 16), TypeError, "b1"),
    "b2_dtype": (_with(b2=lambda t: t.half()), TypeError, "b2"),
    "b2_on_meta": (_with(b2=lambda t: t.to("meta")), ValueError, "b2"),
    "approximate": (_with(approximate="fast"), ValueError, "approximate"),
    "dropout_too_big": (_with(dropout_p=1.5), ValueError, "dropout_p"),
    "dropout_not_number": (_with(dropout_p=None), TypeError, "dropout_p"),
    "offset_negative": (_with(offset=-3), ValueError, "offset"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name):
    (args, kwargs), exc, needle = BAD[name]
    with pytest.raises(exc, match=needle):
        ff.gelu_ffn(args["input"], args["w1"], args["b1"], args["w2"], args["b2"], **kwargs)


def test_native_op_checks_its_arguments():
    why = ff.backends.why_unavailable(op_module, "cpu")
    if why:
        pytest.skip("cpu: " + "; ".join(why))
    C = torch.ops.fusedformer_C
    a = _good()
    x, w1, b1, w2, b2 = a["input"], a["w1"], a["b1"], a["w2"], a["b2"]
    y, pre = C.gelu_ffn_fwd(x, w1, b1, w2, b2, "none", 0.0, None, 0)
    with pytest.raises(ValueError, match="w1"):
        C.gelu_ffn_fwd(x, w1[:, :7], b1, w2, b2, "none", 0.0, None, 0)
    with pytest.raises(ValueError, match="b2"):
        C.gelu_ffn_fwd(x, w1, b1, w2, b2[:3], "none", 0.0, None, 0)
    with pytest.raises(TypeError, match="w2"):
        C.gelu_ffn_fwd(x, w1, b1, w2.double(), b2, "none", 0.0, None, 0)
    with pytest.raises(ValueError, match="contiguous"):
        C.gelu_ffn_fwd(x.t().contiguous().t(), w1, b1, w2, b2, "none", 0.0, None, 0)
    # on the CPU a weight may be the transpose of a contiguous matrix, but no other layout
    C.gelu_ffn_fwd(x, w1.t().contiguous().t(), b1, w2.t().contiguous().t(), b2, "none", 0.0, None, 0)
    with pytest.raises(ValueError, match="w1 must be a contiguous .* or the transpose of one"):
        C.gelu_ffn_fwd(x, torch.cat([w1, w1], 1)[:, ::2], b1, w2, b2, "none", 0.0, None, 0)
    with pytest.raises(ValueError, match="approximate"):
        C.gelu_ffn_fwd(x, w1, b1, w2, b2, "erf", 0.0, None, 0)
    with pytest.raises(ValueError, match="dropout_p"):
        C.gelu_ffn_fwd(x, w1, b1, w2, b2, "none", -0.5, None, 0)
    with pytest.raises(ValueError, match="pre"):
        C.gelu_ffn_bwd(torch.randn_like(y), x, w1, w2, pre[:, :5], "none", 0.0, None, 0, True, True)
    with pytest.raises(ValueError, match="dy"):
        C.gelu_ffn_bwd(torch.randn(3, 5), x, w1, w2, pre, "none", 0.0, None, 0, True, True)


# ------------------------------------------------------------------------------------------------
# the GPU sweep (``gpu``: runs where a CUDA GPU is visible), on the cuda and triton backends
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gpu_bert_shape(gpu_backend, dtype, approximate):
    """BERT-base's feed-forward (768 -> 3072 -> 768) on 1000 rows, with dropout; the cuda backend
    skips float32 with its reason (tensor-core GEMMs)."""
    device = skip_unless_available(op_module, gpu_backend)
    check_against_reference("gelu_ffn", _ffn_fn(approximate, 0.1, seed=1), _inputs((1000,), 768, 3072, 768),
                            gpu_backend, dtype, device, _grads(True))
