"""layer_norm: LayerNorm, plain and fused with residual add + dropout, forward and backward.

Providers: every fusedformer backend that can take the input; ``torch`` (``F.layer_norm``, with
``F.dropout`` and the residual add written out in eager mode); ``compile`` (``torch.compile`` of that
eager code); ``liger`` (Liger-Kernel's LayerNorm, CUDA only, plain LayerNorm only) when installed.

Sweeps:
  width             plain LayerNorm over widths 768..16k (--quick: 768..4096 on 4096 rows). This is the
                    comparison with ``F.layer_norm`` the CPU kernel is held to (fwd, bwd, fwd+bwd).
  residual_dropout  y = LN(dropout(x) + residual): what a post-LN Transformer block does.

GB/s counts the bytes that must move (model below), not what a provider happens to move.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import pytest_bench, suite

OP = "layer_norm"
EPS = 1e-5
SEED = 1234


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
def cases(size: str, device: torch.device) -> list[suite.Case]:
    if size == "quick":
        width = [(4096, n) for n in (768, 1024, 2048, 4096)]
        fused = [(1024, 1024)]  # the unfused reference draws its dropout mask slowly: fewer rows
    else:
        width = [(m, n) for m in (4096, 16384, 65536) for n in (768, 1024, 2048, 4096, 8192, 16384)]
        fused = [(16384, n) for n in (768, 1024, 2048, 4096, 8192, 16384)]
    out = []
    for m, n in width:
        out.append(suite.Case(OP, "width", {"M": m, "N": n, "residual": False, "dropout_p": 0.0},
                               f"M={m} N={n}", n, f"M={m}", "width N"))
    for m, n in fused:
        out.append(suite.Case(OP, "residual_dropout", {"M": m, "N": n, "residual": True, "dropout_p": 0.1},
                               f"M={m} N={n} +res drop=0.1", n, f"M={m}", "width N"))
    return out


def check_params(params: dict) -> dict:
    """The check runs at the same width on fewer rows (each row is independent)."""
    return {**params, "M": min(params["M"], 256)}


def make_inputs(params: dict, dtype: torch.dtype, device: torch.device) -> tuple[dict, list[str]]:
    M, N = params["M"], params["N"]
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        return torch.randn(*shape, generator=gen, device=device, dtype=wide).to(dtype)

    t = {"x": randn(M, N) * 2 + 0.5, "weight": randn(N), "bias": randn(N)}
    if params["residual"]:
        t["residual"] = randn(M, N)
    leaves = list(t)
    for k in leaves:
        t[k].requires_grad_(True)
    return t, leaves


def work(params: dict, mode: str, dtype: torch.dtype) -> float:
    """Bytes that must move. e = element size; statistics are float32 (4 bytes a row each).

    fwd: read x (+ residual), weight, bias; write y (+ the pre-norm sum h when there is a residual
         or dropout, which the backward needs), mean, rstd.
    bwd: read dy, h (or x), weight, mean, rstd; write dh (+ dx when dropout makes it differ from
         d residual), dweight, dbias. The dropout mask is recomputed from the seed, never stored.
    """
    M, N = params["M"], params["N"]
    e = torch.empty(0, dtype=dtype).element_size()
    has_res, has_drop = params["residual"], params["dropout_p"] > 0.0
    has_h = has_res or has_drop
    fwd = M * N * e * (1 + has_res + 1 + has_h) + 2 * N * e + 2 * M * 4
    bwd = M * N * e * (2 + 1 + (has_res and has_drop)) + 3 * N * e + 2 * M * 4
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# ------------------------------------------------------------------------------------------------
# providers
# ------------------------------------------------------------------------------------------------
def _fusedformer(backend: str):
    import fusedformer as ff

    def fn(t: dict, p: dict):
        return ff.layer_norm(t["x"], p["N"], t["weight"], t["bias"], EPS, residual=t.get("residual"),
                             dropout_p=p["dropout_p"], seed=SEED, backend=backend)
    return fn


def torch_eager(t: dict, p: dict):
    """What a user writes without fusedformer."""
    h = t["x"]
    if p["dropout_p"] > 0.0:
        h = F.dropout(h, p["dropout_p"], training=True)
    if t.get("residual") is not None:
        h = h + t["residual"]
    return F.layer_norm(h, (p["N"],), t["weight"], t["bias"], EPS)


def _liger_unavailable(device, dtype, params) -> Optional[str]:
    if device.type != "cuda":
        return "Liger-Kernel runs on CUDA only"
    try:
        import liger_kernel.ops.layer_norm  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed"
    return None


def _liger(t: dict, p: dict):
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    h = t["x"]
    if p["dropout_p"] > 0.0:
        h = F.dropout(h, p["dropout_p"], training=True)
    if t.get("residual") is not None:
        h = h + t["residual"]
    return LigerLayerNormFunction.apply(h, t["weight"], t["bias"], EPS)


def providers(device: torch.device) -> list[suite.Provider]:
    from fusedformer.ops import layer_norm as op_module

    out = suite.fusedformer_providers(op_module, _fusedformer)
    out.append(suite.Provider("torch", torch_eager, own_rng=True))
    out.append(suite.Provider("compile", suite.compiled(torch_eager), own_rng=True))
    out.append(suite.Provider("liger", _liger, _liger_unavailable, own_rng=True))
    return out


def bench() -> suite.OpBench:
    return suite.OpBench(OP, "GB/s", cases, providers, make_inputs, work, check_params)


# ------------------------------------------------------------------------------------------------
# pytest-benchmark entry point (pytest bench/ --benchmark-only); conftest.py parametrizes it
# ------------------------------------------------------------------------------------------------
def test_layer_norm(benchmark, bench_item):
    pytest_bench.pytest_benchmark(benchmark, bench(), bench_item)
