"""fusedformer.nn modules against their torch counterparts (outputs and gradients, the 2x rule),
dropout through the shared RNG, state_dict interchange, backend selection, and convert()/revert()
on torch.nn models."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedformer as ff
from fusedformer import rng
from fusedformer.ops import attention as attention_op
from fusedformer.ops import gelu_ffn as gelu_ffn_op
from fusedformer.ops import layer_norm as layer_norm_op

from conftest import skip_unless_available
from numerics import assert_2x

OPS = {"layer_norm": layer_norm_op, "attention": attention_op, "gelu_ffn": gelu_ffn_op}


def needs(backend, *ops, interpreter=True):
    """Skip unless ``backend`` runs every op in ``ops`` here; return the device to test on.

    ``interpreter=False``: this configuration is skipped under the (slow) Triton CPU interpreter,
    where a subset of a test's configurations runs instead."""
    device = None
    for op in ops:
        device = skip_unless_available(OPS[op], backend)
    if backend == "triton" and not interpreter and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("triton: the Triton CPU interpreter runs a subset of this test's configurations (slow)")
    return device


# ------------------------------------------------------------------------------------------------
# The comparison harness: a fused module against its torch counterpart with the same weights.
#   ref64 = torch module in float64, base = torch module in the test dtype, out = fused module in
#   the test dtype; the 2x rule on every output and on the gradients of the inputs and parameters.
# ------------------------------------------------------------------------------------------------
def _materialize(inputs, dtype, device):
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not k.endswith("mask"):
            out[k] = v.to(device=device, dtype=dtype).requires_grad_(True)
        elif isinstance(v, torch.Tensor) and v.is_floating_point():   # additive masks: no gradient
            out[k] = v.to(device=device, dtype=dtype)
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        else:
            out[k] = v
    return out


def _run(module, call, inputs, dtype, device, upstream_seed=7):
    module = copy.deepcopy(module).to(device=device, dtype=dtype)
    tensors = _materialize(inputs, dtype, device)
    outs = call(module, tensors)
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
    gen = torch.Generator().manual_seed(upstream_seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=o.dtype)).sum()
               for o in outs)
    leaves = {f"grad {k}": t for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    leaves.update({f"grad {n}": p for n, p in module.named_parameters()})
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return [o.detach() for o in outs], dict(zip(leaves, grads))


def compare_modules(op, torch_module, fused_module, call, inputs, dtype, device):
    fused_module.load_state_dict(torch_module.state_dict())
    outs, grads = _run(fused_module, call, inputs, dtype, device)
    base_outs, base_grads = _run(torch_module, call, inputs, dtype, torch.device("cpu"))
    ref_outs, ref_grads = _run(torch_module, call, inputs, torch.float64, torch.device("cpu"))
    assert len(outs) == len(ref_outs)
    for i, (o, r, b) in enumerate(zip(outs, ref_outs, base_outs)):
        assert_2x(f"out[{i}]", op, o, r, b, dtype)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        if ref_grads[name] is None:
            assert grads[name] is None or not grads[name].any(), f"{name}: unexpected gradient"
            continue
        assert grads[name] is not None, f"{name}: missing gradient"
        assert_2x(name, op, grads[name], ref_grads[name], base_grads[name], dtype)


# ------------------------------------------------------------------------------------------------
# LayerNorm / RMSNorm
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", ["affine", "no_bias", "no_affine"])
def test_layer_norm_matches_torch(backend, dtype, affine):
    device = needs(backend, "layer_norm")
    kw = {"affine": {}, "no_bias": {"bias": False}, "no_affine": {"elementwise_affine": False}}[affine]
    torch_ln = nn.LayerNorm(96, eps=1e-6, **kw)
    with torch.no_grad():
        for p in torch_ln.parameters():
            p.normal_()
    fused = ff.nn.LayerNorm(96, eps=1e-6, backend=backend, **kw)
    x = torch.randn(3, 11, 96, dtype=torch.float64) * 3 + 1
    compare_modules("layer_norm", torch_ln, fused, lambda m, t: m(t["x"]), {"x": x}, dtype, device)


@pytest.mark.parametrize("eps", [None, 1e-5])
def test_rms_norm_matches_torch(backend, eps):
    device = needs(backend, "layer_norm")
    torch_rms = nn.RMSNorm((4, 40), eps=eps)
    with torch.no_grad():
        torch_rms.weight.normal_()
    fused = ff.nn.RMSNorm((4, 40), eps=eps, backend=backend)
    x = torch.randn(5, 4, 40, dtype=torch.float64)
    compare_modules("layer_norm", torch_rms, fused, lambda m, t: m(t["x"]), {"x": x}, torch.float32, device)


def test_layer_norm_fused_residual_and_dropout(backend):
    """The keyword extras: norm(dropout(x) + residual) with the shared RNG's mask, and the pre-norm sum."""
    device = needs(backend, "layer_norm")
    ln = ff.nn.LayerNorm(64, backend=backend).to(device)
    x, r = torch.randn(2, 9, 64, device=device), torch.randn(2, 9, 64, device=device)
    torch.manual_seed(11)
    y, s = ln(x, residual=r, dropout_p=0.25, return_residual=True)
    torch.manual_seed(11)
    seed = int(rng.new_seed())
    expect_s = x.double().cpu() * rng.dropout_multiplier(x.shape, 0.25, seed, dtype=torch.float64) + r.double().cpu()
    expect_y = F.layer_norm(expect_s, (64,), ln.weight.double().cpu(), ln.bias.double().cpu())
    torch.testing.assert_close(s.double().cpu(), expect_s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.double().cpu(), expect_y, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# MultiheadAttention
# ------------------------------------------------------------------------------------------------
E, HEADS, L, S, B = 48, 4, 7, 9, 3


def _key_padding(Bn, Sn):
    kpm = torch.zeros(Bn, Sn, dtype=torch.bool)
    kpm[1, Sn - 3:] = True           # every row keeps at least one key (torch gives NaN otherwise)
    kpm[-1, :2] = True
    return kpm


MHA_CASES = {
    # name: (constructor kwargs, inputs builder, forward kwargs)
    "self_plain": ({}, "self", {}),
    "self_padding_boolmask": ({}, "self", {"key_padding_mask": "kpm", "attn_mask": "bool2d"}),
    "self_causal": ({}, "self", {"attn_mask": "causal", "is_causal": True}),
    "self_float_masks": ({}, "self", {"attn_mask": "float3d", "key_padding_mask": "floatkpm"}),
    "cross_kdim_vdim": ({"kdim": 40, "vdim": 24}, "cross", {"key_padding_mask": "kpm"}),
    "bias_kv_zero_attn_nobias": ({"add_bias_kv": True, "add_zero_attn": True, "bias": False}, "cross",
                                 {"key_padding_mask": "kpm", "attn_mask": "bool2d"}),
}


def _mha_inputs(kind, batch_first, kdim, vdim, gen):
    def seq(n, width):
        t = torch.randn(B, n, width, generator=gen, dtype=torch.float64)
        return t if batch_first else t.transpose(0, 1).contiguous()
    if kind == "self":
        x = seq(L, E)
        return {"x": x}, L
    return {"q": seq(L, E), "k": seq(S, kdim), "v": seq(S, vdim)}, S


def _mha_masks(spec, Lq, Sk, gen):
    out = {}
    for arg, what in spec.items():
        if arg == "is_causal":
            out[arg] = what
        elif what == "kpm":
            out[arg] = _key_padding(B, Sk)
        elif what == "floatkpm":
            out[arg] = torch.where(_key_padding(B, Sk), float("-inf"), 0.0).double() + \
                torch.rand(B, Sk, generator=gen, dtype=torch.float64)
        elif what == "bool2d":
            m = torch.rand(Lq, Sk, generator=gen) < 0.3
            m[:, 2] = False          # a key every query may attend (torch's bool: True = blocked)
            out[arg] = m
        elif what == "causal":
            out[arg] = nn.Transformer.generate_square_subsequent_mask(Lq, dtype=torch.float64)
        elif what == "float3d":
            out[arg] = torch.randn(B * HEADS, Lq, Sk, generator=gen, dtype=torch.float64)
    return out


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_matches_torch(backend, case, batch_first, need_weights):
    device = needs(backend, "attention", interpreter=batch_first and not need_weights)
    ctor, kind, spec = MHA_CASES[case]
    torch.manual_seed(3)
    torch_mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **ctor)
    with torch.no_grad():
        for p in torch_mha.parameters():
            p.add_(0.1 * torch.randn_like(p))   # torch's init, with non-zero biases
    fused = ff.nn.MultiheadAttention(E, HEADS, batch_first=batch_first, backend=backend, **ctor)
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    inputs, Sk = _mha_inputs(kind, batch_first, ctor.get("kdim", E), ctor.get("vdim", E), gen)
    masks = _mha_masks(spec, L, Sk, gen)
    inputs.update({k: v for k, v in masks.items() if isinstance(v, torch.Tensor)})
    is_causal = masks.get("is_causal", False)

    def call(m, t):
        q, k, v = (t["x"],) * 3 if "x" in t else (t["q"], t["k"], t["v"])
        return m(q, k, v, key_padding_mask=t.get("key_padding_mask"), attn_mask=t.get("attn_mask"),
                 need_weights=need_weights, is_causal=is_causal)
    compare_modules("attention", torch_mha, fused, call, inputs, torch.float32, device)


def test_multihead_attention_bfloat16_and_unbatched(backend):
    device = needs(backend, "attention")
    torch_mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    fused = ff.nn.MultiheadAttention(E, HEADS, batch_first=True, backend=backend)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, L, E, generator=gen, dtype=torch.float64)
    kpm = _key_padding(B, L)
    compare_modules("attention", torch_mha, fused,
                    lambda m, t: m(t["x"], t["x"], t["x"], key_padding_mask=t["kpm"], need_weights=False)[0],
                    {"x": x, "kpm": kpm}, torch.bfloat16, device)
    # unbatched (L, E) input, per-head weights
    compare_modules("attention", torch_mha, fused,
                    lambda m, t: m(t["x"], t["x"], t["x"], average_attn_weights=False),
                    {"x": x[0]}, torch.float32, device)


def _replay_seeds(seed, n):
    """The seeds the fused calls draw (seed=None) after torch.manual_seed(seed), in order."""
    torch.manual_seed(seed)
    return [int(rng.new_seed()) for _ in range(n)]


def _mha_explicit(m, x, kpm, p, seed, dtype):
    """MultiheadAttention in plain torch ops with fusedformer.rng's dropout mask (batch_first)."""
    W, bias = m.in_proj_weight.to(dtype), m.in_proj_bias.to(dtype)
    q, k, v = F.linear(x, W, bias).chunk(3, dim=-1)
    Bn, Ln, _ = x.shape
    D = E // HEADS
    q, k, v = (t.reshape(Bn, Ln, HEADS, D).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(kpm[:, None, None, :], float("-inf"))
    P = scores.softmax(-1) * rng.dropout_multiplier(scores.shape, p, seed, dtype=dtype)
    o = (P @ v).transpose(1, 2).reshape(Bn, Ln, E)
    return F.linear(o, m.out_proj.weight.to(dtype), m.out_proj.bias.to(dtype)), P.mean(1)


def test_multihead_attention_train_dropout_uses_shared_rng(backend):
    """Training mode: output and returned weights are those of the shared RNG's mask (2x rule
    against an explicit float64 computation), repeatable under torch.manual_seed."""
    device = needs(backend, "attention")
    p = 0.3
    m = ff.nn.MultiheadAttention(E, HEADS, dropout=p, batch_first=True, backend=backend).to(device).train()
    x = torch.randn(B, L, E, dtype=torch.float64)
    kpm = _key_padding(B, L)
    torch.manual_seed(21)
    out, w = m(x.float().to(device), x.float().to(device), x.float().to(device), key_padding_mask=kpm.to(device))
    seed, = _replay_seeds(21, 1)
    ref_out, ref_w = _mha_explicit(m.cpu(), x, kpm, p, seed, torch.float64)
    base_out, base_w = _mha_explicit(m, x.float(), kpm, p, seed, torch.float32)
    assert_2x("out", "attention", out.detach(), ref_out.detach(), base_out.detach())
    assert_2x("weights", "attention", w.detach(), ref_w.detach(), base_w.detach())
    torch.manual_seed(21)
    again, _ = m.to(device)(x.float().to(device), x.float().to(device), x.float().to(device),
                            key_padding_mask=kpm.to(device), need_weights=False)
    assert torch.equal(out, again), "same torch.manual_seed, different dropout"


# ------------------------------------------------------------------------------------------------
# GeluFFN
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_ffn_matches_torch(backend, approximate):
    device = needs(backend, "gelu_ffn", interpreter=approximate == "tanh")
    torch_ffn = nn.Sequential()
    torch_ffn.add_module("linear1", nn.Linear(40, 72))
    torch_ffn.add_module("act", nn.GELU(approximate=approximate))
    torch_ffn.add_module("linear2", nn.Linear(72, 40))
    fused = ff.nn.GeluFFN(40, 72, approximate=approximate, dropout=0.2, backend=backend).eval()
    x = torch.randn(2, 13, 40, dtype=torch.float64)
    compare_modules("gelu_ffn", torch_ffn, fused, lambda m, t: m(t["x"]), {"x": x}, torch.float32, device)


def test_gelu_ffn_train_dropout_uses_shared_rng(backend):
    device = needs(backend, "gelu_ffn")
    m = ff.nn.GeluFFN(32, 64, out_features=24, dropout=0.4, backend=backend).to(device).train()
    x = torch.randn(5, 32, device=device)
    torch.manual_seed(4)
    y = m(x)
    seed, = _replay_seeds(4, 1)
    plain = m.linear2(F.gelu(m.linear1(x))).double().cpu()
    expect = plain * rng.dropout_multiplier(plain.shape, 0.4, seed, dtype=torch.float64)
    torch.testing.assert_close(y.double().cpu(), expect, rtol=1e-5, atol=1e-5)
    assert (y == 0).float().mean().item() > 0.2, "dropout did not drop"


def test_gelu_ffn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="approximate"):
        ff.nn.GeluFFN(8, 16, approximate="fast")
    with pytest.raises(ValueError, match="dropout"):
        ff.nn.GeluFFN(8, 16, dropout=1.0)


# ------------------------------------------------------------------------------------------------
# TransformerEncoderLayer
# ------------------------------------------------------------------------------------------------
D_MODEL, NHEAD, FF = 32, 4, 56


def _encoder_pair(norm_first, activation, batch_first, backend, dropout=0.1, bias=True):
    torch.manual_seed(1)
    t = nn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, dropout=dropout, activation=activation,
                                   batch_first=batch_first, norm_first=norm_first, bias=bias)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.1 * torch.randn_like(p))   # no unit LayerNorm weights / zero biases
    f = ff.nn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, dropout=dropout, activation=activation,
                                      batch_first=batch_first, norm_first=norm_first, bias=bias, backend=backend)
    return t, f


def _src(batch_first, gen, Bn=3, Sn=10):
    x = torch.randn(Bn, Sn, D_MODEL, generator=gen, dtype=torch.float64)
    return x if batch_first else x.transpose(0, 1).contiguous()


@pytest.mark.parametrize("masks", ["none", "padding", "causal_padding"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_encoder_layer_matches_torch_eval(backend, norm_first, activation, masks):
    ops = ("layer_norm", "attention") + (("gelu_ffn",) if activation == "gelu" else ())
    device = needs(backend, *ops, interpreter=masks == "causal_padding")
    batch_first = masks != "padding"          # both layouts
    torch_layer, fused = _encoder_pair(norm_first, activation, batch_first, backend)
    torch_layer.eval(), fused.eval()
    gen = torch.Generator().manual_seed(len(masks))
    inputs = {"src": _src(batch_first, gen)}
    if masks != "none":
        inputs["src_key_padding_mask"] = _key_padding(3, 10)
    causal = masks == "causal_padding"
    if causal:
        inputs["src_mask"] = torch.ones(10, 10, dtype=torch.bool).triu(1)     # True = blocked

    def call(m, t):
        return m(t["src"], src_mask=t.get("src_mask"), src_key_padding_mask=t.get("src_key_padding_mask"),
                 is_causal=causal)
    compare_modules("gelu_ffn", torch_layer, fused, call, inputs, torch.float32, device)


def test_encoder_layer_bfloat16_no_bias(backend):
    device = needs(backend, "layer_norm", "attention", "gelu_ffn", interpreter=False)
    torch_layer, fused = _encoder_pair(True, "gelu", True, backend, bias=False)
    torch_layer.eval(), fused.eval()
    inputs = {"src": _src(True, torch.Generator().manual_seed(9)), "src_key_padding_mask": _key_padding(3, 10)}
    compare_modules("gelu_ffn", torch_layer, fused,
                    lambda m, t: m(t["src"], src_key_padding_mask=t["src_key_padding_mask"]),
                    inputs, torch.bfloat16, device)


def _encoder_explicit(layer, x, kpm, p, seeds, dtype):
    """nn.TransformerEncoderLayer (batch_first, GELU, inner dropout 0) in plain torch ops with the
    shared RNG's dropout masks at the fused call sites, in the order the fused layer draws seeds."""
    P = {n: t.to(dtype) for n, t in layer.named_parameters()}
    mult = lambda shape, s: rng.dropout_multiplier(shape, p, s, dtype=dtype)   # noqa: E731

    def attn(h, s):
        q, k, v = F.linear(h, P["self_attn.in_proj_weight"], P["self_attn.in_proj_bias"]).chunk(3, dim=-1)
        Bn, Ln, _ = h.shape
        q, k, v = (t.reshape(Bn, Ln, NHEAD, -1).transpose(1, 2) for t in (q, k, v))
        sc = (q @ k.transpose(-1, -2)) / math.sqrt(D_MODEL // NHEAD)
        Pm = sc.masked_fill(kpm[:, None, None, :], float("-inf")).softmax(-1) * mult(sc.shape, s)
        o = (Pm @ v).transpose(1, 2).reshape(Bn, Ln, D_MODEL)
        return F.linear(o, P["self_attn.out_proj.weight"], P["self_attn.out_proj.bias"])

    def ffn(h):
        return F.linear(F.gelu(F.linear(h, P["linear1.weight"], P["linear1.bias"])), P["linear2.weight"],
                        P["linear2.bias"])

    def norm(h, i):
        return F.layer_norm(h, (D_MODEL,), P[f"norm{i}.weight"], P[f"norm{i}.bias"], layer.norm1.eps)

    if layer.norm_first:                     # seeds: attention, norm2 (dropout1), gelu_ffn (dropout2)
        a = attn(norm(x, 1), seeds[0])
        s = x + a * mult(a.shape, seeds[1])
        f = ffn(norm(s, 2))
        return s + f * mult(f.shape, seeds[2])
    a = attn(x, seeds[0])                    # seeds: attention, norm1 (dropout1), norm2 (dropout2)
    h = norm(x + a * mult(a.shape, seeds[1]), 1)
    f = ffn(h)
    return norm(h + f * mult(f.shape, seeds[2]), 2)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_encoder_layer_train_dropout_uses_shared_rng(backend, norm_first):
    """Training mode against an explicit float64 computation with fusedformer.rng masks (2x rule)."""
    device = needs(backend, "layer_norm", "attention", "gelu_ffn")
    p = 0.2
    _, layer = _encoder_pair(norm_first, "gelu", True, backend, dropout=p)
    layer.dropout.p = 0.0                    # the inner dropout is torch's (unfused); keep it off here
    layer.train()
    x = torch.randn(3, 10, D_MODEL, dtype=torch.float64)
    kpm = _key_padding(3, 10)
    torch.manual_seed(99)
    out = layer.to(device)(x.float().to(device), src_key_padding_mask=kpm.to(device))
    seeds = _replay_seeds(99, 3)
    layer = layer.cpu()
    ref = _encoder_explicit(layer, x, kpm, p, seeds, torch.float64)
    base = _encoder_explicit(layer, x.float(), kpm, p, seeds, torch.float32)
    assert_2x("train-mode output", "gelu_ffn", out.detach().cpu(), ref.detach(), base.detach())


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_encoder_layer_train_mode_same_on_every_backend(backend, norm_first):
    """Same torch.manual_seed -> same masks on this backend as on the reference backend, including
    torch's own dropout between the linears (ReLU layer: unfused feed-forward)."""
    device = needs(backend, "layer_norm", "attention")
    _, layer = _encoder_pair(norm_first, "relu", True, backend, dropout=0.3)
    layer.train()
    x = torch.randn(2, 12, D_MODEL)
    torch.manual_seed(5)
    out = layer.to(device)(x.to(device))
    layer.backend = "reference"
    assert layer.self_attn.backend == "reference" and layer.norm2.backend == "reference"
    torch.manual_seed(5)
    ref = layer.cpu()(x)
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-5, atol=2e-5)
    torch.manual_seed(6)
    assert not torch.allclose(layer(x), ref), "a different seed gave the same dropout"


def test_encoder_layer_nested_input_runs_torch_path():
    torch_layer, fused = _encoder_pair(False, "relu", True, None)
    fused.load_state_dict(torch_layer.state_dict())
    torch_layer.eval(), fused.eval()
    nested = torch.nested.nested_tensor([torch.randn(5, D_MODEL), torch.randn(3, D_MODEL)])
    with torch.no_grad():
        got, want = fused(nested), torch_layer(nested)
    for g, w in zip(got.unbind(), want.unbind()):
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------------------------------------------
# state_dict interchange, backend selection, bad input
# ------------------------------------------------------------------------------------------------
PAIRS = {
    "LayerNorm": (lambda: nn.LayerNorm(16, bias=False), lambda: ff.nn.LayerNorm(16, bias=False)),
    "RMSNorm": (lambda: nn.RMSNorm(16), lambda: ff.nn.RMSNorm(16)),
    "MultiheadAttention": (lambda: nn.MultiheadAttention(16, 2, add_bias_kv=True, kdim=8, vdim=12),
                           lambda: ff.nn.MultiheadAttention(16, 2, add_bias_kv=True, kdim=8, vdim=12)),
    "TransformerEncoderLayer": (lambda: nn.TransformerEncoderLayer(16, 2, 24, norm_first=True),
                                lambda: ff.nn.TransformerEncoderLayer(16, 2, 24, norm_first=True)),
}


@pytest.mark.parametrize("kind", list(PAIRS))
def test_state_dict_interchange(kind):
    make_torch, make_fused = PAIRS[kind]
    t, f = make_torch(), make_fused()
    assert isinstance(f, type(t))
    assert list(t.state_dict()) == list(f.state_dict())
    with torch.no_grad():
        for p in t.parameters():
            p.normal_()
    f.load_state_dict(t.state_dict())
    for (n, a), (_, b) in zip(t.state_dict().items(), f.state_dict().items()):
        assert torch.equal(a, b), n
    t2 = make_torch()
    t2.load_state_dict(f.state_dict())     # and back
    assert all(torch.equal(a, b) for a, b in zip(t2.state_dict().values(), t.state_dict().values()))


def test_backend_argument_and_use_backend():
    x = torch.randn(4, 16)
    ln = ff.nn.LayerNorm(16, backend="cuda")
    with pytest.raises(ff.BackendError, match="cuda"):
        ln(x)                                   # the argument wins ...
    auto = ff.nn.LayerNorm(16)
    with ff.use_backend("cuda"), pytest.raises(ff.BackendError, match="cuda"):
        auto(x)                                 # ... else use_backend decides at call time
    with ff.use_backend("cuda"):
        torch.testing.assert_close(ff.nn.LayerNorm(16, backend="reference")(x), F.layer_norm(x, (16,)))
    with pytest.raises(ValueError, match="unknown backend"):
        ff.nn.MultiheadAttention(16, 2, backend="gpu")
    layer = ff.nn.TransformerEncoderLayer(16, 2, 24, backend="reference")
    assert (layer.self_attn.backend, layer.norm1.backend, layer.norm2.backend) == ("reference",) * 3


def test_multihead_attention_bad_masks_raise_clear_errors():
    m = ff.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="3-D attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(3, 5, 5))
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="embed_dim"):
        m(torch.randn(2, 5, 8), x, x)


# ------------------------------------------------------------------------------------------------
# convert() / revert() on torch.nn models
# ------------------------------------------------------------------------------------------------
class MyNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2


class MyAttention(nn.MultiheadAttention):
    pass


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.cross = nn.MultiheadAttention(D_MODEL, NHEAD, batch_first=True)
        self.norm = nn.LayerNorm(D_MODEL)
        self.custom = MyNorm(D_MODEL)
        odd = nn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, batch_first=True)
        odd.self_attn = MyAttention(D_MODEL, NHEAD, batch_first=True)
        self.odd = odd

    def forward(self, x, kpm):
        h = self.encoder(x, src_key_padding_mask=kpm)
        h = self.cross(h, x, x, key_padding_mask=kpm, need_weights=False)[0]
        return self.custom(self.norm(self.odd(h, src_key_padding_mask=kpm)))


def test_convert_and_revert_torch_model():
    needs("reference", "layer_norm", "attention", "gelu_ffn")
    torch.manual_seed(0)
    model = Model().eval()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    x = torch.randn(3, 10, D_MODEL)
    kpm = _key_padding(3, 10)
    with torch.no_grad():
        want = model(x, kpm)
    assert model.encoder.use_nested_tensor

    report = ff.convert(model, backend="reference")
    assert sorted(report.converted) == ["cross", "encoder.layers.0", "encoder.layers.1", "norm", "odd.norm1",
                                        "odd.norm2"]
    skipped = dict(report.skipped)
    assert set(skipped) == {"odd", "odd.self_attn", "custom"}
    assert "MyAttention" in skipped["odd"] and "MyNorm" in skipped["custom"]
    assert type(model.odd) is nn.TransformerEncoderLayer and type(model.odd.norm2) is ff.nn.LayerNorm
    assert type(model.odd.self_attn) is MyAttention
    assert isinstance(model.encoder.layers[0], ff.nn.TransformerEncoderLayer)
    assert type(model.encoder.layers[1].self_attn) is ff.nn.MultiheadAttention
    assert model.encoder.layers[0].backend == "reference" and model.cross.backend == "reference"
    assert not model.encoder.use_nested_tensor       # the fused layers take padded batches
    assert "converted" in str(report) and "untouched" in str(report)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():
        got = model(x, kpm)
    keep = ~kpm[:, :, None].expand_as(got)          # torch's nested path leaves padded rows as 0
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)

    again = ff.convert(model, backend=None)          # converting again only updates the backend
    assert again.converted == [] and model.cross.backend is None and again.notes

    ff.revert(model)
    assert type(model.encoder.layers[0]) is nn.TransformerEncoderLayer
    assert type(model.encoder.layers[0].self_attn) is nn.MultiheadAttention
    assert type(model.norm) is nn.LayerNorm and type(model.odd.norm2) is nn.LayerNorm
    assert not hasattr(model.norm, "backend")
    assert model.encoder.use_nested_tensor
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x, kpm), want)


def test_convert_encoder_decoder_transformer(backend):
    """nn.Transformer: encoder and decoder layers convert whole (self-/cross-attention, LayerNorms and
    the GELU feed-forward fused); eval outputs and gradients match."""
    device = needs(backend, "layer_norm", "attention", "gelu_ffn", interpreter=False)
    torch.manual_seed(0)
    model = nn.Transformer(D_MODEL, NHEAD, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=FF,
                           activation="gelu", batch_first=True).eval()
    fused = copy.deepcopy(model)
    report = ff.convert(fused, backend=backend)
    assert {"encoder.layers.0", "decoder.layers.0", "encoder.norm", "decoder.norm"} <= set(report.converted)
    assert type(fused.decoder.layers[0].multihead_attn) is ff.nn.MultiheadAttention
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(2, 9, D_MODEL, generator=gen, dtype=torch.float64)
    tgt = torch.randn(2, 6, D_MODEL, generator=gen, dtype=torch.float64)
    inputs = {"src": src, "tgt": tgt, "tgt_mask": torch.ones(6, 6, dtype=torch.bool).triu(1),
              "src_key_padding_mask": _key_padding(2, 9)}

    def call(m, t):
        return m(t["src"], t["tgt"], tgt_mask=t["tgt_mask"], src_key_padding_mask=t["src_key_padding_mask"],
                 memory_key_padding_mask=t["src_key_padding_mask"], tgt_is_causal=True)
    fused_copy = copy.deepcopy(fused)
    compare_modules("gelu_ffn", model, fused_copy, call, inputs, torch.float32, device)


def test_transformers_stays_optional():
    """import fusedformer and convert a torch model without importing transformers."""
    code = ("import sys, torch, fusedformer as ff; ff.convert(torch.nn.TransformerEncoderLayer(8, 2)); "
            "print('transformers' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ff.convert(torch.randn(3))
    with pytest.raises(ValueError, match="unknown backend"):
        ff.convert(nn.LayerNorm(4), backend="tpu")


def test_integrations_import_graph_has_no_circle():
    """``integrations/``: rules (leaf) <- registry <- the families <- convert, no module importing back
    (top-level or deferred imports, read from the source)."""
    import ast
    import pathlib
    pkg = pathlib.Path(ff.__file__).parent / "integrations"
    graph = {}
    for path in pkg.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
        graph[path.stem] = {d for d in deps if (pkg / f"{d}.py").exists()}
    assert graph["rules"] == set(), graph["rules"]
    assert graph["registry"] == {"rules"}, graph["registry"]

    def visit(name, stack):
        assert name not in stack, f"import circle: {' -> '.join(stack + [name])}"
        for dep in graph[name]:
            visit(dep, stack + [name])
    for name in graph:
        visit(name, [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gelu_ffn_module_follows_linears_autocast_policy(dtype):
    """Under CPU autocast, GeluFFN casts as its two nn.Linear would (the op applies F.linear's policy:
    float32 -> bfloat16, float64 left alone), and matches the op called under the same autocast."""
    torch.manual_seed(0)
    ffn = ff.nn.GeluFFN(16, 32, backend="reference").to(dtype)
    x = torch.randn(3, 16, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_dtype = nn.Linear(16, 16).to(dtype)(x).dtype
        y = ffn(x)
        op = ff.gelu_ffn(x, ffn.linear1.weight, ffn.linear1.bias, ffn.linear2.weight, ffn.linear2.bias,
                         backend="reference")
    assert y.dtype == want_dtype == (torch.bfloat16 if dtype == torch.float32 else torch.float64)
    torch.testing.assert_close(y, op, rtol=0, atol=0)
