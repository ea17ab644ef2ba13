"""fusedformer.attention_varlen: packed variable-length sequences (cu_seqlens).

* the reference agrees with padded ``fusedformer.attention`` + key_padding_mask (outputs, lse and
  gradients, float64), causal and not, Sq_i == Sk_i and not, GQA;
* its dropout follows the documented mapping, checked against an independent float64 computation;
* the Triton kernels pass the 2x rule against the float64 reference (interpreter-sized shapes),
  with the same dropout mask bit for bit;
* bad input raises TypeError/ValueError naming the argument; the head-dim limit is a backend reason.
"""
import math

import pytest
import torch

import fusedformer as ff
from fusedformer import rng
from fusedformer.ops import attention_varlen as op_module

from conftest import skip_unless_available
from numerics import check_against_reference


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)


def _packed(lens_q, lens_k, H, Hk, D, Dv, seed, dtype=torch.float64):
    g = _gen(seed)
    q = torch.randn(sum(lens_q), H, D, generator=g, dtype=dtype)
    k = torch.randn(sum(lens_k), Hk, D, generator=g, dtype=dtype)
    v = torch.randn(sum(lens_k), Hk, Dv, generator=g, dtype=dtype)
    return q, k, v


def _pad(t, lens, S):
    """Packed (T, H, D) -> padded (B, H, S, D) (zeros past each sequence)."""
    out = t.new_zeros(len(lens), t.shape[1], S, t.shape[2])
    start = 0
    for i, n in enumerate(lens):
        out[i, :, :n] = t[start:start + n].transpose(0, 1)
        start += n
    return out


def _unpad(t, lens):
    """Padded (B, H, S, ...) -> packed (T, H, ...)."""
    return torch.cat([t[i, :, :n].transpose(0, 1) for i, n in enumerate(lens)], dim=0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens_q,lens_k", [([5, 1, 9, 3], [5, 1, 9, 3]), ([4, 7, 2], [6, 3, 8])],
                         ids=["self", "cross"])
def test_reference_matches_padded_attention_with_key_padding(causal, lens_q, lens_k):
    H, Hk, D, Dv = 4, 2, 8, 6
    q, k, v = _packed(lens_q, lens_k, H, Hk, D, Dv, seed=1)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    Sq, Sk = max(lens_q), max(lens_k)
    out, lse = ff.attention_varlen(q, k, v, _cu(lens_q), _cu(lens_k), Sq, Sk, is_causal=causal, return_lse=True,
                                   backend="reference")
    qp, kp, vp = (_pad(t.detach(), n, S).requires_grad_(True)
                  for t, n, S in ((q, lens_q, Sq), (k, lens_k, Sk), (v, lens_k, Sk)))
    pad = torch.arange(Sk)[None, :] >= torch.tensor(lens_k)[:, None]
    outp, lsep = ff.attention(qp, kp, vp, is_causal=causal, enable_gqa=True, key_padding_mask=pad, return_lse=True,
                              backend="reference")
    torch.testing.assert_close(out, _unpad(outp, lens_q))
    torch.testing.assert_close(lse, _unpad(lsep[..., None], lens_q)[..., 0].t())
    g = torch.randn(out.shape, generator=_gen(2), dtype=torch.float64)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    gp = _pad(g, lens_q, Sq)
    valid_q = torch.arange(Sq)[None, :] < torch.tensor(lens_q)[:, None]
    grads_p = torch.autograd.grad((outp * gp * valid_q[:, None, :, None]).sum(), (qp, kp, vp))
    for a, b, n in zip(grads, grads_p, (lens_q, lens_k, lens_k)):
        torch.testing.assert_close(a, _unpad(b, n))


def test_reference_dropout_follows_the_documented_mapping():
    """Element (i, h, q, k) draws index base_i + (h * Sq_i + q) * Sk_i + k, base_i = sum_{j<i} H Sq_j Sk_j."""
    lens_q, lens_k, H, Hk, D = [3, 5, 2], [4, 1, 6], 2, 1, 8
    p, seed, offset = 0.3, 31337, 13
    q, k, v = _packed(lens_q, lens_k, H, Hk, D, D, seed=3)
    out = ff.attention_varlen(q, k, v, _cu(lens_q), _cu(lens_k), 5, 6, dropout_p=p, seed=seed, offset=offset,
                              backend="reference")
    sizes = [H * a * b for a, b in zip(lens_q, lens_k)]
    keep = rng.keep_mask((sum(sizes),), p, seed, offset).split(sizes)
    q0 = k0 = 0
    for i, (a, b) in enumerate(zip(lens_q, lens_k)):
        qi = q[q0:q0 + a].transpose(0, 1)                       # (H, a, D)
        ki = k[k0:k0 + b].transpose(0, 1).expand(H, b, D)
        vi = v[k0:k0 + b].transpose(0, 1).expand(H, b, D)
        probs = torch.softmax(qi @ ki.transpose(-1, -2) / math.sqrt(D), dim=-1)
        expected = (probs * keep[i].reshape(H, a, b) / (1 - p)) @ vi
        torch.testing.assert_close(out[q0:q0 + a], expected.transpose(0, 1))
        q0, k0 = q0 + a, k0 + b


# ------------------------------------------------------------------------------------------------
# the Triton kernels
# ------------------------------------------------------------------------------------------------
TRITON_CASES = [
    # id,                lens_q,             lens_k,            H, Hk, D,  Dv, dtype,          causal, p,   packed qkv
    ("gqa-empty-seq",    [5, 1, 17, 0, 9],   [5, 1, 17, 0, 9],  4, 2, 40, 40, torch.float32, False, 0.0, False),
    ("cross-dropout",    [7, 20],            [12, 9],           2, 1, 64, 32, torch.bfloat16, True, 0.2, False),
    ("qkv-view-causal",  [18, 3, 11],        [18, 3, 11],       2, 2, 32, 32, torch.float16, True, 0.0, True),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_matches_reference(case):
    device = skip_unless_available(op_module, "triton")
    _, lens_q, lens_k, H, Hk, D, Dv, dtype, causal, p, packed_qkv = case
    if packed_qkv:   # q, k, v as strided views of one (T, 3, H, D) projection output
        qkv = torch.randn(sum(lens_q), 3, H, D, generator=_gen(4), dtype=torch.float64)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    else:
        q, k, v = _packed(lens_q, lens_k, H, Hk, D, Dv, seed=5)
    inputs = {"q": q, "k": k, "v": v, "cu_q": _cu(lens_q), "cu_k": _cu(lens_k)}

    def fn(t, backend):
        return ff.attention_varlen(t["q"], t["k"], t["v"], t["cu_q"].to(t["q"].device), t["cu_k"].to(t["q"].device),
                                   max(lens_q), max(lens_k), dropout_p=p, is_causal=causal, seed=2718, offset=4,
                                   return_lse=True, backend=backend)
    check_against_reference("attention", fn, inputs, "triton", dtype, device, ["q", "k", "v"])


def test_triton_tma_path(tma_descriptors):
    """The forward with K/V streamed through 3-D tensor descriptors over the packed tensors (the
    Hopper path, opt-in): tiles that run past a sequence read the next one's keys and must mask them."""
    test_triton_matches_reference(TRITON_CASES[1])
    test_triton_matches_reference(TRITON_CASES[2])
    assert tma_descriptors and all(d is not None for d in tma_descriptors), "the TMA path was not taken"


def test_triton_dropout_mask_is_the_reference_mask():
    """V = a per-sequence identity makes the output rows P * Z: zero exactly where the mask drops."""
    device = skip_unless_available(op_module, "triton")
    lens_q, lens_k, H, p, seed, offset = [6, 11, 3], [9, 4, 16], 2, 0.4, 99, 1
    Dv = max(lens_k)
    q, k, _ = _packed(lens_q, lens_k, H, H, 16, 16, seed=6, dtype=torch.float32)
    v = torch.zeros(sum(lens_k), H, Dv)
    k0 = 0
    for n in lens_k:
        v[k0 + torch.arange(n), :, torch.arange(n)] = 1.0
        k0 += n
    out = ff.attention_varlen(q.to(device), k.to(device), v.to(device), _cu(lens_q, device), _cu(lens_k, device),
                              max(lens_q), Dv, dropout_p=p, seed=seed, offset=offset, backend="triton").cpu()
    sizes = [H * a * b for a, b in zip(lens_q, lens_k)]
    keep = rng.keep_mask((sum(sizes),), p, seed, offset).split(sizes)
    q0 = 0
    for i, (a, b) in enumerate(zip(lens_q, lens_k)):
        rows = out[q0:q0 + a].transpose(0, 1)                   # (H, a, Dv)
        assert torch.equal(rows[..., :b] != 0, keep[i].reshape(H, a, b)), f"sequence {i}: mask differs"
        assert not rows[..., b:].any()
        q0 += a


# ------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------
def _args(**over):
    q, k, v = _packed([3, 4], [3, 4], 2, 1, 8, 8, seed=7, dtype=torch.float32)
    a = dict(q=q, k=k, v=v, cu_seqlens_q=_cu([3, 4]), cu_seqlens_k=_cu([3, 4]), max_seqlen_q=4, max_seqlen_k=4)
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,needle", [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 7])), TypeError, "cu_seqlens_q must be an int32"),
    (dict(max_seqlen_k=3), ValueError, "max_seqlen_k = 3 is shorter"),
    (dict(cu_seqlens_k=_cu([3, 2, 2])), ValueError, "same number of sequences"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32)), ValueError, "never decrease"),
    (dict(q=torch.randn(7, 3, 8), k=torch.randn(7, 2, 8), v=torch.randn(7, 2, 8)), ValueError,
     "multiple of key/value heads"),
    (dict(max_seqlen_q=4.0), TypeError, "max_seqlen_q must be an int"),
    (dict(v=torch.randn(7, 1, 8, dtype=torch.float64)), TypeError, "v has dtype"),
])
def test_bad_input_names_the_argument(over, exc, needle):
    with pytest.raises(exc, match=needle):
        ff.attention_varlen(**_args(**over), backend="reference")


def test_head_dim_limit_is_a_triton_reason():
    skip_unless_available(op_module, "triton")
    q = torch.randn(7, 1, 300)
    with pytest.raises(ff.BackendError, match="head dim 300 > 256"):
        ff.attention_varlen(q, q, q, _cu([3, 4]), _cu([3, 4]), 4, 4, backend="triton")


def test_traces_with_torch_compile_without_graph_breaks():
    """The custom ops' fake implementations let torch.compile trace forward and backward whole."""
    q, k, v = _packed([4, 6], [5, 7], 2, 1, 8, 8, seed=8, dtype=torch.float32)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    cu_q, cu_k = _cu([4, 6]), _cu([5, 7])

    def f(q, k, v):
        return ff.attention_varlen(q, k, v, cu_q, cu_k, 6, 7, dropout_p=0.1, is_causal=True, seed=3,
                                   backend="reference")
    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    expected = f(q, k, v)
    torch.testing.assert_close(out, expected)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))):
        torch.testing.assert_close(a, b)
