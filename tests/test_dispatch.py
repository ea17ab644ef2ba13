"""Backend selection, its errors, `info`, and bad-input errors of the layer_norm API and native op."""
import subprocess
import sys

import pytest
import torch

import fusedformer as ff
from fusedformer import backends
from fusedformer.ops import layer_norm as ln_module


@pytest.fixture
def spy(monkeypatch):
    """Record which backend's forward each layer_norm call runs."""
    ran = []
    for name, impl in list(ln_module.TABLE.items()):
        if not backends.is_available(ln_module, name, "cpu"):
            continue
        fwd, bwd = impl.fns()
        monkeypatch.setattr(impl, "_fns", (lambda *a, _f=fwd, _n=name: (ran.append(_n), _f(*a))[1], bwd))
    return ran


def _cpu_native_available():
    return backends.is_available("layer_norm", "cpu")


def test_precedence_argument_context_environment(spy, monkeypatch):
    x = torch.randn(3, 8)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    ff.layer_norm(x, 8)
    assert spy[-1] == "reference", "environment variable ignored"
    if _cpu_native_available():
        with ff.use_backend("cpu"):
            ff.layer_norm(x, 8)
            assert spy[-1] == "cpu", "use_backend must win over the environment"
            ff.layer_norm(x, 8, backend="reference")
            assert spy[-1] == "reference", "backend= must win over use_backend"
            with ff.use_backend("auto"):
                monkeypatch.delenv(backends.ENV_VAR)
                ff.layer_norm(x, 8)
                assert spy[-1] == "cpu", "auto picks the cpu backend for CPU tensors"


def test_automatic_choice_on_cpu_tensors(spy):
    ff.layer_norm(torch.randn(2, 4), 4)
    assert spy[-1] == ("cpu" if _cpu_native_available() else "reference")


def test_unknown_backend_names_are_rejected(monkeypatch):
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ff.layer_norm(x, 4, backend="gpu")
    with pytest.raises(ValueError, match="unknown backend"):
        with ff.use_backend("fast"):
            pass
    monkeypatch.setenv(backends.ENV_VAR, "nope")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        ff.layer_norm(x, 4)


def test_requested_backend_that_cannot_take_inputs_lists_every_backend():
    x = torch.randn(2, 4)
    with pytest.raises(backends.BackendError) as err:
        ff.layer_norm(x, 4, backend="cuda")
    msg = str(err.value)
    assert "requested backend 'cuda'" in msg
    for name in backends.BACKENDS:
        assert f"  {name}: " in msg
    assert "tensors are on cpu" in msg


def test_error_when_nothing_fits_names_each_backend_and_reason():
    table = {n: backends.Impl(lambda: (None, None), lambda inputs, _n=n: [f"{_n} says no"]) for n in backends.BACKENDS}
    with pytest.raises(backends.BackendError) as err:
        backends.resolve("myop", table, None, {"device": torch.device("cpu")}, torch.device("cpu"))
    msg = str(err.value)
    assert "no backend can take these inputs" in msg
    for n in backends.BACKENDS:
        assert f"{n} says no" in msg


def test_unsupported_dtype_is_a_reason_not_a_crash():
    x = torch.randn(3, 5, dtype=torch.float64)
    why = ln_module.TABLE["cpu"].reasons({"device": x.device, "dtype": x.dtype})
    assert any("float64" in w for w in why)
    y = ff.layer_norm(x, 5)  # float64 falls back to the reference automatically
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (5,)))


def test_info_reports_every_backend_with_reasons():
    text = ff.info.__module__ and __import__("fusedformer.info", fromlist=["report"]).report()
    for op in ("attention", "layer_norm", "gelu_ffn"):
        assert f"{op} on cpu tensors:" in text
    for n in backends.BACKENDS:
        assert f"  {n} " in text
    assert "unavailable: " in text  # at least cuda is unavailable here (or would list why)
    out = subprocess.run([sys.executable, "-m", "fusedformer", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "layer_norm on cpu tensors:" in out.stdout and "native build" in out.stdout


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument
# ---------------------------------------------------------------------------------------------
X = torch.randn(4, 6)


@pytest.mark.parametrize("call,exc,needle", [
    (lambda: ff.layer_norm(X.to(torch.int32), 6), TypeError, "input must be a floating-point"),
    (lambda: ff.layer_norm([1.0, 2.0], 2), TypeError, "input must be a torch.Tensor"),
    (lambda: ff.layer_norm(X, 6, torch.ones(6, dtype=torch.float64)), TypeError, "weight has dtype torch.float64"),
    (lambda: ff.layer_norm(X, 6, torch.ones(6, device="meta")), ValueError, "weight is on meta"),
    (lambda: ff.layer_norm(X, 6, None, torch.ones(5)), ValueError, "bias has shape (5,)"),
    (lambda: ff.layer_norm(X, 5), ValueError, "normalized_shape (5,)"),
    (lambda: ff.layer_norm(X, 6, eps=float("nan")), ValueError, "eps must be finite"),
    (lambda: ff.layer_norm(X, 6, eps=float("inf")), ValueError, "eps must be finite"),
    (lambda: ff.layer_norm(X, 6, eps=-1.0), ValueError, "eps must be >= 0"),
    (lambda: ff.layer_norm(X, 6, residual=torch.randn(4, 5)), ValueError, "residual has shape (4, 5)"),
    (lambda: ff.layer_norm(X, 6, residual=X.half()), TypeError, "residual has dtype torch.float16"),
    (lambda: ff.layer_norm(X, 6, dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
    (lambda: ff.layer_norm(X, 6, dropout_p=0.1, seed=1.5), TypeError, "seed must be an int"),
    (lambda: ff.layer_norm(X, 6, offset=-3), ValueError, "offset must be >= 0"),
    (lambda: ff.rms_norm(X, 6, torch.ones(7)), ValueError, "weight has shape (7,)"),
])
def test_layer_norm_bad_input(call, exc, needle):
    with pytest.raises(exc) as err:
        call()
    assert needle in str(err.value)


@pytest.mark.skipif(not _cpu_native_available(), reason="fusedformer._C (cpu) is not built")
def test_native_op_checks_its_arguments():
    op = torch.ops.fusedformer_C.layer_norm_fwd
    with pytest.raises((RuntimeError, ValueError), match="contiguous"):
        op(torch.randn(6, 4).t(), None, None, None, 1e-5, 0.0, None, 0, False)
    with pytest.raises((RuntimeError, TypeError), match="float32, float16 or bfloat16"):
        op(torch.randn(4, 6, dtype=torch.float64), None, None, None, 1e-5, 0.0, None, 0, False)
    with pytest.raises((RuntimeError, ValueError), match="weight"):
        op(torch.randn(4, 6), None, torch.ones(5), None, 1e-5, 0.0, None, 0, False)
    with pytest.raises((RuntimeError, ValueError), match="dropout_p"):
        op(torch.randn(4, 6), None, None, None, 1e-5, 1.5, None, 0, False)
    with pytest.raises((RuntimeError, ValueError), match="empty"):
        op(torch.randn(0, 6), None, None, None, 1e-5, 0.0, None, 0, False)
