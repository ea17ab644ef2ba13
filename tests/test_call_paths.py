"""The two call paths of every fused op (ops/_common.FusedOp): eager calls on plain tensors go
through a direct autograd.Function; traced calls (here: under a dispatch mode, as under fake
tensors or make_fx) go through the torch.library custom ops. Both must give identical results."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedformer as ff
from fusedformer.ops import attention as attn_module, gelu_ffn as ffn_module, layer_norm as ln_module

from conftest import dtype_for, skip_unless_available


class _Recorder(TorchDispatchMode):
    """Records the name of every op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _layer_norm(g, dtype):
    x = torch.randn(9, 40, generator=g).to(dtype)
    r = torch.randn(9, 40, generator=g).to(dtype)
    w, b = torch.randn(40, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
    return (ln_module, "fusedformer.layer_norm_fwd", [x, r, w, b],
            lambda t, be: ff.layer_norm(t[0], 40, t[2], t[3], residual=t[1], dropout_p=0.2, seed=5, backend=be))


def _gelu_ffn(g, dtype):
    x = torch.randn(7, 24, generator=g).to(dtype)
    w1, b1 = torch.randn(40, 24, generator=g).to(dtype) * 0.2, torch.randn(40, generator=g).to(dtype)
    w2, b2 = torch.randn(24, 40, generator=g).to(dtype) * 0.2, torch.randn(24, generator=g).to(dtype)
    return (ffn_module, "fusedformer.gelu_ffn_fwd", [x, w1, b1, w2, b2],
            lambda t, be: ff.gelu_ffn(t[0], t[1], t[2], t[3], t[4], dropout_p=0.1, seed=3, backend=be))


def _attention(g, dtype):
    q, k, v = (torch.randn(2, 3, 11, 16, generator=g).to(dtype) for _ in range(3))
    return (attn_module, "fusedformer.attention_fwd", [q, k, v],
            lambda t, be: ff.attention(t[0], t[1], t[2], is_causal=True, dropout_p=0.1, seed=9, backend=be))


CASES = {"layer_norm": _layer_norm, "gelu_ffn": _gelu_ffn, "attention": _attention}


def _node_names(t) -> set[str]:
    """Names of the autograd nodes that produced ``t``."""
    names, todo, seen = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return names


def _run(fn, tensors, backend, dy_seed):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(leaves, backend)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(dy_seed)).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, dy.to(out.device))
    return out, grads


@pytest.mark.parametrize("case", list(CASES))
def test_eager_and_custom_op_paths_agree(backend, case):
    g = torch.Generator().manual_seed(len(case))
    module, op_name, tensors, fn = CASES[case](g, torch.float32)
    device = skip_unless_available(module, backend)
    dtype = dtype_for(backend)
    tensors = [t.to(device=device, dtype=dtype) for t in tensors]

    eager_out, eager_grads = _run(fn, tensors, backend, 1)
    assert f"{case}_eagerBackward" in _node_names(eager_out), "an eager call should take the direct path"

    with _Recorder() as rec:
        traced_out, traced_grads = _run(fn, tensors, backend, 1)
    assert f"{op_name}.default" in rec.ops, "under a dispatch mode the call should go through the custom op"

    torch.testing.assert_close(traced_out, eager_out, rtol=0, atol=0)
    for a, b in zip(traced_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eager_path_refuses_double_backward():
    """The backward is not differentiable; asking for a second derivative must fail loudly rather
    than silently return a wrong one."""
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    y = ff.layer_norm(x, 8, backend="reference")
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), x)
