"""attention: exact scaled-dot-product attention, forward and backward, on (B, H, S, D) tensors.

Providers: every fusedformer backend that can take the input; ``torch`` (eager attention as a user —
or Hugging Face's "eager" path — writes it: scores, masks, float32 softmax, dropout, P @ V);
``sdpa-math`` / ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn``
(``F.scaled_dot_product_attention`` pinned to each of its backends with ``sdpa_kernel``);
``compile`` (``torch.compile`` of the eager code); ``flash-attn`` (``flash_attn_func``) when installed.

Sweeps:
  seq   batch x seq = 16k tokens, seq 512..16k, model width 2048 (heads = 2048 / head dim), head dims
        64 / 128 / 256, causal and not (--quick: 1k tokens, seq 256..1024, 4 heads of 64).
  bert  BERT-base attention (12 heads of 64) with key padding (lengths drawn in [S/2, S]) and
        dropout 0.1.

TFLOP/s uses the nominal count 4*B*H*Sq*Sk*D for the forward (x0.5 causal, x2.5 backward),
whatever the padding: the same work for every provider, so the ratios are the speed ratios.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from . import pytest_bench, suite

OP = "attention"
SEED = 1234


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
def cases(size: str, device: torch.device) -> list[suite.Case]:
    out = []
    if size == "quick":
        tokens, seqs, dims, width = 1024, (256, 512, 1024), (64,), 256
        bert = [(4, 128), (1, 512)]  # the unfused reference draws its dropout mask slowly
    else:
        tokens, seqs, dims, width = 16384, (512, 1024, 2048, 4096, 8192, 16384), (64, 128, 256), 2048
        bert = [(32, 128), (8, 512)]
    for D in dims:
        for causal in (False, True):
            for S in seqs:
                p = {"B": tokens // S, "H": width // D, "S": S, "D": D, "causal": causal, "padding": False,
                     "dropout_p": 0.0}
                out.append(suite.Case(OP, "seq", p, f"B={p['B']} H={p['H']} S={S} D={D}" + (" causal" if causal else ""),
                                       S, f"D={D} {'causal' if causal else 'non-causal'}", "sequence length"))
    for B, S in bert:
        p = {"B": B, "H": 12, "S": S, "D": 64, "causal": False, "padding": True, "dropout_p": 0.1}
        out.append(suite.Case(OP, "bert", p, f"B={B} H=12 S={S} D=64 padding dropout=0.1", f"B={B} S={S}",
                               "BERT-base, key padding + dropout 0.1"))
    return out


def check_params(params: dict) -> dict:
    """Check at one or two sequences of up to 1024 tokens (the float64 reference holds S x S scores)."""
    return {**params, "B": min(params["B"], 2), "H": min(params["H"], 2), "S": min(params["S"], 1024)}


def make_inputs(params: dict, dtype: torch.dtype, device: torch.device) -> tuple[dict, list[str]]:
    B, H, S, D = params["B"], params["H"], params["S"], params["D"]
    gen = torch.Generator(device=device).manual_seed(0)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    t = {n: torch.randn(B, H, S, D, generator=gen, device=device, dtype=wide).to(dtype).requires_grad_(True)
         for n in ("q", "k", "v")}
    if params["padding"]:
        cpu_gen = torch.Generator().manual_seed(1)
        lengths = torch.randint(S // 2, S + 1, (B,), generator=cpu_gen)
        t["pad"] = (torch.arange(S)[None, :] >= lengths[:, None]).to(device)  # (B, S) True = padding
    return t, ["q", "k", "v"]


def work(params: dict, mode: str, dtype: torch.dtype) -> float:
    fwd = 4.0 * params["B"] * params["H"] * params["S"] * params["S"] * params["D"]
    if params["causal"]:
        fwd *= 0.5
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


# ------------------------------------------------------------------------------------------------
# providers
# ------------------------------------------------------------------------------------------------
def _fusedformer(backend: str):
    import fusedformer as ff

    def fn(t: dict, p: dict):
        return ff.attention(t["q"], t["k"], t["v"], dropout_p=p["dropout_p"], is_causal=p["causal"],
                            key_padding_mask=t.get("pad"), seed=SEED, backend=backend)
    return fn


def torch_eager(t: dict, p: dict):
    """Attention as written by hand: materialized scores, float32 softmax."""
    q, k, v = t["q"], t["k"], t["v"]
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if p["causal"]:
        S = q.shape[-2]
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if t.get("pad") is not None:
        s = s.masked_fill(t["pad"][:, None, None, :], float("-inf"))
    probs = torch.softmax(s.float(), dim=-1).to(q.dtype)
    if p["dropout_p"] > 0.0:
        probs = F.dropout(probs, p["dropout_p"], training=True)
    return probs @ v


_SDPA_BACKENDS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "cudnn": "CUDNN_ATTENTION"}


def _sdpa(which: str):
    def call(t: dict, p: dict):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        mask = None if t.get("pad") is None else ~t["pad"][:, None, None, :]  # True = attend
        with sdpa_kernel([getattr(SDPBackend, _SDPA_BACKENDS[which])]):
            return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=mask,
                                                  dropout_p=p["dropout_p"], is_causal=p["causal"])

    def fn(t: dict, p: dict):
        try:
            return call(t, p)
        except RuntimeError as exc:
            if "No viable backend" not in str(exc) and "No available kernel" not in str(exc):
                raise
        with warnings.catch_warnings(record=True) as caught:  # SDPA says why in warnings: run again for them
            warnings.simplefilter("always")
            try:
                call(t, p)
            except RuntimeError:
                pass
        why = [str(x.message).split("(Triggered internally")[0].strip() for x in caught]
        why = [w for w in dict.fromkeys(why) if w and not w.endswith("because:")]
        raise suite.Unavailable(f"SDPA's {which} backend turned these inputs down"
                                 + (f": {'; '.join(why)}" if why else ""))
    return fn


def _sdpa_unavailable(which: str):
    def reason(device, dtype, params) -> Optional[str]:
        if device.type == "cpu" and which in ("efficient", "cudnn"):
            return f"SDPA's {which} backend runs on CUDA only"
        return None
    return reason


def _flash_attn_unavailable(device, dtype, params) -> Optional[str]:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn is not installed"
    if device.type != "cuda":
        return "flash-attn runs on CUDA only"
    if dtype not in (torch.float16, torch.bfloat16):
        return "flash-attn takes float16 / bfloat16 only"
    if params["padding"]:
        return "key padding needs flash_attn_varlen_func (unpadded batches); not wired in this suite"
    return None


def _flash_attn(t: dict, p: dict):
    from flash_attn import flash_attn_func

    # flash-attn wants (B, S, H, D); the transposed views only need a contiguous last dimension.
    q, k, v = (t[n].transpose(1, 2) for n in ("q", "k", "v"))
    return flash_attn_func(q, k, v, dropout_p=p["dropout_p"], causal=p["causal"]).transpose(1, 2)


def providers(device: torch.device) -> list[suite.Provider]:
    from fusedformer.ops import attention as op_module

    out = suite.fusedformer_providers(op_module, _fusedformer)
    out.append(suite.Provider("torch", torch_eager, own_rng=True))
    for which in _SDPA_BACKENDS:
        out.append(suite.Provider(f"sdpa-{which}", _sdpa(which), _sdpa_unavailable(which), own_rng=True))
    out.append(suite.Provider("compile", suite.compiled(torch_eager), own_rng=True))
    out.append(suite.Provider("flash-attn", _flash_attn, _flash_attn_unavailable, own_rng=True))
    return out


def bench() -> suite.OpBench:
    return suite.OpBench(OP, "TFLOP/s", cases, providers, make_inputs, work, check_params)


def test_attention(benchmark, bench_item):
    pytest_bench.pytest_benchmark(benchmark, bench(), bench_item)
