"""bfloat16 on the cpu backend: the GEMM strategy chosen by what the CPU can do, and autocast.

* The strategy (fusedformer.cpu_caps, csrc/common/cpu_gemm.h): the automatic choice follows the
  CPU's flags; the override really switches the kernels; the environment variable is read.
* Numerics on both paths: gelu_ffn and attention in bfloat16 against the float64 reference by the
  2x rule (outputs and every gradient), with the float32-GEMM path forced ("off") and the bf16-GEMM
  path forced ("on": on a CPU without bf16 instructions it is emulated, slowly, but it runs).
* Autocast: each op under torch.autocast("cpu", bfloat16) against torch's own functions under the
  same autocast — the same dtypes, and the 2x rule with torch's autocast result as the base — on
  both call paths; a converted nn.TransformerEncoderLayer against the original, with the dtype each
  op ran in recorded on both sides.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fusedformer as ff
from fusedformer import cpu_caps
from fusedformer.ops import _autocast, attention as attn_module, gelu_ffn as ffn_module
from fusedformer.testing import attention_inputs, check_2x, gelu_ffn_inputs

from conftest import skip_unless_available
from numerics import check_against_reference

BF16 = torch.bfloat16
MODES = ("off", "on")


@pytest.fixture(autouse=True)
def _restore_mode():
    """Every test leaves the process's bf16-GEMM override as it found it."""
    skip_unless_available(ffn_module, "cpu")
    previous = cpu_caps.bf16_gemm_mode()
    yield
    cpu_caps.set_bf16_gemm(previous)


# ------------------------------------------------------------------------------------------------
# the strategy
# ------------------------------------------------------------------------------------------------
def test_auto_follows_the_cpu_flags():
    cpu_caps.set_bf16_gemm("auto")
    caps = cpu_caps.capabilities()
    assert caps["model"] and caps["isa"]
    has = caps["avx512_bf16"] or caps["amx_bf16"]
    ffn, why_ffn = cpu_caps.bf16_gemm_path("gelu_ffn")
    attn, why_attn = cpu_caps.bf16_gemm_path("attention")
    onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    assert ffn == (has and onednn), why_ffn
    if not has:  # no instructions: float32 everywhere, and the reason says so
        assert not attn, why_attn
        for why in (why_ffn, why_attn):
            assert why.startswith("float32") and "avx512_bf16" in why, why
    else:  # the attention choice also rests on a measurement, which its reason reports
        assert "measured" in why_attn or "MKL" in why_attn, why_attn



def test_attention_tile_measurement_runs_here():
    """The measurement behind attention's automatic choice runs only where the CPU has the bf16
    instructions; here it runs on any CPU (in a child process: a crash in it, such as the Fortran
    thread-setting call once made with an int, must fail this test, not the session), gives a
    positive finite gain, and leaves torch's thread count as it was."""
    code = ("import math, torch, fusedformer._C\n"
            "n = torch.get_num_threads()\n"
            "gains = [torch.ops.fusedformer_C.cpu_bf16_attention_tile_gain() for _ in range(2)]\n"
            "assert all(math.isfinite(g) and g > 0 for g in gains), gains\n"
            "assert torch.get_num_threads() == n\n"
            "print('ok', *gains)\n")
    done = _python(code, "auto")
    assert done.returncode == 0 and done.stdout.startswith("ok"), (done.returncode, done.stderr[-2000:])

def test_override_switches_the_kernels():
    """Forced on and off give different bits for bfloat16 (a different GEMM chain) and the same bits
    for float32 (which the override does not touch)."""
    g = torch.Generator().manual_seed(3)
    x, w1, b1 = torch.randn(40, 48, generator=g), torch.randn(96, 48, generator=g) / 7, torch.randn(96, generator=g)
    w2, b2 = torch.randn(32, 96, generator=g) / 10, torch.randn(32, generator=g)
    q, k, v = (torch.randn(1, 2, 70, 32, generator=g) for _ in range(3))

    def run(dtype):
        ts = [t.to(dtype).requires_grad_() for t in (x, w1, b1, w2, b2, q, k, v)]
        y = ff.gelu_ffn(*ts[:5], backend="cpu")
        o = ff.attention(*ts[5:], is_causal=True, backend="cpu")
        up = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))  # not all ones: db2 would be exact
        grads = torch.autograd.grad(((y.float() * up).sum() + o.float().square().sum()), ts)
        return [y, o, *grads]

    results = {}
    for mode in MODES:
        with cpu_caps.bf16_gemm(mode):
            assert cpu_caps.bf16_gemm_mode() == mode
            assert cpu_caps.bf16_gemm_path("gelu_ffn")[0] == (mode == "on")
            results[mode] = (run(BF16), run(torch.float32))
    names = ["y", "out", "dx", "dw1", "db1", "dw2", "db2", "dq", "dk", "dv"]
    for name, a, b in zip(names, results["off"][0], results["on"][0]):
        if name == "db2":  # the column sums of dy: no GEMM, the same on both paths
            assert torch.equal(a, b)
            continue
        assert not torch.equal(a, b), f"bfloat16 {name} is the same on both paths: the override did nothing"
    for i, (a, b) in enumerate(zip(results["off"][1], results["on"][1])):
        assert torch.equal(a, b), f"float32 result {i} changed with the bf16-GEMM override"


def test_bad_mode():
    with pytest.raises(ValueError, match="auto, on, off|one of"):
        cpu_caps.set_bf16_gemm("fast")


def _python(code: str, env_value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FUSEDFORMER_CPU_BF16_GEMM=env_value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_environment_variable():
    """FUSEDFORMER_CPU_BF16_GEMM=on forces the bf16 path and is named as the reason; a bad value is
    an error that names the variable."""
    code = ("from fusedformer import cpu_caps\n"
            "print(cpu_caps.bf16_gemm_mode(), *cpu_caps.bf16_gemm_path('gelu_ffn'), sep='|')\n")
    done = _python(code, "on")
    assert done.returncode == 0, done.stderr
    mode, enabled, why = done.stdout.strip().split("|")
    assert (mode, enabled) == ("on", "True") and "FUSEDFORMER_CPU_BF16_GEMM=on" in why, done.stdout
    bad = _python(code, "sometimes")
    assert bad.returncode != 0 and "FUSEDFORMER_CPU_BF16_GEMM" in bad.stderr and "sometimes" in bad.stderr
    # set_bf16_gemm replaces a bad value instead of failing on it
    fixed = _python("from fusedformer import cpu_caps\ncpu_caps.set_bf16_gemm('off')\n" + code.split("\n", 1)[1],
                    "sometimes")
    assert fixed.returncode == 0 and fixed.stdout.startswith("off|False|"), fixed.stderr + fixed.stdout


def test_info_names_the_paths():
    from fusedformer.info import report as info_report
    report = info_report()
    assert "avx512_bf16" in report and "amx_bf16" in report
    assert report.count("low precision:") == 3, report  # one line per op on the cpu backend


# ------------------------------------------------------------------------------------------------
# numerics on both paths (the 2x rule against the float64 reference)
# ------------------------------------------------------------------------------------------------
def _ffn_inputs(lead, C, F_, C2, *, biases=True, seed=0, noncontig=False):
    t = gelu_ffn_inputs(torch.Generator().manual_seed(seed), lead, C, F_, C2, x_scale=2.0, biases=biases)
    if noncontig:
        t["x"] = t["x"].transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def _ffn_fn(approximate, dropout_p=0.0, seed=None, offset=0):
    def fn(t, backend):
        return ff.gelu_ffn(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], approximate, dropout_p, seed=seed,
                           offset=offset, backend=backend)
    return fn


# (leading dims, C, F, C2, biases, approximate, dropout_p)
FFN_CASES = [
    ((1,), 16, 64, 16, True, "none", 0.0),          # one row
    ((7,), 33, 130, 33, True, "tanh", 0.0),         # odd widths
    ((3, 43), 64, 256, 48, False, "none", 0.0),     # batch dims, no biases, C2 != C
    ((5, 61), 48, 200, 40, True, "tanh", 0.15),     # dropout
    ((37,), 384, 1536, 384, True, "none", 0.0),     # a BERT-small width
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", FFN_CASES, ids=lambda c: "x".join(map(str, c[0] + c[1:4])) + f"-{c[5]}-p{c[6]}")
def test_gelu_ffn_both_paths(mode, case):
    lead, C, F_, C2, biases, approximate, p = case
    cpu_caps.set_bf16_gemm(mode)
    assert cpu_caps.bf16_gemm_path("gelu_ffn")[0] == (mode == "on")
    inputs = _ffn_inputs(lead, C, F_, C2, biases=biases, seed=C + F_, noncontig=len(lead) == 2)
    grads = ("x", "w1", "b1", "w2", "b2") if biases else ("x", "w1", "w2")
    check_against_reference("gelu_ffn", _ffn_fn(approximate, p, seed=2**33 + 7 if p else None, offset=5),
                            inputs, "cpu", BF16, torch.device("cpu"), grads)


def test_gelu_ffn_bf16_row_blocks():
    """The bf16 path's row blocks (2048 rows at F = 8192; 2100 rows make a full and a ragged one),
    weight gradients accumulated over blocks. (The float32 path's blocks: tests/test_gelu_ffn.py.)"""
    cpu_caps.set_bf16_gemm("on")
    inputs = _ffn_inputs((2100,), 8, 8192, 12, seed=8)
    check_against_reference("gelu_ffn", _ffn_fn("tanh", 0.1, seed=5), inputs, "cpu", BF16, torch.device("cpu"),
                            ("x", "w1", "b1", "w2", "b2"))


def _attn_inputs(B, H, Hk, Sq, Sk, D, Dv, *, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    return attention_inputs(g, B, H, Hk, Sq, Sk, D, Dv, transposed=transposed), g


def _attn_fn(*, is_causal=False, key_padding_mask=None, dropout_p=0.0, seed=None):
    def fn(t, backend):
        gqa = t["q"].shape[1] != t["k"].shape[1]
        out, lse = ff.attention(t["q"], t["k"], t["v"], t.get("attn_mask"), dropout_p, is_causal, enable_gqa=gqa,
                                key_padding_mask=key_padding_mask, seed=seed, offset=11, return_lse=True,
                                backend=backend)
        return out, lse.detach()
    return fn


# (B, H, Hk, Sq, Sk, D, Dv, transposed, causal, extra)
ATTN_CASES = [
    (1, 1, 1, 1, 1, 16, 16, False, False, None),           # one query, one key
    (2, 3, 3, 7, 7, 40, 40, True, True, None),             # (B, S, H, D) transposed, causal
    (2, 4, 2, 127, 65, 80, 80, False, False, "mask"),      # GQA, additive float mask, Sq > Sk
    (1, 4, 1, 33, 130, 64, 48, True, True, "padding"),     # MQA, Dv != D, key padding, causal Sq < Sk
    (1, 2, 2, 300, 600, 64, 64, False, False, "dropout"),  # several key tiles, dropout
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "x".join(map(str, c[:7])) + ("-T" if c[7] else "")
                         + ("-causal" if c[8] else "") + (f"-{c[9]}" if c[9] else ""))
def test_attention_both_paths(mode, case):
    B, H, Hk, Sq, Sk, D, Dv, transposed, causal, extra = case
    cpu_caps.set_bf16_gemm(mode)
    inputs, g = _attn_inputs(B, H, Hk, Sq, Sk, D, Dv, transposed=transposed, seed=Sq + Sk)
    kpm, p = None, 0.0
    if extra == "mask":
        inputs["attn_mask"] = torch.randn(B, 1, Sq, Sk, generator=g, dtype=torch.float64)
    elif extra == "padding":
        kpm = torch.zeros(B, Sk, dtype=torch.bool)
        kpm[:, Sk // 2:] = True
    elif extra == "dropout":
        p = 0.2
    check_against_reference("attention", _attn_fn(is_causal=causal, key_padding_mask=kpm, dropout_p=p,
                                                  seed=99 if p else None),
                            inputs, "cpu", BF16, torch.device("cpu"), ("q", "k", "v"))


# ------------------------------------------------------------------------------------------------
# autocast
# ------------------------------------------------------------------------------------------------
class _Recorder(TorchDispatchMode):
    """Records (op name, dtypes of its tensor arguments) of every op dispatched while active. Being
    a dispatch mode, it also sends the fused ops down their custom-op (traced) call path."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
        self.calls.append((str(func), dtypes))
        return func(*args, **(kwargs or {}))

    def dtypes_of(self, *names) -> set:
        return {d[0] for f, d in self.calls if any(n in f for n in names) and d}


def _run(fn, tensors, *, autocast, record=False):
    """fn(*tensors) and the gradients of its tensors, optionally under autocast and the recorder."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    rec = _Recorder()
    with torch.autocast("cpu", dtype=BF16, enabled=autocast), (rec if record else _nullcontext()):
        out = fn(*leaves)
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        grads = torch.autograd.grad((out * up.to(out.dtype)).sum(), leaves)
    return out, list(grads), rec


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _compare_with_torch(op, ours, theirs, tensors, *, record, rule_dtype=BF16):
    """ours / theirs under bf16 autocast: same dtypes; ours within 2x of torch's autocast error
    (float64, no autocast, as the truth), with the tolerances of ``rule_dtype`` (the precision the
    computation ran in: float32 gradients of float32 weights that went through bf16 GEMMs carry
    bfloat16 errors)."""
    out, grads, rec = _run(ours, tensors, autocast=True, record=record)
    base, base_grads, _ = _run(theirs, tensors, autocast=True)
    ref, ref_grads, _ = _run(theirs, [t.double() for t in tensors], autocast=False)
    assert out.dtype == base.dtype, f"output {out.dtype}, torch gives {base.dtype}"
    for i, (g, b) in enumerate(zip(grads, base_grads)):
        assert g.dtype == b.dtype, f"gradient {i}: {g.dtype}, torch gives {b.dtype}"
    for name, o, r, b in [("out", out, ref, base)] + [(f"grad {i}", g, r, b) for i, (g, r, b) in
                                                       enumerate(zip(grads, ref_grads, base_grads))]:
        failure, _, _ = check_2x(name, op, o, r, b, dtype=rule_dtype)
        assert failure is None, failure
    return rec


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_autocast_gelu_ffn(mode, path):
    cpu_caps.set_bf16_gemm(mode)
    g = torch.Generator().manual_seed(1)
    x, w1, b1 = torch.randn(3, 29, 64, generator=g), torch.randn(256, 64, generator=g) / 8, torch.randn(256, generator=g)
    w2, b2 = torch.randn(48, 256, generator=g) / 16, torch.randn(48, generator=g)

    def ours(x, w1, b1, w2, b2):
        return ff.gelu_ffn(x, w1, b1, w2, b2, "tanh", backend="cpu")

    def theirs(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)

    rec = _compare_with_torch("gelu_ffn", ours, theirs, [x, w1, b1, w2, b2], record=path == "custom_op")
    if path == "custom_op":
        assert rec.dtypes_of("fusedformer.gelu_ffn_fwd") == {BF16}, rec.calls


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_autocast_attention(mode, path):
    cpu_caps.set_bf16_gemm(mode)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 45, 32, generator=g) for _ in range(3))
    mask = torch.randn(2, 1, 45, 45, generator=g)  # float32: autocast casts it, as it does for SDPA

    def ours(q, k, v):
        return ff.attention(q, k, v, attn_mask=mask, backend="cpu")

    def theirs(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype) if q.dtype == torch.float64 else mask)

    rec = _compare_with_torch("attention", ours, theirs, [q, k, v], record=path == "custom_op")
    if path == "custom_op":
        assert rec.dtypes_of("fusedformer.attention_fwd") == {BF16}, rec.calls


@pytest.mark.parametrize("input_dtype", [torch.float32, BF16], ids=str)
@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_autocast_layer_norm(input_dtype, path):
    """torch's CPU autocast leaves layer_norm alone: a float32 input stays float32, a bfloat16 one
    (from a linear) stays bfloat16 beside float32 weights. Ours does the same."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 17, 96, generator=g) * 3 + 1).to(input_dtype)
    w, b = torch.rand(96, generator=g) + 0.5, torch.randn(96, generator=g)

    def ours(x, w, b):
        return ff.layer_norm(x, 96, w, b, backend="cpu")

    def theirs(x, w, b):
        return F.layer_norm(x, (96,), w.to(x.dtype) if x.dtype == torch.float64 else w,
                            b.to(x.dtype) if x.dtype == torch.float64 else b)

    rec = _compare_with_torch("layer_norm", ours, theirs, [x, w, b], record=path == "custom_op", rule_dtype=input_dtype)
    if path == "custom_op":
        assert rec.dtypes_of("fusedformer.layer_norm_fwd") == {input_dtype}, rec.calls


def test_autocast_float32_policy_casts(monkeypatch):
    """Where torch's policy has layer_norm in its float32 list (CUDA), ours casts to float32: the
    mechanism, checked on the CPU by giving it that policy here."""
    monkeypatch.setitem(_autocast._POLICY, (_autocast.LAYER_NORM, "cpu"), True)
    x = torch.randn(5, 32).to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        y = ff.layer_norm(x, 32, torch.ones(32, dtype=BF16), None, backend="cpu")
    assert y.dtype == torch.float32
    monkeypatch.setitem(_autocast._POLICY, (_autocast.LINEAR, "cpu"), False)
    with torch.autocast("cpu", dtype=BF16):  # and without a policy nothing is cast
        y = ff.gelu_ffn(torch.randn(4, 8), torch.randn(16, 8), None, torch.randn(8, 16), None, backend="cpu")
    assert y.dtype == torch.float32


def test_no_autocast_no_cast():
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        y = ff.gelu_ffn(torch.randn(4, 8), torch.randn(16, 8), None, torch.randn(8, 16), None, backend="cpu")
    assert y.dtype == torch.float32
    with torch.autocast("cpu", dtype=BF16):  # float64 is never cast, as in torch
        y = ff.gelu_ffn(torch.randn(4, 8).double(), torch.randn(16, 8).double(), None, torch.randn(8, 16).double(),
                        None, backend="reference")
    assert y.dtype == torch.float64


@pytest.mark.parametrize("mode", MODES)
def test_autocast_converted_encoder_layer(mode):
    """A converted nn.TransformerEncoderLayer (post-LN, GELU, batch_first) under bf16 autocast
    against the original: output and parameter-gradient dtypes, values by the 2x rule (torch's
    autocast result as the base), and which dtype each op ran in — linear / SDPA in bfloat16,
    layer_norm in float32 (the residual sum is float32) on both sides."""
    cpu_caps.set_bf16_gemm(mode)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, activation="gelu", batch_first=True)
    fused = _copy(layer)
    ff.convert(fused, backend="cpu")
    assert type(fused) is not type(layer), "the layer was not converted"
    x = torch.randn(2, 37, 64)

    def run(module, dtype, autocast, record):
        m = _copy(module).to(dtype)
        xi = x.to(dtype).requires_grad_()
        rec = _Recorder()
        with torch.autocast("cpu", dtype=BF16, enabled=autocast), (rec if record else _nullcontext()):
            out = m(xi)
            up = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            grads = torch.autograd.grad((out * up.to(out.dtype)).sum(), [xi, *m.parameters()])
        return out, grads, rec

    out, grads, rec = run(fused, torch.float32, True, False)
    base, base_grads, torch_rec = run(layer, torch.float32, True, True)
    ref, ref_grads, _ = run(layer, torch.float64, False, False)
    assert out.dtype == base.dtype == torch.float32
    for i, (o, b, r) in enumerate(zip([out, *grads], [base, *base_grads], [ref, *ref_grads])):
        assert o.dtype == b.dtype, f"result {i}: {o.dtype} vs torch's {b.dtype}"
        failure, _, _ = check_2x(f"result {i}", "train", o, r, b, dtype=BF16)
        assert failure is None, failure

    _, _, fused_rec = run(fused, torch.float32, True, True)  # the custom-op path, recorded
    assert torch_rec.dtypes_of("aten.addmm", "aten.mm") == {BF16}
    assert torch_rec.dtypes_of("scaled_dot_product") == {BF16}
    assert torch_rec.dtypes_of("native_layer_norm.default") == {torch.float32}
    assert fused_rec.dtypes_of("fusedformer.attention_fwd") == {BF16}, fused_rec.calls
    assert fused_rec.dtypes_of("fusedformer.gelu_ffn_fwd") == {BF16}, fused_rec.calls
    assert fused_rec.dtypes_of("fusedformer.layer_norm_fwd") == {torch.float32}, fused_rec.calls
    assert fused_rec.dtypes_of("aten.addmm", "aten.mm") <= {BF16}  # the projections


def _copy(module):
    import copy
    return copy.deepcopy(module)
