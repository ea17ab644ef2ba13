"""The reference backend is itself checked: float64 gradcheck of every hand-written backward
(through the same custom ops and autograd formula the fast backends use), and agreement with
torch.nn.functional where torch has the op."""
import pytest
import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer import reference

f64 = dict(dtype=torch.float64)


def _randn(*shape, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, **f64) * scale).requires_grad_()


# ---------------------------------------------------------------------------------------------
# layer_norm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual,dropout_p", [(False, 0.0), (True, 0.0), (True, 0.3), (False, 0.5)])
def test_layer_norm_gradcheck(rms, residual, dropout_p):
    g = torch.Generator().manual_seed(0)
    x, w, b = _randn(5, 9, gen=g), _randn(9, gen=g), _randn(9, gen=g)
    r = _randn(5, 9, gen=g) if residual else None

    def fn(x, w, b, *rest):
        res = rest[0] if rest else None
        if rms:
            y, h = ff.rms_norm(x, 9, w, 1e-5, residual=res, dropout_p=dropout_p, seed=11, offset=3,
                               return_residual=True, backend="reference")
        else:
            y, h = ff.layer_norm(x, 9, w, b, 1e-5, residual=res, dropout_p=dropout_p, seed=11, offset=3,
                                 return_residual=True, backend="reference")
        return y, h
    inputs = (x, w, b) + ((r,) if r is not None else ())
    assert torch.autograd.gradcheck(fn, inputs)


def test_layer_norm_matches_functional_and_autograd():
    g = torch.Generator().manual_seed(1)
    x, w, b = _randn(6, 33, gen=g), _randn(33, gen=g), _randn(33, gen=g)
    r = _randn(6, 33, gen=g)
    y = ff.layer_norm(x, 33, w, b, 1e-5, residual=r, backend="reference")
    y_t = F.layer_norm(x + r, (33,), w, b, 1e-5)
    torch.testing.assert_close(y, y_t)
    gy = torch.randn(6, 33, generator=g, **f64)
    grads = torch.autograd.grad(y, (x, w, b, r), gy)
    grads_t = torch.autograd.grad(y_t, (x, w, b, r), gy)
    for a, e in zip(grads, grads_t):
        torch.testing.assert_close(a, e)
    y = ff.rms_norm(x, 33, w, 1e-6, backend="reference")
    torch.testing.assert_close(y, F.rms_norm(x, (33,), w, 1e-6))


def test_layer_norm_dropout_matches_explicit_mask():
    from fusedformer import rng
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(4, 10, generator=g, **f64), torch.randn(4, 10, generator=g, **f64)
    y, h = ff.layer_norm(x, 10, dropout_p=0.4, seed=9, offset=8, residual=r, return_residual=True, backend="reference")
    expected_h = x * rng.dropout_multiplier((4, 10), 0.4, 9, 8, dtype=torch.float64) + r
    torch.testing.assert_close(h, expected_h)
    torch.testing.assert_close(y, F.layer_norm(expected_h, (10,)))


# ---------------------------------------------------------------------------------------------
# gelu_ffn
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("biases,dropout_p", [(True, 0.0), (True, 0.25), (False, 0.0)])
def test_gelu_ffn_gradcheck(approximate, biases, dropout_p):
    g = torch.Generator().manual_seed(3)
    x, w1, w2 = _randn(2, 3, 5, gen=g), _randn(7, 5, gen=g), _randn(4, 7, gen=g)
    b1, b2 = (_randn(7, gen=g), _randn(4, gen=g)) if biases else (None, None)

    def fn(x, w1, w2, *bs):
        b1_, b2_ = bs if bs else (None, None)
        return ff.gelu_ffn(x, w1, b1_, w2, b2_, approximate, dropout_p, seed=5, backend="reference")
    inputs = (x, w1, w2) + ((b1, b2) if biases else ())
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_ffn_matches_functional(approximate):
    g = torch.Generator().manual_seed(4)
    x, w1, b1 = _randn(9, 6, gen=g, scale=2), _randn(11, 6, gen=g), _randn(11, gen=g)
    w2, b2 = _randn(6, 11, gen=g), _randn(6, gen=g)
    y = ff.gelu_ffn(x, w1, b1, w2, b2, approximate, backend="reference")
    y_t = F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)
    torch.testing.assert_close(y, y_t)
    u = torch.linspace(-6, 6, 101, **f64)
    torch.testing.assert_close(reference.gelu(u, approximate), F.gelu(u, approximate=approximate))
    ug = u.clone().requires_grad_()
    (d,) = torch.autograd.grad(F.gelu(ug, approximate=approximate).sum(), ug)
    torch.testing.assert_close(reference.gelu_grad(u, approximate), d)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
ATTN_CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "causal_rect": dict(is_causal=True, Sq=3, Sk=6),
    "bool_mask": dict(mask="bool"),
    "additive_mask": dict(mask="float"),
    "key_padding": dict(kpm=True),
    "dropout": dict(dropout_p=0.3),
    "gqa": dict(H=4, Hk=2),
    "dv_differs": dict(Dv=3),
}


def _attn_inputs(case, gen):
    B, H, Hk, Sq, Sk, D = 2, case.get("H", 2), case.get("Hk", case.get("H", 2)), case.get("Sq", 5), case.get("Sk", 5), 4
    Dv = case.get("Dv", D)
    q, k, v = _randn(B, H, Sq, D, gen=gen), _randn(B, Hk, Sk, D, gen=gen), _randn(B, Hk, Sk, Dv, gen=gen)
    mask = None
    if case.get("mask") == "bool":
        mask = torch.rand(Sq, Sk, generator=gen) > 0.3
        mask[:, 0] = True  # no fully masked row in the SDPA comparison
    elif case.get("mask") == "float":
        mask = torch.randn(B, 1, Sq, Sk, generator=gen, **f64)
    kpm = None
    if case.get("kpm"):
        kpm = torch.zeros(B, Sk, dtype=torch.bool)
        kpm[1, 3:] = True
    return q, k, v, mask, kpm


@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_attention_gradcheck(name):
    case = ATTN_CASES[name]
    g = torch.Generator().manual_seed(5)
    q, k, v, mask, kpm = _attn_inputs(case, g)

    def fn(q, k, v):
        return ff.attention(q, k, v, mask, case.get("dropout_p", 0.0), case.get("is_causal", False),
                            enable_gqa=q.shape[1] != k.shape[1], key_padding_mask=kpm, seed=21, backend="reference")
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("name", [n for n in ATTN_CASES if n != "dropout"])
def test_attention_matches_sdpa(name):
    case = ATTN_CASES[name]
    g = torch.Generator().manual_seed(6)
    q, k, v, mask, kpm = _attn_inputs(case, g)
    sdpa_mask = mask
    if kpm is not None:
        sdpa_mask = ~kpm[:, None, None, :]
    gqa = q.shape[1] != k.shape[1]
    out = ff.attention(q, k, v, mask, is_causal=case.get("is_causal", False), enable_gqa=gqa,
                       key_padding_mask=kpm, backend="reference")
    out_t = F.scaled_dot_product_attention(q, k, v, sdpa_mask, is_causal=case.get("is_causal", False), enable_gqa=gqa)
    torch.testing.assert_close(out, out_t)
    go = torch.randn(out.shape, generator=g, **f64)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(out_t, (q, k, v), go)):
        torch.testing.assert_close(a, e)


def test_attention_fully_masked_row_is_zero_with_neg_inf_lse():
    g = torch.Generator().manual_seed(7)
    q, k, v = _randn(1, 1, 3, 4, gen=g), _randn(1, 1, 3, 4, gen=g), _randn(1, 1, 3, 4, gen=g)
    kpm = torch.ones(1, 3, dtype=torch.bool)
    out, lse = ff.attention(q, k, v, key_padding_mask=kpm, return_lse=True, backend="reference")
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    for d in (dq, dk, dv):
        assert torch.equal(d, torch.zeros_like(d))


def test_attention_lse_and_dropout_mask():
    from fusedformer import rng
    g = torch.Generator().manual_seed(8)
    q, k, v = _randn(2, 3, 4, 5, gen=g), _randn(2, 3, 6, 5, gen=g), _randn(2, 3, 6, 5, gen=g)
    out, lse = ff.attention(q, k, v, dropout_p=0.5, seed=3, offset=4, return_lse=True, backend="reference")
    s = (q @ k.transpose(-1, -2)) / 5 ** 0.5
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    z = rng.dropout_multiplier((2, 3, 4, 6), 0.5, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(out, (torch.softmax(s, -1) * z) @ v)
