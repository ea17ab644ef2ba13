"""layer_norm / rms_norm on every backend against the float64 reference (the 2x rule)."""
import pytest
import torch

import fusedformer as ff
from fusedformer import reference, rng
from fusedformer.ops import layer_norm as op_module

from conftest import skip_unless_available
from numerics import check_against_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WIDTHS = [1, 7, 1023, 1500, 4096]


def _inputs(M, N, *, residual, weight=True, bias=True, gen_seed=0, noncontig=False):
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(M, N, generator=g, dtype=torch.float64) * 2 + 0.5
    if noncontig:  # a transposed view: same logical values, different strides
        x = x.t().contiguous().t()
    d = {"x": x}
    if residual:
        d["residual"] = torch.randn(M, N, generator=g, dtype=torch.float64)
    d["weight"] = torch.randn(N, generator=g, dtype=torch.float64) if weight else None
    d["bias"] = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    return d


def _call(rms, dropout_p, seed, return_residual, N):
    def fn(t, backend):
        kw = dict(residual=t.get("residual"), dropout_p=dropout_p, seed=seed, backend=backend,
                  return_residual=return_residual)
        if rms:
            return ff.rms_norm(t["x"], N, t["weight"], 1e-6, **kw)
        return ff.layer_norm(t["x"], N, t["weight"], t["bias"], 1e-5, **kw)
    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", WIDTHS)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_plain(backend, dtype, N, rms):
    device = skip_unless_available(op_module, backend)
    M = 1 if N == 4096 else 37
    inputs = _inputs(M, N, residual=False, gen_seed=N)
    grads = ["x", "weight"] + ([] if rms else ["bias"])
    check_against_reference("layer_norm", _call(rms, 0.0, None, False, N), inputs, backend, dtype, device, grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_far_from_zero_or_with_outliers(backend, dtype):
    """Statistics where cancellation bites: rows offset far from zero (mean >> std: a one-pass
    variance about zero loses ~eps * mean^2 / var, here ~2e-3, far beyond the bound), rows whose
    first elements sit far from the rest, and rows with one huge activation, also in the first
    channel (the CPU forward centres its one-pass moments on x[0] and falls back to a second
    pass). Offsets are kept where rounding the input itself to float32 stays inside the tight
    float32 bound."""
    device = skip_unless_available(op_module, backend)
    g = torch.Generator().manual_seed(21)
    N = 1000
    x = torch.randn(14, N, generator=g, dtype=torch.float64)
    x[0:4] += 200.0                       # mean >> std
    x[4:8, :80] += 40.0                   # the head of the row far from the rest
    x[8:10, 517] = 5000.0                 # one massive activation
    x[10:12, 3] = -5000.0                 # ... inside the head
    x[12:14, 0] = 4000.0                  # ... in the first channel (the CPU forward's provisional centre)
    inputs = {"x": x, "weight": torch.randn(N, generator=g, dtype=torch.float64),
              "bias": torch.randn(N, generator=g, dtype=torch.float64)}
    check_against_reference("layer_norm", _call(False, 0.0, None, False, N), inputs, backend, dtype, device,
                            ["x", "weight", "bias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_rows(backend, dtype):
    """Enough rows that the CPU backward sums several row groups into each dweight/dbias partial
    (and ends on a short group); a width that is not a multiple of any vector length."""
    device = skip_unless_available(op_module, backend)
    inputs = _inputs(1030, 67, residual=True, gen_seed=11)
    check_against_reference("layer_norm", _call(False, 0.2, 4321, True, 67), inputs, backend, dtype, device,
                            ["x", "residual", "weight", "bias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", [7, 1023, 1500])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_residual_dropout_prenorm(backend, dtype, N, dropout_p):
    """Fused dropout(x) + residual with the pre-norm sum returned (pre-LN) and used downstream."""
    device = skip_unless_available(op_module, backend)
    inputs = _inputs(19, N, residual=True, gen_seed=N + 1)
    check_against_reference("layer_norm", _call(False, dropout_p, 1234 + N, True, N), inputs, backend, dtype,
                            device, ["x", "residual", "weight", "bias"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_params_with_low_precision_input(backend, dtype):
    device = skip_unless_available(op_module, backend)
    inputs = _inputs(33, 768, residual=True, gen_seed=3)
    check_against_reference("layer_norm", _call(False, 0.1, 99, False, 768), inputs, backend, dtype, device,
                            ["x", "residual", "weight", "bias"], f32_names=["weight", "bias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_and_batched_input(backend, dtype):
    device = skip_unless_available(op_module, backend)
    inputs = _inputs(40, 1023, residual=False, gen_seed=5, noncontig=True)
    check_against_reference("layer_norm", _call(False, 0.0, None, False, 1023), inputs, backend, dtype, device,
                            ["x", "weight", "bias"])
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 5, 64, generator=g, dtype=torch.float64)  # 3-D batch, normalize the last dim
    check_against_reference("layer_norm", _call(False, 0.0, None, False, 64), {"x": x, "weight": None, "bias": None},
                            backend, dtype, device, ["x"])


def test_no_affine_and_multi_dim_normalized_shape(backend):
    device = skip_unless_available(op_module, backend)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 4, 10, generator=g, dtype=torch.float64)
    w = torch.randn(4, 10, generator=g, dtype=torch.float64)

    def fn(t, b):
        return ff.layer_norm(t["x"], (4, 10), t["w"], None, backend=b)
    check_against_reference("layer_norm", fn, {"x": x, "w": w}, backend, torch.float32, device, ["x", "w"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_mask_is_the_shared_rng(backend, dtype):
    """Exactly the reference RNG's mask: with weight 1, bias 0 and no residual the normalized
    input's zeros are where the mask drops, and the same seed gives the same output twice."""
    device = skip_unless_available(op_module, backend)
    M, N, p, seed, offset = 64, 300, 0.25, 77, 12
    x = torch.randn(M, N, dtype=dtype, device=device).abs() + 1.0      # never zero
    _, h = ff.layer_norm(x, N, dropout_p=p, seed=seed, offset=offset, return_residual=True, backend=backend)
    keep = rng.keep_mask((M, N), p, seed, offset)
    assert torch.equal(h.cpu() != 0, keep), "dropped elements differ from fusedformer.rng's mask"
    expected = (x.float().cpu() * keep * rng.keep_scale(p)).to(dtype)
    assert torch.equal(h.cpu(), expected), "kept elements are not x / (1 - p) rounded once"
    y1 = ff.layer_norm(x, N, dropout_p=p, seed=seed, offset=offset, backend=backend)
    y2 = ff.layer_norm(x, N, dropout_p=p, seed=seed, offset=offset, backend=backend)
    assert torch.equal(y1, y2)
    y3 = ff.layer_norm(x, N, dropout_p=p, seed=seed + 1, offset=offset, backend=backend)
    assert not torch.equal(y1, y3)


def test_output_written_everywhere_even_with_nan_poisoned_memory(backend):
    """Outputs come from fresh allocations: fill the allocator's cache with NaN first."""
    device = skip_unless_available(op_module, backend)
    for _ in range(3):
        torch.full((4096 * 64,), float("nan"), device=device)
    x = torch.randn(64, 4096, device=device)
    y = ff.layer_norm(x, 4096, torch.ones(4096, device=device), torch.zeros(4096, device=device), backend=backend)
    assert torch.isfinite(y).all()


def test_reference_matches_torch_functional():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(17, 129, generator=g, dtype=torch.float64)
    w, b = torch.randn(129, generator=g, dtype=torch.float64), torch.randn(129, generator=g, dtype=torch.float64)
    y, _, _, _ = reference.layer_norm_fwd(x, None, w, b, 1e-5, 0.0, None, 0, False)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (129,), w, b, 1e-5))
    y, _, _, _ = reference.layer_norm_fwd(x, None, w, None, 1e-6, 0.0, None, 0, True)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (129,), w, 1e-6))


# ------------------------------------------------------------------------------------------------
# the GPU sweep (``gpu``: runs where a CUDA GPU is visible), on the cuda and triton backends
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("N", [768, 1024, 4096, 8191, 16384, 65536])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_widths(gpu_backend, N, dtype):
    """Model widths to 64k (the Triton kernels' chunked path past 8192), residual and dropout."""
    device = skip_unless_available(op_module, gpu_backend)
    M = 64 if N <= 16384 else 8
    check_against_reference("layer_norm", _call(False, 0.1, 17, True, N), _inputs(M, N, residual=True, gen_seed=N),
                            gpu_backend, dtype, device, ["x", "residual", "weight", "bias"])
