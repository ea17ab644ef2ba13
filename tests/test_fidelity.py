"""Drop-in fidelity: fusedformer's ops against torch's own semantics on the inputs where a drop-in is
most easily wrong — huge finite masks, fp16 overflow, BERT's tiny eps on constant rows, NaN rows,
CausalBias masks, empty tensors, SDPA's shapes and broadcasting, torch.export with an unbacked batch
size, torch's exception types, masks that require grad, backend names.

Each case runs on every backend CI can run (reference, cpu, Triton under its interpreter; the cuda
backend on a GPU) and is compared with torch's **math** SDPA (not default dispatch: torch's CPU
flash kernel shares the finfo.min bug this file guards against), with ``F.layer_norm``, or with
the float64 reference by the 2x rule.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fusedformer as ff
from fusedformer.ops import attention as attention_op
from fusedformer.ops import gelu_ffn as gelu_ffn_op
from fusedformer.ops import layer_norm as layer_norm_op
from conftest import skip_unless_available
from numerics import check_against_reference

FAST = ["reference", "cpu", "triton", "cuda"]


def math_sdpa(*args, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def _dtype(backend):
    # the cuda attention kernels take 16-bit inputs only
    return torch.bfloat16 if backend == "cuda" else torch.float32


def _grads(fn, inputs, g):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(g)
    return out.detach(), [t.grad for t in leaves]


def _close(name, got, want, atol, rtol=0.0):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN where torch has none (or vice versa)"
    ok = ~torch.isnan(want)
    err = (got.double() - want.double())[ok].abs().max().item() if ok.any() else 0.0
    bound = atol + rtol * (want.double()[ok].abs().max().item() if ok.any() else 0.0)
    assert err <= bound, f"{name}: max error {err:.3e} against torch exceeds {bound:.3e}"


# ------------------------------------------------------------------------------------------------
# 1. rows whose every score is a huge finite negative (Hugging Face's finfo.min masks)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["float32.min", "-1e9", "bfloat16.min"])
@pytest.mark.parametrize("backend", FAST)
def test_rows_masked_by_a_huge_finite_value_attend_uniformly(backend, value):
    device = skip_unless_available(attention_op, backend)
    fill = {"float32.min": torch.finfo(torch.float32).min, "-1e9": -1e9,
            "bfloat16.min": torch.finfo(torch.bfloat16).min}[value]
    g = torch.Generator().manual_seed(14)
    B, H, Sq, Sk, D = 2, 2, 9, 13, 16
    q, k, v, dout = (torch.randn(*s, generator=g) for s in ((B, H, Sq, D), (B, H, Sk, D), (B, H, Sk, D),
                                                             (B, H, Sq, D)))
    mask = torch.zeros(B, 1, Sq, Sk)
    mask[0, :, 2, :] = fill               # a whole row (a left-padded query position)
    mask[1, :, 0, :] = fill
    mask[1, :, 5, 3:] = fill              # partial rows: the masked keys get weight 0
    mask[:, :, 7, ::2] = fill
    # torch's math path in float32: the q . k of a fully masked row is absorbed, P is uniform
    want, want_grads = _grads(lambda q, k, v: math_sdpa(q, k, v, attn_mask=mask), (q, k, v), dout)
    uniform = v[0, :, :, :].mean(1)
    assert torch.allclose(want[0, :, 2], uniform, atol=1e-6)  # the premise: torch attends uniformly

    dtype = _dtype(backend)
    cast = [t.to(device, dtype) for t in (q, k, v)]
    got, got_grads = _grads(lambda q, k, v: ff.attention(q, k, v, attn_mask=mask.to(device), backend=backend),
                            cast, dout.to(device, dtype))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    _close("out", got.cpu(), want, tol, tol)
    for name, a, b in zip(("dq", "dk", "dv"), got_grads, want_grads):
        _close(name, a.cpu(), b, 4 * tol, 4 * tol)


@pytest.mark.parametrize("backend", FAST)
def test_finfo_min_rows_by_the_2x_rule(backend):
    """The same case by the project's rule against the float64 reference, with the mask in the
    query's dtype (Hugging Face builds it so), causal and a key padding mask besides."""
    device = skip_unless_available(attention_op, backend)
    dtype = _dtype(backend)
    g = torch.Generator().manual_seed(141)
    B, H, Sq, Sk, D = 2, 2, 17, 17, 32
    mask = torch.zeros(B, 1, Sq, Sk, dtype=torch.float64)
    mask[:, :, :4, :] = torch.finfo(dtype).min    # left padding: the first queries see nothing
    mask[:, :, :, :4] = torch.finfo(dtype).min
    kpm = torch.zeros(B, Sk, dtype=torch.bool)
    kpm[1, -3:] = True
    inputs = {"q": torch.randn(B, H, Sq, D, generator=g, dtype=torch.float64),
              "k": torch.randn(B, H, Sk, D, generator=g, dtype=torch.float64),
              "v": torch.randn(B, H, Sk, D, generator=g, dtype=torch.float64),
              "mask": mask, "kpm": kpm}

    def fn(t, be):
        m = t["mask"].to(t["q"].dtype if t["q"].dtype != torch.float64 else torch.float64)
        return ff.attention(t["q"], t["k"], t["v"], attn_mask=m, key_padding_mask=t["kpm"], is_causal=True,
                            backend=be)
    check_against_reference("attention", fn, inputs, backend, dtype, device, grad_names=("q", "k", "v"))


def test_reference_masking_value_rows_match_torch_in_low_precision():
    """The reference in bfloat16 / float16 with the dtype's own finfo.min mask (Hugging Face's
    half-precision masks) against torch's math path in that dtype."""
    g = torch.Generator().manual_seed(142)
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = (torch.randn(1, 2, 6, 16, generator=g).to(dtype) for _ in range(3))
        mask = torch.zeros(1, 1, 6, 6, dtype=dtype)
        mask[..., 1, :] = torch.finfo(dtype).min
        want = math_sdpa(q, k, v, attn_mask=mask)
        got = ff.attention(q, k, v, attn_mask=mask, backend="reference")
        _close(f"{dtype}", got.float(), want.float(), 2e-2)


# ------------------------------------------------------------------------------------------------
# 2. the reference in low precision is as accurate as torch's math path
# ------------------------------------------------------------------------------------------------
def test_reference_fp16_does_not_overflow_in_q_kT():
    x = torch.full((1, 1, 4, 80), 256.0, dtype=torch.float16)
    want = math_sdpa(x, x, x)
    got = ff.attention(x, x, x, backend="reference")
    assert torch.equal(want, torch.full_like(x, 256.0))
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reference_is_as_accurate_as_torch_math_with_large_logits(dtype):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 37, 64, generator=g, dtype=torch.float64) * s for s in (4, 4, 1))
    exact = math_sdpa(q, k, v)
    lo = [t.to(dtype) for t in (q, k, v)]
    torch_err = (math_sdpa(*lo).double() - exact).abs().max().item()
    ours_err = (ff.attention(*lo, backend="reference").double() - exact).abs().max().item()
    assert ours_err <= 1.05 * torch_err + 1e-6, f"reference error {ours_err:.3e} vs torch's {torch_err:.3e}"


# ------------------------------------------------------------------------------------------------
# 3. layer_norm: constant rows with BERT's eps, rows far from zero
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FAST)
def test_layer_norm_of_a_constant_row_is_the_bias(backend):
    device = skip_unless_available(layer_norm_op, backend)
    g = torch.Generator().manual_seed(3)
    M, N = 6, 384
    x = (torch.rand(M, 1, generator=g) * 4 - 2).expand(M, N).contiguous()
    x[3] = 1e3 / 3                               # a constant row far from zero
    w, b = torch.randn(N, generator=g), torch.randn(N, generator=g)
    want = F.layer_norm(x, (N,), w, b, eps=1e-12)
    assert (want - b).abs().max() < 1e-5         # the premise: torch gives the bias
    got = ff.layer_norm(x.to(device), (N,), w.to(device), b.to(device), eps=1e-12, backend=backend).cpu()
    assert (got - b).abs().max().item() < 1e-5, f"max |y - bias| = {(got - b).abs().max().item():.3e}"


def test_reference_layer_norm_far_from_zero_is_as_accurate_as_torch():
    g = torch.Generator().manual_seed(4)
    x64 = torch.randn(64, 768, generator=g, dtype=torch.float64) * 0.05 + 1e3
    w, b = torch.randn(768, generator=g, dtype=torch.float64), torch.randn(768, generator=g, dtype=torch.float64)
    exact = F.layer_norm(x64, (768,), w, b, eps=1e-12)
    x, w32, b32 = x64.float(), w.float(), b.float()
    torch_err = (F.layer_norm(x, (768,), w32, b32, eps=1e-12).double() - exact).abs().max().item()
    ours_err = (ff.layer_norm(x, (768,), w32, b32, eps=1e-12, backend="reference").double() - exact).abs().max().item()
    assert ours_err <= 1.5 * torch_err, f"reference error {ours_err:.3e} vs torch's {torch_err:.3e}"


# ------------------------------------------------------------------------------------------------
# 4. NaN rows stay NaN
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FAST)
def test_a_nan_score_row_gives_nan_like_torch(backend):
    device = skip_unless_available(attention_op, backend)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g) for _ in range(3))
    q[0, 1, 2, 0] = float("nan")                 # every score of query row 2 in head 1 is NaN
    want = math_sdpa(q, k, v)
    dtype = _dtype(backend)
    got = ff.attention(*(t.to(device, dtype) for t in (q, k, v)), backend=backend).cpu().float()
    assert torch.isnan(want[0, 1, 2]).all()
    assert torch.isnan(got[0, 1, 2]).all(), f"NaN row became {got[0, 1, 2]}"
    got[0, 1, 2] = 0
    want[0, 1, 2] = 0
    _close("other rows", got, want, 1e-5 if dtype == torch.float32 else 3e-2)


# ------------------------------------------------------------------------------------------------
# 5. CausalBias masks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("sizes", [(5, 7), (7, 5), (6, 6)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias_masks_as_sdpa(variant, sizes, dtype):
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left
    Sq, Sk = sizes
    make = causal_upper_left if variant == "upper_left" else causal_lower_right
    g = torch.Generator().manual_seed(Sq * 10 + Sk)
    q, k, v = (torch.randn(2, 3, s, 16, generator=g).to(dtype) for s in (Sq, Sk, Sk))
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=make(Sq, Sk))
    for backend in ("reference", "cpu"):
        got = ff.attention(q, k, v, attn_mask=make(Sq, Sk), backend=backend).float()
        _close(f"{variant} {backend}", got, want, 1e-5 if dtype == torch.float32 else 3e-3)


def test_causal_bias_of_the_wrong_size_or_with_is_causal_is_refused():
    from torch.nn.attention.bias import causal_lower_right
    q = torch.randn(1, 1, 5, 8)
    k = torch.randn(1, 1, 7, 8)
    with pytest.raises(ValueError, match="CausalBias attn_mask is for"):
        ff.attention(q, k, k, attn_mask=causal_lower_right(6, 7))
    with pytest.raises(ValueError, match="pass is_causal=False"):
        ff.attention(q, k, k, attn_mask=causal_lower_right(5, 7), is_causal=True)


# ------------------------------------------------------------------------------------------------
# 6. empty tensors
# ------------------------------------------------------------------------------------------------
EMPTY_ATTENTION = [((0, 3, 5, 8), (0, 3, 6, 8), 8), ((2, 0, 5, 8), (2, 0, 6, 8), 8),
                   ((2, 3, 0, 8), (2, 3, 6, 8), 8), ((2, 3, 5, 8), (2, 3, 0, 8), 8),
                   ((2, 3, 5, 0), (2, 3, 6, 0), 8), ((2, 3, 5, 8), (2, 3, 6, 8), 0)]


@pytest.mark.parametrize("shapes", EMPTY_ATTENTION, ids=lambda s: "q" + "x".join(map(str, s[0])) + "-k"
                         + "x".join(map(str, s[1])) + f"-dv{s[2]}")
@pytest.mark.parametrize("backend", FAST)
def test_empty_attention_as_torch(backend, shapes):
    device = skip_unless_available(attention_op, backend)
    qs, ks, dv = shapes
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(qs, generator=g), torch.randn(ks, generator=g), torch.randn(*ks[:-1], dv, generator=g)
    want, want_grads = _grads(math_sdpa, (q, k, v), torch.ones(*qs[:-1], dv))
    dtype = _dtype(backend)
    got, got_grads = _grads(lambda q, k, v: ff.attention(q, k, v, backend=backend),
                            [t.to(device, dtype) for t in (q, k, v)], torch.ones(*qs[:-1], dv, device=device, dtype=dtype))
    _close("out", got.cpu().float(), want, 1e-5 if dtype == torch.float32 else 3e-2)
    for name, a, b in zip(("dq", "dk", "dv"), got_grads, want_grads):
        _close(name, a.cpu().float(), b, 1e-5 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("backend", FAST)
def test_zero_rows_for_layer_norm_and_gelu_ffn(backend):
    device = skip_unless_available(layer_norm_op, backend)
    x = torch.randn(0, 3, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    y = ff.layer_norm(x, (16,), w, b, residual=torch.randn(0, 3, 16, device=device), backend=backend)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))

    skip_unless_available(gelu_ffn_op, backend)
    dtype = _dtype(backend)
    x = torch.randn(2, 0, 16, device=device, dtype=dtype, requires_grad=True)
    w1 = torch.randn(32, 16, device=device, dtype=dtype, requires_grad=True)
    w2 = torch.randn(8, 32, device=device, dtype=dtype, requires_grad=True)
    b1 = torch.randn(32, device=device, dtype=dtype, requires_grad=True)
    z = ff.gelu_ffn(x, w1, b1, w2, None, backend=backend)
    z.sum().backward()
    assert z.shape == (2, 0, 8) and x.grad.shape == x.shape
    for t in (w1, w2, b1):
        assert torch.equal(t.grad, torch.zeros_like(t))


# ------------------------------------------------------------------------------------------------
# 7. SDPA's shapes, broadcasting and mask dtypes
# ------------------------------------------------------------------------------------------------
SHAPES = {
    "2d": ((7, 16), (9, 16), (9, 16)),
    "3d": ((3, 7, 16), (3, 9, 16), (3, 9, 16)),
    "5d": ((2, 2, 3, 7, 16), (2, 2, 3, 9, 16), (2, 2, 3, 9, 24)),
    "batch-1-vs-B": ((4, 3, 7, 16), (1, 3, 9, 16), (1, 3, 9, 16)),
    "q-batch-1": ((1, 3, 7, 16), (4, 3, 9, 16), (4, 3, 9, 16)),
    "one-kv-head": ((2, 4, 7, 16), (2, 1, 9, 16), (2, 1, 9, 16)),
}


@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("backend", FAST)
def test_sdpa_shapes_and_broadcasting(backend, case):
    device = skip_unless_available(attention_op, backend)
    qs, ks, vs = SHAPES[case]
    g = torch.Generator().manual_seed(len(case))
    q, k, v = (torch.randn(s, generator=g) for s in (qs, ks, vs))
    mask = torch.randn(qs[-2], ks[-2], generator=g)      # float32, broadcast over everything
    want = math_sdpa(q, k, v, attn_mask=mask, is_causal=False)
    g_out = torch.randn(want.shape, generator=g)
    want, want_grads = _grads(lambda q, k, v: math_sdpa(q, k, v, attn_mask=mask), (q, k, v), g_out)
    dtype = _dtype(backend)
    got, got_grads = _grads(lambda q, k, v: ff.attention(q, k, v, attn_mask=mask.to(device), backend=backend),
                            [t.to(device, dtype) for t in (q, k, v)], g_out.to(device, dtype))
    tol = 2e-5 if dtype == torch.float32 else 5e-2
    _close("out", got.cpu().float(), want, tol, tol)
    for name, a, b in zip(("dq", "dk", "dv"), got_grads, want_grads):
        assert a.shape == b.shape
        _close(name, a.cpu().float(), b, 2 * tol, 2 * tol)


@pytest.mark.parametrize("backend", FAST)
def test_float32_mask_with_bfloat16_queries(backend):
    device = skip_unless_available(attention_op, backend)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g).bfloat16() for _ in range(3))
    mask = torch.randn(2, 1, 9, 9, generator=g)           # float32, as SDPA allows
    want = math_sdpa(q, k, v, attn_mask=mask)
    got = ff.attention(q.to(device), k.to(device), v.to(device), attn_mask=mask.to(device), backend=backend)
    _close("out", got.cpu().float(), want.float(), 3e-2)


def test_float64_mask_with_float32_queries_is_refused_as_sdpa_does():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="attn_mask must be bool, float32 or query's dtype"):
        ff.attention(q, q, q, attn_mask=torch.zeros(4, 4, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# 8. torch.export with a data-dependent batch size
# ------------------------------------------------------------------------------------------------
class _Selected(torch.nn.Module):
    def forward(self, q, k, v, keep):
        idx = keep.nonzero().squeeze(1)             # an unbacked batch size
        return ff.attention(q.index_select(0, idx), k.index_select(0, idx), v.index_select(0, idx),
                            backend="cpu")


def test_export_with_a_data_dependent_batch_size():
    skip_unless_available(attention_op, "cpu")
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(4, 2, 5, 16, generator=g) for _ in range(3))
    keep = torch.tensor([True, False, True, True])
    ep = torch.export.export(_Selected(), (q, k, v, keep))
    got = ep.module()(q, k, v, keep)
    want = math_sdpa(q[keep], k[keep], v[keep])
    _close("exported", got, want, 1e-5)


# ------------------------------------------------------------------------------------------------
# 9. errors are catchable as torch's are
# ------------------------------------------------------------------------------------------------
def test_bad_input_errors_are_runtime_errors_too():
    x = torch.randn(4, 8)
    cases = [
        lambda: ff.layer_norm(x, (7,)),                                       # wrong normalized_shape
        lambda: ff.layer_norm(x, (8,), weight=torch.randn(8, dtype=torch.float64)),   # wrong dtype
        lambda: ff.attention(torch.randn(1, 2, 3, 8), torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8)),
        lambda: ff.attention(x, x, x, attn_mask=torch.zeros(5, 5)),
        lambda: ff.gelu_ffn(x, torch.randn(16, 7), None, torch.randn(8, 16), None),
        lambda: ff.gelu_ffn(x, torch.randn(16, 8), None, torch.randn(8, 16), None, approximate="erf"),
        lambda: ff.attention(x, x, x, dropout_p=1.5),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(RuntimeError) as info:
            case()
        assert isinstance(info.value, (ValueError, TypeError)), f"case {i}: {type(info.value)}"
        assert str(info.value).startswith(("layer_norm", "attention", "gelu_ffn")), f"case {i}: {info.value}"


# ------------------------------------------------------------------------------------------------
# 10. masks that require grad
# ------------------------------------------------------------------------------------------------
def test_a_mask_that_requires_grad_is_refused_not_silently_ignored():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    bias = torch.zeros(1, 2, 4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="attn_mask requires grad"):
        ff.attention(q, q, q, attn_mask=bias)
    with torch.no_grad():                           # no gradient wanted: nothing to refuse
        out = ff.attention(q, q, q, attn_mask=bias)
    _close("no_grad", out, math_sdpa(q.detach(), q.detach(), q.detach(), attn_mask=bias.detach()), 1e-5)
    out = ff.attention(q, q, q, attn_mask=bias.detach())   # the documented way out
    assert out.requires_grad


# ------------------------------------------------------------------------------------------------
# 11. backend names: one rule everywhere
# ------------------------------------------------------------------------------------------------
def test_backend_names_follow_one_rule(monkeypatch):
    x = torch.randn(3, 8)
    ref = F.layer_norm(x, (8,))
    for name in ("CPU", " Reference ", "cpu"):
        _close(name, ff.layer_norm(x, (8,), backend=name), ref, 1e-5)
        _close(name, ff.nn.LayerNorm(8, backend=name)(x).detach(), ref, 1e-5)
        with ff.use_backend(name):
            _close(name, ff.layer_norm(x, (8,)), ref, 1e-5)
        monkeypatch.setenv("FUSEDFORMER_BACKEND", name)
        _close(name, ff.layer_norm(x, (8,)), ref, 1e-5)
        monkeypatch.delenv("FUSEDFORMER_BACKEND")
    messages = []
    for call in (lambda: ff.layer_norm(x, (8,), backend="gpu"), lambda: ff.nn.LayerNorm(8, backend="gpu"),
                 lambda: ff.use_backend("gpu").__enter__()):
        with pytest.raises(ValueError, match="unknown backend 'gpu'") as info:
            call()
        messages.append(str(info.value).split(": ", 1)[1])
    assert len(set(messages)) == 1, messages
    with pytest.raises(TypeError, match="backend must be a string"):
        ff.layer_norm(x, (8,), backend=3)
