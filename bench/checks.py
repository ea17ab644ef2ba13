"""The check before timing (llm.c's habit): each provider is run once at a check shape and held to
the project's 2x rule against the float64 reference — ``fusedformer.testing``, the one rule and
tolerance table shared with the tests — plus the no-argument runners of one mode (fwd, bwd,
fwd+bwd) that the timing loop calls."""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch

from fusedformer import testing

from .suite import MODES, Provider

# The project's 2x rule and its one tolerance table: fusedformer.testing (shared with the tests).
rule_2x = testing.check_2x
ATOL = testing.ATOL


def as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def grad_outputs(outs: Sequence[torch.Tensor], seed: int = 1234) -> list[torch.Tensor]:
    """Fixed random upstream gradients (never ones: a constant dy hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen).to(device=o.device, dtype=o.dtype) for o in outs]


def mode_runner(provider: Provider, tensors: dict, leaves: Sequence[str], params: dict, mode: str) -> Callable[[], object]:
    """A no-argument function that runs one ``mode`` (fwd, bwd or fwd+bwd) of ``provider``.

    fwd runs the forward with autograd recording, as in training; bwd runs only the backward of one
    retained forward graph; fwd+bwd runs both."""
    leaf_ts = [tensors[n] for n in leaves]
    if mode == "fwd":
        return lambda: provider.fn(tensors, params)
    outs = as_tuple(provider.fn(tensors, params))
    douts = grad_outputs(outs)
    if mode == "bwd":
        return lambda: torch.autograd.grad(outs, leaf_ts, douts, retain_graph=True)
    if mode == "fwd+bwd":
        def fwd_bwd():
            return torch.autograd.grad(as_tuple(provider.fn(tensors, params)), leaf_ts, douts)
        return fwd_bwd
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def run_for_check(provider: Provider, tensors: dict, leaves: Sequence[str], params: dict
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward and (when there are leaves) backward once: outputs and gradients, detached."""
    outs = as_tuple(provider.fn(tensors, params))
    grads = []
    if leaves:
        grads = list(torch.autograd.grad(outs, [tensors[n] for n in leaves], grad_outputs(outs),
                                         allow_unused=True))
    return [o.detach() for o in outs], [None if g is None else g.detach() for g in grads]


def check_provider(op: str, provider: Provider, reference: Provider, make_inputs, params: dict,
                   dtype: torch.dtype, device: torch.device) -> tuple[Optional[str], str]:
    """Hold ``provider`` to the 2x rule at ``params``. Returns ``(failure or None, summary)``.

    ``make_inputs(params, dtype, device)`` gives ``(tensors, leaves)``; it is called with
    float64 on the CPU for the exact reference, and the same values are cast for the other runs."""
    orig_p = params.get("dropout_p", 0.0)
    if provider.own_rng and orig_p > 0.0:
        params = {**params, "dropout_p": 0.0}
        note = ", dropout off (own RNG)"
    else:
        note = ""
    master, leaves = make_inputs(params, torch.float64, torch.device("cpu"))

    def cast(run_dtype, run_device):
        out = {}
        for k, v in master.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                out[k] = v.detach().to(device=run_device, dtype=run_dtype).requires_grad_(k in leaves)
            elif isinstance(v, torch.Tensor):
                out[k] = v.to(run_device)
            else:
                out[k] = v
        return out

    if note:  # it must still accept dropout: one unchecked call at the real dropout rate
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = dict(params, dropout_p=orig_p)
            run_for_check(provider, cast(dtype, device), leaves, full)
    outs, grads = run_for_check(provider, cast(dtype, device), leaves, params)
    base_outs, base_grads = run_for_check(reference, cast(dtype, device), leaves, params)
    ref_outs, ref_grads = run_for_check(reference, cast(torch.float64, torch.device("cpu")), leaves, params)
    names = [f"out{i}" for i in range(len(outs))] + [f"d{n}" for n in leaves]
    worst = 0.0
    for name, o, r, b in zip(names, outs + grads, ref_outs + ref_grads, base_outs + base_grads):
        if r is None or o is None:
            if (r is None) != (o is None):
                return f"{name}: gradient missing on one side", ""
            continue
        failure, err, bound = rule_2x(name, op, o, r, b, dtype)
        if failure:
            return failure, ""
        worst = max(worst, err / bound if bound > 0 else 0.0)
    return None, f"ok (err <= {worst:.2f} of bound{note})"
