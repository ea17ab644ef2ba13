"""The Triton backend (kernels/) against the float64 reference: outputs and every gradient under the
2x rule, the in-kernel dropout RNG bit for bit, determinism, and the backend's input limits.

Without a GPU the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1), so
shapes here are small but awkward: odd lengths, non-power-of-two widths and head dims, tails on
every tile edge. The ``gpu``-marked sweeps (long sequences, every head dim to 256, wide rows,
float16/bfloat16) are the op tests' (tests/test_<op>.py), run on the cuda and triton backends alike.
"""

import pytest
import torch

import fusedformer as ff
from fusedformer import rng
from fusedformer.ops import attention as attention_module
from fusedformer.ops import gelu_ffn as gelu_ffn_module
from fusedformer.ops import layer_norm as layer_norm_module
from fusedformer.testing import attention_inputs, gelu_ffn_inputs

from conftest import skip_unless_available
from numerics import check_against_reference

BACKEND = "triton"
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from fusedformer.kernels._common import dropout_keep  # noqa: E402  (needs triton)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# the dropout RNG inside the kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _philox_probe(
    Out,             # (4 * BLOCK,) int64: the four Philox words per counter
    Keep,            # (BLOCK,) int8: dropout_keep of elements offset .. offset + BLOCK - 1
    seed, c0_base, offset, threshold,
    BLOCK: tl.constexpr,
):
    i = tl.arange(0, BLOCK)
    c0 = (c0_base + i).to(tl.uint32)
    c1 = (i * 7 + 3).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, 0, 0)
    tl.store(Out + 4 * i + 0, r0.to(tl.int64))
    tl.store(Out + 4 * i + 1, r1.to(tl.int64))
    tl.store(Out + 4 * i + 2, r2.to(tl.int64))
    tl.store(Out + 4 * i + 3, r3.to(tl.int64))
    keep = dropout_keep(seed, offset + i.to(tl.int64), threshold)
    tl.store(Keep + i, keep.to(tl.int8))


def test_tl_philox_is_the_project_philox():
    """tl.philox(seed, c0, c1, 0, 0) gives fusedformer.rng.philox4x32's four words (seeds with a
    high key word, counters with a high word), and dropout_keep gives rng.keep_mask."""
    device = skip_unless_available(layer_norm_module, BACKEND)
    block = 64
    for seed in (1, 12345, (1 << 40) + 77, (1 << 62) - 5):
        for c0_base, offset, p in ((0, 0, 0.5), (2**32 - 20, 3, 0.1), (123456, (1 << 35) + 1, 0.9)):
            out = torch.full((4 * block,), -1, dtype=torch.int64, device=device)
            keep = torch.full((block,), -1, dtype=torch.int8, device=device)
            _philox_probe[(1,)](out, keep, seed, c0_base, offset, rng.threshold(p), BLOCK=block)
            idx = torch.arange(block, dtype=torch.int64)
            counter = ((c0_base + idx) & rng.MASK32, (idx * 7 + 3) & rng.MASK32, torch.zeros_like(idx),
                       torch.zeros_like(idx))
            expected = torch.stack(rng.philox4x32(counter, rng.seed_key(seed)), dim=1).reshape(-1)
            assert torch.equal(out.cpu(), expected), f"tl.philox differs from rng.philox4x32 (seed {seed})"
            assert torch.equal(keep.cpu().bool(), rng.keep_mask((block,), p, seed, offset)), \
                f"dropout_keep differs from rng.keep_mask (seed {seed}, offset {offset})"


# ------------------------------------------------------------------------------------------------
# layer_norm
# ------------------------------------------------------------------------------------------------
def _ln_inputs(M, N, seed, residual=True):
    g = _gen(seed)
    d = {"x": torch.randn(M, N, generator=g, dtype=torch.float64) * 2 + 0.5,
         "weight": torch.randn(N, generator=g, dtype=torch.float64),
         "bias": torch.randn(N, generator=g, dtype=torch.float64)}
    if residual:
        d["residual"] = torch.randn(M, N, generator=g, dtype=torch.float64)
    return d


def _ln_call(N, rms, dropout_p, seed, return_residual):
    def fn(t, backend):
        kw = dict(residual=t.get("residual"), dropout_p=dropout_p, seed=seed, offset=5, backend=backend,
                  return_residual=return_residual)
        if rms:
            return ff.rms_norm(t["x"], N, t["weight"], 1e-6, **kw)
        return ff.layer_norm(t["x"], N, t["weight"], t["bias"], 1e-5, **kw)
    return fn


LN_CASES = [  # (M, N, dtype, rms, residual, dropout_p, float32 params)
    (5, 1, torch.float32, False, False, 0.0, False),
    (9, 7, torch.bfloat16, False, True, 0.2, False),
    (9, 7, torch.float16, True, True, 0.0, False),
    (6, 1023, torch.float32, True, True, 0.3, False),
    (6, 1023, torch.bfloat16, False, True, 0.1, True),
    (2, 9000, torch.float32, False, True, 0.25, False),      # wider than ROWS_MAX_WIDTH: chunked path
    (3, 9000, torch.bfloat16, True, False, 0.0, True),
]


@pytest.mark.parametrize("M,N,dtype,rms,residual,dropout_p,f32_params", LN_CASES,
                         ids=[f"{c[0]}x{c[1]}-{str(c[2])[6:]}-{'rms' if c[3] else 'ln'}-p{c[5]}" for c in LN_CASES])
def test_layer_norm(M, N, dtype, rms, residual, dropout_p, f32_params):
    device = skip_unless_available(layer_norm_module, BACKEND)
    inputs = _ln_inputs(M, N, seed=N + M, residual=residual)
    grads = ["x", "weight"] + ([] if rms else ["bias"]) + (["residual"] if residual else [])
    check_against_reference("layer_norm", _ln_call(N, rms, dropout_p, 1000 + N, residual), inputs, BACKEND,
                            dtype, device, grads, f32_names=["weight", "bias"] if f32_params else ())


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_layer_norm_chunked_path_at_small_width(monkeypatch, rms):
    """Force the chunked strategy on a 1023-wide row (several chunks and a ragged tail)."""
    device = skip_unless_available(layer_norm_module, BACKEND)
    from fusedformer.kernels import layer_norm as kernels
    monkeypatch.setattr(kernels, "ROWS_MAX_WIDTH", 64)
    inputs = _ln_inputs(5, 1023, seed=21)
    grads = ["x", "residual", "weight"] + ([] if rms else ["bias"])
    check_against_reference("layer_norm", _ln_call(1023, rms, 0.2, 31, True), inputs, BACKEND, torch.float32,
                            device, grads)


@pytest.mark.parametrize("offset", [7, 8], ids=["any-offset", "aligned-offset"])
@pytest.mark.parametrize("strategy", ["rows", "chunked"])
def test_layer_norm_dropout_is_the_shared_rng_and_backward_is_deterministic(monkeypatch, strategy, offset):
    """Exactly fusedformer.rng's mask (with width and offset multiples of 4 the kernels draw one
    Philox block per four elements), and bit-reproducible gradients."""
    device = skip_unless_available(layer_norm_module, BACKEND)
    if strategy == "chunked":
        from fusedformer.kernels import layer_norm as kernels
        monkeypatch.setattr(kernels, "ROWS_MAX_WIDTH", 64)
    M, width, p, seed = 3, 300, 0.3, 2024
    x = (torch.rand(M, width, generator=_gen(1)) + 1.0).to(device).requires_grad_(True)   # never zero
    w = torch.randn(width, generator=_gen(2)).to(device).requires_grad_(True)
    b = torch.randn(width, generator=_gen(3)).to(device).requires_grad_(True)
    y, h = ff.layer_norm(x, width, w, b, dropout_p=p, seed=seed, offset=offset, return_residual=True,
                         backend=BACKEND)
    keep = rng.keep_mask((M, width), p, seed, offset)
    assert torch.equal(h.detach().cpu() != 0, keep)
    assert torch.equal(h.detach().cpu(), x.detach().cpu() * keep * rng.keep_scale(p))
    dy = torch.randn(M, width, generator=_gen(4)).to(device)
    first = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
    second = torch.autograd.grad(y, (x, w, b), dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c), "the backward is not bit-reproducible"
    assert torch.equal(first[0].cpu() != 0, keep), "dx is not zero exactly where the mask drops"


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------
ATTN_CASES = [
    # id,                 B, H, Hk, Sq, Sk, D, Dv, dtype,          causal, mask,  kpm,   p,   strided
    ("seq1",              1, 2, 2, 1, 1, 16, 16, torch.float32, False, None, False, 0.0, False),
    ("seq7-d40-causal",   2, 2, 2, 7, 7, 40, 40, torch.bfloat16, True, None, False, 0.0, False),
    ("seq33-gqa-causal",  1, 4, 2, 33, 33, 64, 64, torch.float16, True, None, False, 0.0, False),
    ("seq65-d80",         1, 2, 2, 65, 65, 80, 80, torch.float32, False, None, False, 0.0, False),
    ("sq>sk-d128-causal", 1, 2, 2, 33, 20, 128, 128, torch.bfloat16, True, None, False, 0.0, False),
    ("sq<sk-causal",      2, 1, 1, 20, 33, 16, 16, torch.float32, True, None, False, 0.0, False),
    ("additive-mask",     2, 2, 2, 19, 23, 32, 32, torch.float32, False, "float", False, 0.0, False),
    ("bool-mask-causal",  1, 2, 2, 17, 17, 24, 24, torch.bfloat16, True, "bool", False, 0.0, False),
    ("key-padding",       3, 2, 2, 18, 21, 32, 32, torch.float16, False, None, True, 0.0, False),
    ("dropout-gqa-kpm",   2, 4, 2, 21, 20, 32, 32, torch.float32, False, None, True, 0.2, False),  # Sk % 4 == 0
    ("dropout-causal",    1, 2, 1, 33, 33, 16, 24, torch.bfloat16, True, None, False, 0.3, False),
    ("strided-bshd",      2, 2, 2, 23, 23, 48, 48, torch.bfloat16, True, None, False, 0.0, True),
    ("d8-dv3-causal",     1, 2, 2, 9, 11, 8, 3, torch.float32, True, None, False, 0.1, False),
    ("d256",              1, 1, 1, 9, 12, 256, 256, torch.float32, False, None, False, 0.0, False),
]


def _attn_inputs(B, H, Hk, Sq, Sk, D, Dv, mask, kpm, strided, seed):
    g = _gen(seed)
    # strided: (B, S, H, D) storage viewed as (B, H, S, D), head dim contiguous
    d = {**attention_inputs(g, B, H, Hk, Sq, Sk, D, Dv, transposed=strided), "mask": None, "kpm": None}
    if mask == "float":   # broadcast over the batch, with some -inf
        m = torch.randn(1, H, Sq, Sk, generator=g, dtype=torch.float64)
        m[torch.rand(m.shape, generator=g) < 0.2] = float("-inf")
        d["mask"] = m
    elif mask == "bool":  # broadcast over batch and heads; query row 3 sees no key at all
        m = torch.rand(Sq, Sk, generator=g) < 0.7
        m[3] = False
        d["mask"] = m
    if kpm:
        pad = torch.rand(B, Sk, generator=g) < 0.3
        pad[0] = True               # batch 0: every key is padding (fully masked rows)
        pad[-1, 0] = False
        d["kpm"] = pad
    return d


@pytest.mark.parametrize("case", ATTN_CASES, ids=[c[0] for c in ATTN_CASES])
def test_attention(case):
    device = skip_unless_available(attention_module, BACKEND)
    _, B, H, Hk, Sq, Sk, D, Dv, dtype, causal, mask, kpm, p, strided = case
    inputs = _attn_inputs(B, H, Hk, Sq, Sk, D, Dv, mask, kpm, strided, seed=Sq * 131 + D)

    def fn(t, backend):
        return ff.attention(t["q"], t["k"], t["v"], attn_mask=t["mask"], dropout_p=p, is_causal=causal,
                            enable_gqa=H != Hk, key_padding_mask=t["kpm"], seed=777, offset=4,
                            return_lse=True, backend=backend)
    check_against_reference("attention", fn, inputs, BACKEND, dtype, device, ["q", "k", "v"])


TMA_CASES = ["seq33-gqa-causal", "sq>sk-d128-causal", "dropout-gqa-kpm", "strided-bshd"]


@pytest.mark.parametrize("case", [c for c in ATTN_CASES if c[0] in TMA_CASES], ids=TMA_CASES)
def test_attention_tma_path(tma_descriptors, case):
    """The forward with K/V streamed through tensor descriptors (the Hopper path, opt-in)."""
    test_attention(case)
    assert tma_descriptors and all(d is not None for d in tma_descriptors), "the TMA path was not taken"


def test_attention_tma_falls_back_on_unaligned_strides(monkeypatch):
    from fusedformer.kernels import attention as kernels
    device = skip_unless_available(attention_module, BACKEND)
    k = torch.randn(1, 2, 9, 17, device=device)          # 17 * 4 bytes: rows not 16-byte aligned
    assert kernels._tma_descriptor(k, [1, 1, 16, 32]) is None
    monkeypatch.setenv("FUSEDFORMER_TRITON_TMA", "1")
    q = torch.randn(1, 2, 5, 17, device=device)
    out = ff.attention(q, k, k, backend=BACKEND)
    expected = ff.attention(q, k, k, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offset", [9, 8], ids=["any-offset", "aligned-offset"])
def test_attention_dropout_is_the_shared_rng(offset):
    """With V = identity the output rows are P * Z: zero exactly where fusedformer.rng drops (with an
    offset and Sk multiple of 4 the kernels generate one Philox block per four keys)."""
    device = skip_unless_available(attention_module, BACKEND)
    B, H, Sq, Sk, p, seed = 2, 2, 13, 24, 0.35, 4321
    q = torch.randn(B, H, Sq, 16, generator=_gen(5)).to(device)
    k = torch.randn(B, H, Sk, 16, generator=_gen(6)).to(device)
    v = torch.eye(Sk).expand(B, H, Sk, Sk).contiguous().to(device)
    out, lse = ff.attention(q, k, v, dropout_p=p, seed=seed, offset=offset, return_lse=True, backend=BACKEND)
    keep = rng.keep_mask((B, H, Sq, Sk), p, seed, offset)
    assert torch.equal(out.cpu() != 0, keep), "dropped elements differ from fusedformer.rng's mask"
    probs = torch.softmax(q.cpu().double() @ k.cpu().double().transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(out.cpu().double(), probs * keep / (1 - p), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.cpu().double(), torch.logsumexp(q.cpu().double() @ k.cpu().double()
                                                                   .transpose(-1, -2) / 4.0, -1),
                               rtol=1e-6, atol=1e-6)


def test_attention_backward_is_deterministic_and_masked_rows_get_zero_gradient():
    device = skip_unless_available(attention_module, BACKEND)
    B, H, Hk, S, D = 2, 2, 1, 19, 32
    q = torch.randn(B, H, S, D, generator=_gen(7)).to(device).requires_grad_(True)
    k = torch.randn(B, Hk, S, D, generator=_gen(8)).to(device).requires_grad_(True)
    v = torch.randn(B, Hk, S, D, generator=_gen(9)).to(device).requires_grad_(True)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1] = True                                  # batch 1 fully padded
    pad[0, 5:9] = True
    pad = pad.to(device)
    out = ff.attention(q, k, v, enable_gqa=True, key_padding_mask=pad, dropout_p=0.1, seed=3, backend=BACKEND)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1]).cpu())
    do = torch.randn(out.shape, generator=_gen(10)).to(device)
    first = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), do)
    for a, c in zip(first, second):
        assert torch.equal(a, c), "the attention backward is not bit-reproducible"
    dq, dk, dv = first
    assert not dq[1].any() and not dk[1].any() and not dv[1].any(), "fully masked batch got a gradient"
    assert not dk[0, :, 5:9].any() and not dv[0, :, 5:9].any(), "padded keys got a gradient"


def test_attention_head_dim_limit_is_a_reason():
    skip_unless_available(attention_module, BACKEND)
    q = torch.randn(1, 1, 4, 300)
    with pytest.raises(ff.BackendError, match="head dim 300 > 256"):
        ff.attention(q, q, q, backend=BACKEND)
    from fusedformer.kernels import attention as kernels
    with pytest.raises(ValueError, match="head dim 300"):
        kernels.attention_fwd(q, q, q, None, None, 0.0, False, 1.0, None, 0)


# ------------------------------------------------------------------------------------------------
# gelu_ffn
# ------------------------------------------------------------------------------------------------
FFN_CASES = [  # (M, C, F, C2, dtype, approximate, dropout_p, biases)
    (7, 33, 65, 33, torch.float32, "none", 0.0, True),
    (7, 33, 65, 33, torch.bfloat16, "tanh", 0.2, True),
    (37, 20, 48, 16, torch.float32, "tanh", 0.1, True),       # several row tiles; C2 % 4 == 0
    (11, 24, 40, 24, torch.float16, "none", 0.0, False),      # no biases
]


@pytest.mark.parametrize("M,C,F,C2,dtype,approximate,dropout_p,biases", FFN_CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{str(c[4])[6:]}-{c[5]}-p{c[6]}" for c in FFN_CASES])
def test_gelu_ffn(M, C, F, C2, dtype, approximate, dropout_p, biases):
    device = skip_unless_available(gelu_ffn_module, BACKEND)
    inputs = gelu_ffn_inputs(_gen(M * C + F), (M,), C, F, C2, biases=biases)

    def fn(t, backend):
        return ff.gelu_ffn(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], approximate=approximate,
                           dropout_p=dropout_p, seed=99, offset=12, backend=backend)
    grads = ["x", "w1", "w2"] + (["b1", "b2"] if biases else [])
    check_against_reference("gelu_ffn", fn, inputs, BACKEND, dtype, device, grads)


@pytest.mark.parametrize("offset", [2, 4], ids=["any-offset", "aligned-offset"])
def test_gelu_ffn_dropout_is_the_shared_rng(offset):
    device = skip_unless_available(gelu_ffn_module, BACKEND)
    M, C, F, C2, p, seed = 9, 16, 32, 20, 0.4, 55
    x = torch.randn(M, C, generator=_gen(11)).to(device)
    w1 = torch.randn(F, C, generator=_gen(12)).to(device) * 0.1
    w2 = torch.randn(C2, F, generator=_gen(13)).to(device) * 0.01
    b2 = torch.full((C2,), 5.0, device=device)          # outputs near 5: never zero unless dropped
    y = ff.gelu_ffn(x, w1, None, w2, b2, dropout_p=p, seed=seed, offset=offset, backend=BACKEND)
    keep = rng.keep_mask((M, C2), p, seed, offset)
    assert torch.equal(y.cpu() != 0, keep), "dropped elements differ from fusedformer.rng's mask"
    y2 = ff.gelu_ffn(x, w1, None, w2, b2, dropout_p=p, seed=seed, offset=offset, backend=BACKEND)
    assert torch.equal(y, y2)
