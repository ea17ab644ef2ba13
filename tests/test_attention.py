"""attention on every backend against the float64 reference (the 2x rule), outputs, lse and every
gradient; the dropout mask bit for bit against fusedformer.rng; the reference against torch SDPA;
bad input named in a TypeError / ValueError.

Shapes are awkward on purpose: sequence lengths 1, 7, 127, 1025, Sq != Sk, head dims 16..128 with
Dv != D, (B, S, H, D) tensors transposed to (B, H, S, D), batch 1, GQA / MQA, fully padded rows."""
import math

import pytest
import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer import rng
from fusedformer.backends import BackendError
from fusedformer.ops import attention as op_module
from fusedformer.testing import attention_inputs

from conftest import HAS_GPU, args_with, dtype_for, skip_unless_available
from numerics import check_against_reference

INTERPRETER_SKIP = "interpreter: covered by tests/triton/test_triton.py; the full sweep runs on GPU"


def _skip_if_slow_here(backend, B, H, Sq, Sk, D):
    """The Triton interpreter runs a kernel element by element: only tiny problems here."""
    if backend == "triton" and not HAS_GPU and (B * H * Sq * Sk > 4096 or D > 64):
        pytest.skip(INTERPRETER_SKIP)


def _qkv(B, H, Hk, Sq, Sk, D, Dv, *, transposed, gen_seed):
    """float64 masters; ``transposed`` builds (B, S, H, D) storage viewed as (B, H, S, D)."""
    return attention_inputs(torch.Generator().manual_seed(gen_seed), B, H, Hk, Sq, Sk, D, Dv, transposed=transposed)


def _attention_fn(*, attn_mask=None, key_padding_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  seed=None, offset=0):
    """fn(tensors, backend) -> (out, lse) for check_against_reference (lse compared by value)."""
    def fn(t, backend):
        gqa = t["q"].shape[1] != t["k"].shape[1]
        mask = t.get("attn_mask", attn_mask)
        try:
            out, lse = ff.attention(t["q"], t["k"], t["v"], mask, dropout_p, is_causal, scale, enable_gqa=gqa,
                                    key_padding_mask=key_padding_mask, seed=seed, offset=offset,
                                    return_lse=True, backend=backend)
        except BackendError as exc:
            if backend in ("cpu", "reference"):
                raise
            pytest.skip(f"{backend} cannot take these inputs: {exc}")
        return out, lse.detach()
    return fn


GRADS = ("q", "k", "v")

# (B, H, Hk, Sq, Sk, D, Dv, transposed, causal)
SHAPES = [
    (1, 1, 1, 1, 1, 16, 16, False, False),        # a single query and key
    (2, 3, 3, 7, 7, 40, 40, True, True),          # seq 7, (B, S, H, D) transposed, causal
    (1, 2, 2, 127, 127, 64, 64, True, True),      # seq 127, batch 1
    (2, 4, 2, 127, 65, 80, 80, False, False),     # GQA, Sq > Sk, head dim 80
    (1, 4, 1, 33, 130, 128, 128, True, True),     # MQA, causal with Sq < Sk, head dim 128
    (2, 2, 2, 130, 33, 16, 24, False, True),      # Dv != D, causal with Sq > Sk
    (1, 2, 2, 300, 600, 64, 64, False, False),    # several key tiles per query tile
    (1, 1, 1, 1025, 1025, 64, 64, True, True),    # 1025: ragged last tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])) + ("-T" if s[7] else "")
                         + ("-causal" if s[8] else ""))
def test_shapes(backend, dtype, shape):
    device = skip_unless_available(op_module, backend)
    B, H, Hk, Sq, Sk, D, Dv, transposed, causal = shape
    _skip_if_slow_here(backend, B, H, Sq, Sk, D)
    inputs = _qkv(B, H, Hk, Sq, Sk, D, Dv, transposed=transposed, gen_seed=Sq * 7 + D)
    check_against_reference("attention", _attention_fn(is_causal=causal), inputs, backend, dtype, device, GRADS)


@pytest.mark.parametrize("shape", [(2, 2, 2, 7, 9, 16, 16), (1, 4, 2, 127, 127, 64, 32)], ids=str)
def test_float16(backend, shape):
    device = skip_unless_available(op_module, backend)
    B, H, Hk, Sq, Sk, D, Dv = shape
    _skip_if_slow_here(backend, B, H, Sq, Sk, D)
    inputs = _qkv(B, H, Hk, Sq, Sk, D, Dv, transposed=True, gen_seed=11)
    check_against_reference("attention", _attention_fn(is_causal=True), inputs, backend, torch.float16, device, GRADS)


def _padding(B, Sk, gen_seed, *, full_row=0):
    """Random key padding with batch row ``full_row`` padded entirely (its queries see nothing)."""
    g = torch.Generator().manual_seed(gen_seed)
    kpm = torch.rand(B, Sk, generator=g) < 0.3
    if full_row is not None:
        kpm[full_row] = True
    return kpm


# attn_mask kinds: additive masks of several broadcast shapes, and bool masks
MASKS = ["additive_full", "additive_broadcast_heads", "additive_per_key", "bool", "bool_2d"]


def _mask(kind, B, H, Sq, Sk, gen_seed):
    g = torch.Generator().manual_seed(gen_seed)
    if kind == "additive_full":
        return torch.randn(B, H, Sq, Sk, generator=g, dtype=torch.float64)
    if kind == "additive_broadcast_heads":  # (B, 1, Sq, Sk): stride 0 over heads after expand
        return torch.randn(B, 1, Sq, Sk, generator=g, dtype=torch.float64) * 2
    if kind == "additive_per_key":          # (1, H, 1, Sk): stride 0 over batch and queries
        return torch.randn(1, H, 1, Sk, generator=g, dtype=torch.float64)
    allowed = torch.rand(B if kind == "bool" else 1, 1, Sq, Sk, generator=g) > 0.4
    if kind == "bool_2d":
        allowed = allowed[0, 0]
    return allowed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_masks(backend, dtype, kind, causal):
    device = skip_unless_available(op_module, backend)
    B, H, Hk, Sq, Sk, D = 2, 4, 2, 67, 131, 32
    _skip_if_slow_here(backend, B, H, Sq, Sk, D)
    inputs = _qkv(B, H, Hk, Sq, Sk, D, D, transposed=True, gen_seed=3)
    mask = _mask(kind, B, H, Sq, Sk, gen_seed=4)
    if mask.dtype == torch.bool:   # a bool mask passes through unchanged (it is not converted per dtype)
        fn = _attention_fn(attn_mask=mask.to(device), is_causal=causal)
    else:                          # an additive mask runs in the test dtype like q
        inputs["attn_mask"] = mask
        fn = _attention_fn(is_causal=causal)
    check_against_reference("attention", fn, inputs, backend, dtype, device, GRADS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_padding_with_a_fully_padded_batch_row(backend, dtype, causal):
    device = skip_unless_available(op_module, backend)
    B, H, Hk, Sq, Sk, D = 3, 2, 2, 45, 300, 64
    _skip_if_slow_here(backend, B, H, Sq, Sk, D)
    inputs = _qkv(B, H, Hk, Sq, Sk, D, D, transposed=False, gen_seed=5)
    kpm = _padding(B, Sk, 6, full_row=1).to(device)
    kpm[2, :256] = True  # batch row 2: whole key tiles of padding
    check_against_reference("attention", _attention_fn(key_padding_mask=kpm, is_causal=causal), inputs, backend,
                            dtype, device, GRADS)
    # the fully padded row: output 0, lse -inf, no gradient
    q, k, v = (inputs[n].to(device=device, dtype=dtype).requires_grad_() for n in GRADS)
    out, lse = ff.attention(q, k, v, is_causal=causal, key_padding_mask=kpm, return_lse=True, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for grad in (dq[1], dk[1], dv[1]):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_masks_combined_with_gqa_padding_and_dropout(backend):
    device = skip_unless_available(op_module, backend)
    B, H, Hk, Sq, Sk, D = 2, 6, 3, 37, 70, 40
    _skip_if_slow_here(backend, B, H, Sq, Sk, D)
    inputs = _qkv(B, H, Hk, Sq, Sk, D, D, transposed=True, gen_seed=7)
    inputs["attn_mask"] = _mask("additive_broadcast_heads", B, H, Sq, Sk, 8)
    kpm = _padding(B, Sk, 9, full_row=None).to(device)
    fn = _attention_fn(key_padding_mask=kpm, is_causal=True, dropout_p=0.2, seed=1234, offset=40)
    check_against_reference("attention", fn, inputs, backend, dtype_for(backend), device, GRADS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_against_reference_with_the_same_seed(backend, dtype, causal):
    """Same seed and offset: the reference draws the same mask, so the 2x rule holds for the output
    and every gradient (which need the mask again in the backward)."""
    device = skip_unless_available(op_module, backend)
    B, H, Hk, Sq, Sk, D = 2, 3, 3, 129, 77, 64
    _skip_if_slow_here(backend, B, H, Sq, Sk, D)
    inputs = _qkv(B, H, Hk, Sq, Sk, D, D, transposed=False, gen_seed=10)
    fn = _attention_fn(dropout_p=0.3, is_causal=causal, seed=2**40 + 17, offset=1001)
    check_against_reference("attention", fn, inputs, backend, dtype, device, GRADS)


def test_dropout_mask_is_the_shared_rng(backend):
    """With V the identity (Sk = Dv), out[b, h, i, j] = P[b, h, i, j] * Z[b, h, i, j]: the dropped
    entries are exactly fusedformer.rng's mask and the kept ones are P / (1 - p)."""
    device = skip_unless_available(op_module, backend)
    B, H, Sq, Sk, D = 2, 3, 19, 24, 16
    _skip_if_slow_here(backend, B, H, Sq, Sk, D)
    p, seed, offset = 0.35, 987654321, 7
    dtype = dtype_for(backend)
    g = torch.Generator().manual_seed(12)
    q = torch.randn(B, H, Sq, D, generator=g).to(device, dtype)
    k = torch.randn(B, H, Sk, D, generator=g).to(device, dtype)
    v = torch.eye(Sk, device=device, dtype=dtype).expand(B, H, Sk, Sk)
    probs = ff.attention(q, k, v, backend=backend)
    out = ff.attention(q, k, v, dropout_p=p, seed=seed, offset=offset, backend=backend)
    keep = rng.keep_mask((B, H, Sq, Sk), p, seed, offset)
    assert torch.equal(out.cpu() != 0, keep), "dropped entries differ from fusedformer.rng's mask"
    # 16-bit outputs: both sides are rounded once more (one ulp of the dtype)
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=1e-6)
    torch.testing.assert_close(out.float().cpu(), probs.float().cpu() * keep / (1 - p), **tol)
    assert torch.equal(out, ff.attention(q, k, v, dropout_p=p, seed=seed, offset=offset, backend=backend))
    assert not torch.equal(out, ff.attention(q, k, v, dropout_p=p, seed=seed + 1, offset=offset, backend=backend))
    keep_rate = keep.float().mean().item()  # the statistics of the mask itself
    assert abs(keep_rate - (1 - p)) < 4 * math.sqrt(p * (1 - p) / keep.numel())


def test_deterministic(backend):
    """Same inputs, same outputs and gradients, bit for bit (no races, no order dependence)."""
    device = skip_unless_available(op_module, backend)
    B, H, Hk, Sq, Sk, D = 1, 4, 1, 200, 300, 32
    _skip_if_slow_here(backend, B, H, Sq, Sk, D)
    dtype = dtype_for(backend)
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(*s, generator=g).to(device, dtype).requires_grad_()
               for s in ((B, H, Sq, D), (B, Hk, Sk, D), (B, Hk, Sk, D)))
    dout = torch.randn(B, H, Sq, D, generator=g).to(device, dtype)

    def run():
        out = ff.attention(q, k, v, is_causal=True, enable_gqa=True, backend=backend)
        return (out,) + torch.autograd.grad(out, (q, k, v), dout)
    # the cuda backward sums dQ with float atomics unless deterministic algorithms are requested
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(backend == "cuda" or was)
    try:
        for a, b in zip(run(), run()):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(was)


def test_outputs_written_everywhere(backend):
    """Fresh allocations are not assumed to be zero: fill the allocator with NaN first."""
    device = skip_unless_available(op_module, backend)
    B, H, S, D = 1, 2, 64, 32
    _skip_if_slow_here(backend, B, H, S, S, D)
    for _ in range(3):
        torch.full((B * H * S * D * 4,), float("nan"), device=device)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype_for(backend), requires_grad=True)
               for _ in range(3))
    out = ff.attention(q, k, v, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for t in (out,) + grads:
        assert torch.isfinite(t).all()


# ---------------------------------------------------------------------------------------------
# The reference itself against torch.nn.functional.scaled_dot_product_attention (float64)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["plain", "causal", "causal_rect", "bool_mask", "additive_mask", "gqa",
                                  "gqa_causal_mask"])
def test_reference_matches_sdpa(case):
    g = torch.Generator().manual_seed(14)
    B, H, Hk, Sq, Sk, D = 2, 4, 4, 33, 33, 24
    if case == "causal_rect":
        Sq, Sk = 17, 40
    if case.startswith("gqa"):
        Hk = 2
    t = _qkv(B, H, Hk, Sq, Sk, D, D, transposed=True, gen_seed=15)
    q, k, v = (t[n].requires_grad_() for n in GRADS)
    mask = None
    if case in ("bool_mask", "gqa_causal_mask"):
        mask = torch.rand(B, 1, Sq, Sk, generator=g) > 0.3
        mask[..., 0] = True  # SDPA gives NaN for fully masked rows; keep every row visible
    elif case == "additive_mask":
        mask = torch.randn(1, H, Sq, Sk, generator=g, dtype=torch.float64)
    causal = "causal" in case
    gqa = Hk != H
    out = ff.attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa, backend="reference")
    if causal and mask is not None:  # SDPA takes one or the other: fold the causal rule into the mask
        expected = F.scaled_dot_product_attention(q, k, v, mask & torch.ones(Sq, Sk, dtype=torch.bool).tril(),
                                                  enable_gqa=gqa)
    else:
        expected = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa)
    torch.testing.assert_close(out, expected)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(expected, (q, k, v), dout)):
        torch.testing.assert_close(a, e)


# ---------------------------------------------------------------------------------------------
# Bad input: a TypeError / ValueError naming the argument, from the Python API and the native op
# ---------------------------------------------------------------------------------------------
def _good():
    g = torch.Generator().manual_seed(16)
    return {"query": torch.randn(2, 4, 5, 8, generator=g), "key": torch.randn(2, 4, 6, 8, generator=g),
            "value": torch.randn(2, 4, 6, 8, generator=g)}


def _with(**changes):
    return args_with(_good(), **changes)


BAD = {
    "query_int": (_with(query=lambda t: t.long()), TypeError, "query"),
    "query_not_tensor": (_with(query=[1.0]), TypeError, "query"),
    "key_dtype": (_with(key=lambda t: t.double()), TypeError, "key"),
    "value_on_meta": (_with(value=lambda t: t.to("meta")), ValueError, "value"),
    "key_on_meta": (_with(key=lambda t: t.to("meta")), ValueError, "key"),
    "query_3d_with_4d_key": (_with(query=lambda t: t[0]), ValueError, "same number of dimensions"),
    "batch_mismatch": (_with(key=lambda t: torch.cat([t, t[:1]])), ValueError, "batch"),  # 3 vs 2: no broadcast
    "head_dim_mismatch": (_with(key=lambda t: t[..., :4]), ValueError, "head dim"),
    "value_seq_mismatch": (_with(value=lambda t: t[:, :, :5]), ValueError, "value"),
    "gqa_without_enable_gqa": (_with(key=lambda t: t[:, :2], value=lambda t: t[:, :2]), ValueError, "enable_gqa"),
    "gqa_heads_not_multiple": (_with(key=lambda t: t[:, :3], value=lambda t: t[:, :3], enable_gqa=True),
                               ValueError, "multiple"),
    "strided_head_dim": (_with(query=lambda t: t.repeat_interleave(2, -1)[..., ::2]), ValueError, "contiguous"),
    "mask_wrong_shape": (_with(attn_mask=torch.zeros(5, 7)), ValueError, "attn_mask"),
    "mask_wrong_dtype": (_with(attn_mask=torch.zeros(5, 6, dtype=torch.int32)), TypeError, "attn_mask"),
    "mask_on_meta": (_with(attn_mask=torch.zeros(5, 6, device="meta")), ValueError, "attn_mask"),
    "mask_not_tensor": (_with(attn_mask=[[True]]), TypeError, "attn_mask"),
    "padding_not_bool": (_with(key_padding_mask=torch.zeros(2, 6)), TypeError, "key_padding_mask"),
    "padding_wrong_shape": (_with(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError,
                            "key_padding_mask"),
    "padding_on_meta": (_with(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool, device="meta")), ValueError,
                        "key_padding_mask"),
    "dropout_one": (_with(dropout_p=1.0), ValueError, "dropout_p"),
    "dropout_negative": (_with(dropout_p=-0.1), ValueError, "dropout_p"),
    "dropout_not_number": (_with(dropout_p="0.1"), TypeError, "dropout_p"),
    "causal_not_bool": (_with(is_causal=1), TypeError, "is_causal"),
    "scale_nan": (_with(scale=float("nan")), ValueError, "scale"),
    "offset_negative": (_with(offset=-1), ValueError, "offset"),
    "seed_float_tensor": (_with(dropout_p=0.1, seed=torch.tensor([1.5])), TypeError, "seed"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name):
    (args, kwargs), exc, needle = BAD[name]
    with pytest.raises(exc, match=needle):
        ff.attention(args["query"], args["key"], args["value"], **kwargs)


def _native_or_skip():
    why = ff.backends.why_unavailable(op_module, "cpu")
    if why:
        pytest.skip("cpu: " + "; ".join(why))
    return torch.ops.fusedformer_C


def test_native_op_checks_its_arguments():
    """Direct callers of torch.ops.fusedformer_C.* get an error, never a crash or a wrong answer."""
    C = _native_or_skip()
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    good = (q, k, v, None, None, 0.0, False, 0.3, None, 0)

    def call(**changes):
        names = ("q", "k", "v", "attn_mask", "key_padding_mask", "dropout_p", "is_causal", "scale", "seed", "offset")
        args = dict(zip(names, good))
        args.update(changes)
        return C.attention_fwd(*args.values())
    call()
    with pytest.raises(ValueError, match="k has shape"):
        call(k=torch.randn(1, 2, 4, 7))
    with pytest.raises(ValueError, match="multiple"):
        call(k=torch.randn(1, 3, 4, 8), v=torch.randn(1, 3, 4, 8))
    with pytest.raises(TypeError, match="dtype"):
        call(v=v.double())
    with pytest.raises(ValueError, match="contiguous last dim"):
        call(q=torch.randn(1, 2, 8, 4).transpose(2, 3))
    with pytest.raises(ValueError, match="attn_mask"):
        call(attn_mask=torch.zeros(1, 2, 4, 3))
    with pytest.raises(ValueError, match="key_padding_mask"):
        call(key_padding_mask=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p"):
        call(dropout_p=1.0)
    with pytest.raises(ValueError, match="empty"):
        call(q=torch.randn(1, 2, 0, 8))
    out, lse = call()
    with pytest.raises(ValueError, match="lse"):
        C.attention_bwd(torch.randn_like(out), q, k, v, out, lse[..., :3], None, None, 0.0, False, 0.3, None, 0)
    with pytest.raises(ValueError, match="dout"):
        C.attention_bwd(torch.randn(1, 2, 4, 7), q, k, v, out, lse, None, None, 0.0, False, 0.3, None, 0)


# ------------------------------------------------------------------------------------------------
# the GPU sweep (``gpu``: runs where a CUDA GPU is visible), on the cuda and triton backends
# ------------------------------------------------------------------------------------------------
GPU_HEAD_DIMS = [16, 32, 40, 64, 80, 96, 128, 160, 192, 256]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", GPU_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_head_dims(gpu_backend, dtype, D, causal):
    """Every head dim to 256 with GQA, key padding (batch row 0 fully padded) and dropout; a backend
    that cannot take a head dim on this GPU (the cuda kernels' shared memory) skips with its reason."""
    device = skip_unless_available(op_module, gpu_backend)
    B, H, Hk, Sq, Sk = 2, 4, 2, 257, 263
    kpm = _padding(B, Sk, D).to(device)
    fn = _attention_fn(key_padding_mask=kpm, is_causal=causal, dropout_p=0.1, seed=5)
    check_against_reference("attention", fn, _qkv(B, H, Hk, Sq, Sk, D, D, transposed=False, gen_seed=D), gpu_backend,
                            dtype, device, GRADS)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [1, 127, 1025, 4097, 16384])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_long_sequences(gpu_backend, S, causal):
    device = skip_unless_available(op_module, gpu_backend)
    heads = 2 if S <= 4097 else 1
    check_against_reference("attention", _attention_fn(is_causal=causal),
                            _qkv(1, heads, heads, S, S, 64, 64, transposed=False, gen_seed=S), gpu_backend,
                            torch.bfloat16, device, GRADS)
