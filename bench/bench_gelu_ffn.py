"""gelu_ffn: Linear -> +bias -> GELU -> Linear -> +bias, forward and backward.

Providers: every fusedformer backend that can take the input; ``torch`` (``F.linear``, ``F.gelu``,
``F.linear`` in eager mode); ``compile`` (``torch.compile`` of that code). Liger-Kernel has no GELU
feed-forward of this form (its MLP kernels are the gated GEGLU / SwiGLU), so it is not a provider here.

Sweep:
  models  the feed-forward blocks of BERT-base (768 -> 3072, erf GELU), BERT-large (1024 -> 4096, erf)
          and GPT-2 small / medium / large (768 / 1024 / 1280 wide, x4, tanh GELU) on 8192 tokens
          (--quick: MiniLM (384 -> 1536, erf), BERT-base, BERT-large and GPT-2 small on 256 tokens).

TFLOP/s counts the two GEMMs: 2*M*C*F each forward, twice that backward.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from . import pytest_bench, suite

OP = "gelu_ffn"
SEED = 1234

MODELS = {  # name: (C, F, approximate)
    "minilm": (384, 1536, "none"),
    "bert-base": (768, 3072, "none"),
    "bert-large": (1024, 4096, "none"),
    "gpt2-small": (768, 3072, "tanh"),
    "gpt2-medium": (1024, 4096, "tanh"),
    "gpt2-large": (1280, 5120, "tanh"),
}


def cases(size: str, device: torch.device) -> list[suite.Case]:
    if size == "quick":
        names, M = ("minilm", "bert-base", "bert-large", "gpt2-small"), 256
    else:
        names, M = tuple(MODELS), 8192
    out = []
    for name in names:
        C, Fw, approx = MODELS[name]
        p = {"M": M, "C": C, "F": Fw, "approximate": approx, "dropout_p": 0.0}
        out.append(suite.Case(OP, "models", p, f"{name} M={M}", name, f"M={M}"))
    return out


def check_params(params: dict) -> dict:
    """Same weights' shapes on fewer rows."""
    return {**params, "M": min(params["M"], 128)}


def make_inputs(params: dict, dtype: torch.dtype, device: torch.device) -> tuple[dict, list[str]]:
    M, C, Fw = params["M"], params["C"], params["F"]
    gen = torch.Generator(device=device).manual_seed(0)
    wide = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=wide) * scale).to(dtype)

    t = {"x": randn(M, C), "w1": randn(Fw, C, scale=C ** -0.5), "b1": randn(Fw, scale=0.1),
         "w2": randn(C, Fw, scale=Fw ** -0.5), "b2": randn(C, scale=0.1)}
    for v in t.values():
        v.requires_grad_(True)
    return t, list(t)


def work(params: dict, mode: str, dtype: torch.dtype) -> float:
    fwd = 2 * (2.0 * params["M"] * params["C"] * params["F"])
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]


def _fusedformer(backend: str):
    import fusedformer as ff

    def fn(t: dict, p: dict):
        return ff.gelu_ffn(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], p["approximate"], p["dropout_p"],
                           seed=SEED, backend=backend)
    return fn


def torch_eager(t: dict, p: dict):
    h = F.gelu(F.linear(t["x"], t["w1"], t["b1"]), approximate=p["approximate"])
    y = F.linear(h, t["w2"], t["b2"])
    if p["dropout_p"] > 0.0:
        y = F.dropout(y, p["dropout_p"], training=True)
    return y


def providers(device: torch.device) -> list[suite.Provider]:
    from fusedformer.ops import gelu_ffn as op_module

    out = suite.fusedformer_providers(op_module, _fusedformer)
    out.append(suite.Provider("torch", torch_eager, own_rng=True))
    out.append(suite.Provider("compile", suite.compiled(torch_eager), own_rng=True))
    return out


def bench() -> suite.OpBench:
    return suite.OpBench(OP, "TFLOP/s", cases, providers, make_inputs, work, check_params)


def test_gelu_ffn(benchmark, bench_item):
    pytest_bench.pytest_benchmark(benchmark, bench(), bench_item)
