"""The backends' declared limits (fusedformer/ops/limits.py) agree with what the kernels really take.

* cpu: for a grid of dtypes and awkward sizes, the op with ``backend="cpu"`` refuses an input
  (BackendError, from the declared limits) exactly when ``torch.ops.fusedformer_C`` called directly
  on the same tensors refuses it — forward and backward — so neither side can drift.
* cuda (no GPU needed): the declared cuda limits against ``fusedformer_C::<op>_cuda_limits``, which
  runs the very C++ checks the cuda entry points call (``check_cuda_problem``, ``check_cuda_limits``)
  on sizes and dtype alone, at and across every boundary.
* every size a declaration bounds is a key of the inputs the op really dispatches on (a misspelt
  key would silently never apply), and the Triton launchers check the same declaration.
"""
import itertools

import pytest
import torch

import fusedformer as ff
from fusedformer import backends
from fusedformer.ops import attention as attention_op
from fusedformer.ops import attention_varlen as varlen_op
from fusedformer.ops import gelu_ffn as gelu_ffn_op
from fusedformer.ops import layer_norm as layer_norm_op
from fusedformer.ops import limits

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NATIVE_ERRORS = (RuntimeError, TypeError, ValueError)


def _native(op: str):
    return getattr(torch.ops.fusedformer_C, op)


def _cpu_or_skip(op):
    why = backends.why_unavailable(op, "cpu")
    if why:
        pytest.skip("cpu: " + "; ".join(why))


def _outcome(fn):
    """None when ``fn()`` (a direct call of fusedformer._C) runs, else the error's first line."""
    try:
        fn()
        return None
    except NATIVE_ERRORS as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"


def _python_outcome(fn):
    """None when dispatch lets ``fn()`` (an op with ``backend="cpu"``, forward and backward) run, else
    the reasons it refused the backend with. Any other error propagates: an input the Python side
    let through that the kernel then refused is a disagreement too."""
    try:
        fn()
        return None
    except ff.BackendError as exc:
        return str(exc).replace("\n", " ")


def _requiring_grad(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _agree(case, python_error, native_error):
    assert (python_error is None) == (native_error is None), (
        f"{case}: the Python side {'accepts' if python_error is None else 'refuses'} "
        f"({python_error}) but fusedformer._C {'accepts' if native_error is None else 'refuses'} ({native_error})")


# ------------------------------------------------------------------------------------------------
# cpu: the declared limits against the kernels themselves
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_attention_limits_agree_with_C(dtype):
    _cpu_or_skip("attention")
    fwd, bwd = _native("attention_fwd"), _native("attention_bwd")
    for D, Dv, Sq, Sk in itertools.product((1, 7, 8, 300), (5, 264), (1, 9), (3,)):
        q = torch.randn(1, 2, Sq, D, dtype=dtype)
        k = torch.randn(1, 2, Sk, D, dtype=dtype)
        v = torch.randn(1, 2, Sk, Dv, dtype=dtype)
        case = f"attention cpu {dtype} D={D} Dv={Dv} Sq={Sq} Sk={Sk}"
        python = _python_outcome(lambda: ff.attention(*_requiring_grad(q, k, v), backend="cpu").sum().backward())

        def native():
            out, lse = fwd(q, k, v, None, None, 0.0, False, D ** -0.5, None, 0)
            bwd(torch.randn_like(out), q, k, v, out, lse, None, None, 0.0, False, D ** -0.5, None, 0)
        _agree(case, python, _outcome(native))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_layer_norm_limits_agree_with_C(dtype):
    _cpu_or_skip("layer_norm")
    fwd, bwd = _native("layer_norm_fwd"), _native("layer_norm_bwd")
    for N, wdtype, rms in itertools.product((1, 7, 4099), (dtype, torch.float32), (False, True)):
        x = torch.randn(3, N, dtype=dtype)
        w = torch.randn(N, dtype=wdtype)
        b = None if rms else torch.randn(N, dtype=wdtype)
        case = f"layer_norm cpu {dtype} N={N} weight {wdtype} rms={rms}"
        norm = ff.rms_norm if rms else ff.layer_norm
        xg, wg, *bg = _requiring_grad(x, w, *([] if rms else [b]))
        python = _python_outcome(lambda: norm(xg, N, wg, *bg, backend="cpu").sum().backward())

        def native():
            y, h, mean, rstd = fwd(x, None, w, b, 1e-5, 0.0, None, 0, rms)
            bwd(torch.randn_like(y), None, x, w, mean, rstd, 0.0, None, 0, rms, b is not None)
        _agree(case, python, _outcome(native))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_gelu_ffn_limits_agree_with_C(dtype):
    _cpu_or_skip("gelu_ffn")
    fwd, bwd = _native("gelu_ffn_fwd"), _native("gelu_ffn_bwd")
    for C, F, C2 in itertools.product((1, 7, 16), (5, 8), (3, 24)):
        x = torch.randn(4, C, dtype=dtype)
        w1, b1 = torch.randn(F, C, dtype=dtype), torch.randn(F, dtype=dtype)
        w2, b2 = torch.randn(C2, F, dtype=dtype), torch.randn(C2, dtype=dtype)
        case = f"gelu_ffn cpu {dtype} C={C} F={F} C2={C2}"
        python = _python_outcome(lambda: ff.gelu_ffn(*_requiring_grad(x, w1, b1, w2, b2), backend="cpu")
                                 .sum().backward())

        def native():
            y, pre = fwd(x, w1, b1, w2, b2, "none", 0.0, None, 0)
            bwd(torch.randn_like(y), x, w1, w2, pre, "none", 0.0, None, 0, True, True)
        _agree(case, python, _outcome(native))


# ------------------------------------------------------------------------------------------------
# cuda: the declared limits against the C++ checks the cuda entry points call
# ------------------------------------------------------------------------------------------------
def _native_library_or_skip():
    why = backends.why_unavailable("attention", "cpu")   # _C not built at all
    if why:
        pytest.skip("fusedformer._C: " + "; ".join(why))


SEQ_MAX = limits.ATTENTION["cuda"].size("seqlen_q").max


def test_cuda_attention_limits_agree_with_C():
    _native_library_or_skip()
    declared = limits.ATTENTION["cuda"]
    check = _native("attention_cuda_limits")
    heads = (1, 8, 12, 64, 128, 248, 256, 264, 300, 512)
    seqs = (1, 4097, 65535 * 32, 65535 * 32 + 1, 10**8)
    for dtype, D, Dv, Sq, Sk in itertools.product(DTYPES, heads, heads, seqs, seqs):   # 10^4 cases
        inputs = {"dtype": dtype, "head_dim": D, "head_dim_v": Dv, "seqlen_q": Sq, "seqlen_k": Sk}
        python = "; ".join(declared.input_reasons(inputs)) or None
        _agree(f"attention cuda {inputs}", python, _outcome(lambda: check(dtype, D, Dv, Sq, Sk)))
    assert SEQ_MAX == 65535 * 32, "the grid above crosses the declared sequence bound"


def test_cuda_gelu_ffn_limits_agree_with_C():
    _native_library_or_skip()
    declared = limits.GELU_FFN["cuda"]
    check = _native("gelu_ffn_cuda_limits")
    widths = (1, 7, 8, 12, 1024, 1500, 2**31 - 8, 2**31, 2**31 + 8)
    for dtype, C, F, C2 in itertools.product(DTYPES, widths, widths, widths):
        inputs = {"dtype": dtype, "C": C, "F": F, "C2": C2}
        python = "; ".join(declared.input_reasons(inputs)) or None
        _agree(f"gelu_ffn cuda {inputs}", python, _outcome(lambda: check(dtype, C, F, C2)))


def test_declared_limits_can_disagree():
    """The agreement checks above can fail: a declaration that drifted from the C++ is caught."""
    _native_library_or_skip()
    drifted = limits.Limits("cuda", ("cuda",), limits.HALF_DTYPES, "",
                            (limits.Size("head_dim", "head dim", max=512, multiple_of=8),))
    inputs = {"dtype": torch.float16, "head_dim": 264}
    python = "; ".join(drifted.input_reasons(inputs)) or None
    with pytest.raises(AssertionError, match="the Python side accepts"):
        _agree("drifted", python, _outcome(lambda: _native("attention_cuda_limits")(torch.float16, 264, 64, 1, 1)))


# ------------------------------------------------------------------------------------------------
# the declarations are wired to what the ops dispatch on and to the launchers
# ------------------------------------------------------------------------------------------------
def _dispatched_inputs(monkeypatch, call) -> dict:
    seen = {}
    real = backends.resolve

    def spy(op, table, backend, inputs, device):
        seen.update(inputs)
        return real(op, table, backend, inputs, device)
    monkeypatch.setattr(backends, "resolve", spy)
    call()
    return seen


@pytest.mark.parametrize("op_module, call", [
    (attention_op, lambda: ff.attention(*(torch.randn(1, 2, 3, 8) for _ in range(3)), backend="reference")),
    (varlen_op, lambda: ff.attention_varlen(torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8),
                                            torch.tensor([0, 2, 5], dtype=torch.int32),
                                            torch.tensor([0, 2, 5], dtype=torch.int32), 3, 3,
                                            backend="reference")),
    (layer_norm_op, lambda: ff.layer_norm(torch.randn(2, 8), 8, backend="reference")),
    (gelu_ffn_op, lambda: ff.gelu_ffn(torch.randn(2, 8), torch.randn(16, 8), None, torch.randn(8, 16), None,
                                      backend="reference")),
], ids=lambda v: getattr(v, "OP", ""))
def test_every_declared_size_is_dispatched_on(op_module, call, monkeypatch):
    inputs = _dispatched_inputs(monkeypatch, call)
    assert "dtype" in inputs and "device" in inputs
    for backend, declared in limits.BY_OP[op_module.OP].items():
        for size in declared.sizes:
            assert size.key in inputs, f"{op_module.OP}/{backend}: declared size {size.key!r} is not dispatched on"


def test_reasons_come_from_the_declarations():
    cpu = torch.device("cpu")
    inputs = {"device": cpu, "dtype": torch.float32, "head_dim": 300, "head_dim_v": 12,
              "seqlen_q": 65535 * 32 + 1, "seqlen_k": 4}
    why = attention_op.TABLE["cuda"].reasons(inputs)
    for reason in limits.ATTENTION["cuda"].input_reasons(inputs):
        assert reason in why
    assert "head dim 300 > 256" in why and "value head dim 12 is not a multiple of 8 (16-byte copies)" in why
    assert any("query length 2097121 > 2097120" in r for r in why)
    assert not layer_norm_op.TABLE["cpu"].reasons({"device": cpu, "dtype": torch.bfloat16, "N": 10**6})


def test_triton_launcher_checks_the_declaration():
    pytest.importorskip("triton")
    from fusedformer.kernels import attention as kernels
    declared = limits.ATTENTION["triton"]
    for D, Dv in itertools.product((1, 8, 255, 256, 257, 300), (1, 256, 512)):
        python = "; ".join(declared.input_reasons({"head_dim": D, "head_dim_v": Dv})) or None
        launcher = _outcome(lambda: kernels._check_head_dims(D, Dv))
        _agree(f"triton attention D={D} Dv={Dv}", python, launcher)


def test_availability_helper():
    assert backends.why_unavailable("attention", "reference") == []
    assert backends.is_available(attention_op, "reference", "cpu")
    assert backends.why_unavailable("attention_varlen", "cpu") == ["attention_varlen has no cpu implementation yet"]
    assert any("cuda" in r for r in backends.why_unavailable("gelu_ffn", "cuda", "cpu"))
    with pytest.raises(ValueError, match="unknown backend"):
        backends.why_unavailable("attention", "gpu")
    with pytest.raises(ValueError, match="unknown op"):
        backends.why_unavailable("softmax", "cpu")
    for op in ("attention", "layer_norm", "gelu_ffn"):
        assert backends.availability(op, "cpu")["cpu"] == backends.why_unavailable(op, "cpu", "cpu")
