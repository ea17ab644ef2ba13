"""Helpers shared by the whole-model and whole-layer tests (test_hf.py, test_hf_bart.py,
test_hf_bert_decoder.py, test_nn_decoder.py): which backends to run them on, one forward + backward
with its gradients, the 2x rule over every gradient, and an op counter."""
from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedformer.ops import attention as attention_op
from fusedformer.ops import gelu_ffn as gelu_ffn_op
from fusedformer.ops import layer_norm as layer_norm_op

from conftest import skip_unless_available
from numerics import assert_2x

OP = "gelu_ffn"   # whole models and layers: the matmul-heavy op's tolerances


def model_backend(backend, what: str = "whole-model"):
    """Skip unless ``backend`` runs all three ops here (and not the slow Triton interpreter); the device."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip(f"triton: the Triton CPU interpreter is too slow for {what} tests (run them on a GPU)")
    for op in (layer_norm_op, attention_op, gelu_ffn_op):
        device = skip_unless_available(op, backend)
    return device


def run(model, batch, loss_fn, device=torch.device("cpu"), dtype=torch.float32):
    """Forward + backward; (outputs as detached CPU tensors, gradients by parameter name)."""
    model = model.to(device=device, dtype=dtype)
    model.zero_grad(set_to_none=True)
    batch = {k: v.to(device) for k, v in batch.items()}
    outputs, loss = loss_fn(model, batch)
    loss.backward()
    grads = {n: (p.grad.detach().cpu() if p.grad is not None else None) for n, p in model.named_parameters()}
    return {k: v.detach().cpu() for k, v in outputs.items()}, grads


def fused_base_ref(run_one, backend, device):
    """The three runs the 2x rule compares: ``run_one(backend, dtype, device)`` for ``backend`` in
    float32 on ``device``, the reference in float32 on the CPU (the base) and in float64 (ref64)."""
    cpu = torch.device("cpu")
    return run_one(backend, torch.float32, device), run_one("reference", torch.float32, cpu), \
        run_one("reference", torch.float64, cpu)


def assert_grads_2x(grads, ref_grads, base_grads):
    assert grads.keys() == ref_grads.keys()
    checked = 0
    for name, ref in ref_grads.items():
        if ref is None:
            assert grads[name] is None, f"{name}: gradient where the original has none"
            continue
        assert grads[name] is not None, f"{name}: missing gradient"
        assert_2x(f"grad {name}", OP, grads[name], ref, base_grads[name], torch.float32)
        checked += 1
    assert checked > 0


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched (fused ops appear as ``fusedformer.<op>``)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))
