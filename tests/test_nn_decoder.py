"""``fusedformer.nn.TransformerDecoderLayer`` and the conversion of ``nn.Transformer``'s decoder.

Eval mode against the torch layer with the same weights by the 2x rule (ref64 = torch in float64,
base = torch in float32, out = fused in float32), the output and the gradients of the inputs and
every parameter; train mode (dropout) between fusedformer backends under one seed; and, through a
TorchDispatchMode, that a converted ``nn.Transformer`` runs every attention, LayerNorm and GELU
feed-forward on the fused ops (torch's softmax / LayerNorm / GELU kernels never run).
"""
import copy

import pytest
import torch
from torch import nn

import fusedformer as ff

from model_helpers import OpCounter, fused_base_ref, model_backend
from numerics import assert_2x

D_MODEL, NHEAD, FF = 32, 4, 48
UNFUSED_ATEN = {"aten._softmax", "aten.native_layer_norm", "aten.gelu",
                "aten._scaled_dot_product_flash_attention_for_cpu"}


def needs(backend):
    return model_backend(backend, "whole-layer")


def inputs(seed=3, B=3, T=6, S=9):
    """Target (B, T), memory (B, S) with padding: cross-attention has Sq = T != Sk = S."""
    g = torch.Generator().manual_seed(seed)
    tgt = torch.randn(B, T, D_MODEL, generator=g, dtype=torch.float64)
    memory = torch.randn(B, S, D_MODEL, generator=g, dtype=torch.float64)
    mem_pad = torch.zeros(B, S, dtype=torch.bool)
    mem_pad[1, 6:] = True
    mem_pad[2, 2:] = True
    tgt_pad = torch.zeros(B, T, dtype=torch.bool)
    tgt_pad[0, 5:] = True
    return tgt, memory, tgt_pad, mem_pad


def run(layer, tgt, memory, tgt_pad, mem_pad, dtype, device, causal_mask=True):
    layer = layer.to(device=device, dtype=dtype)
    t = tgt.to(device=device, dtype=dtype).requires_grad_(True)
    m = memory.to(device=device, dtype=dtype).requires_grad_(True)
    T = t.shape[1]
    mask = nn.Transformer.generate_square_subsequent_mask(T, device=device, dtype=dtype) if causal_mask else None
    out = layer(t, m, tgt_mask=mask, tgt_key_padding_mask=tgt_pad.to(device),
                memory_key_padding_mask=mem_pad.to(device), tgt_is_causal=causal_mask)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    loss = (out * w.to(device=device, dtype=dtype)).sum()
    leaves = {"tgt": t, "memory": m, **dict(layer.named_parameters())}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out.detach().cpu(), {k: g.detach().cpu() for k, g in zip(leaves, grads)}


def pair(norm_first, activation, dropout=0.1):
    torch.manual_seed(0)
    t = nn.TransformerDecoderLayer(D_MODEL, NHEAD, FF, dropout=dropout, activation=activation, batch_first=True,
                                   norm_first=norm_first)
    f = ff.nn.TransformerDecoderLayer(D_MODEL, NHEAD, FF, dropout=dropout, activation=activation, batch_first=True,
                                      norm_first=norm_first)
    f.load_state_dict(t.state_dict())
    return t, f


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_decoder_layer_matches_torch_eval(backend, norm_first, activation):
    device = needs(backend)
    t, f = pair(norm_first, activation)
    t.eval(), f.eval()
    f.backend = backend
    args = inputs()
    out, grads = run(copy.deepcopy(f), *args, torch.float32, device)
    base, base_grads = run(copy.deepcopy(t), *args, torch.float32, torch.device("cpu"))
    ref, ref_grads = run(copy.deepcopy(t), *args, torch.float64, torch.device("cpu"))
    rows = ~args[2]   # torch gives NaN rows nowhere here: every query sees a key
    assert_2x("out", "gelu_ffn", out[rows], ref[rows], base[rows], torch.float32)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_2x(f"grad {name}", "gelu_ffn", grads[name], ref_grads[name], base_grads[name], torch.float32)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_decoder_layer_train_mode_same_on_every_backend(backend, norm_first):
    """Train mode, dropout 0.2 everywhere but between the linears (so the FFN stays fused)."""
    device = needs(backend)
    _, f = pair(norm_first, "gelu", dropout=0.2)
    f.dropout.p = 0.0
    f.train()
    args = inputs(seed=5)

    def train_run(b, dtype, dev):
        layer = copy.deepcopy(f)
        layer.backend = b
        torch.manual_seed(11)
        return run(layer, *args, dtype, dev)

    (out, grads), (base, base_grads), (ref, ref_grads) = fused_base_ref(train_run, backend, device)
    assert_2x("train out", "gelu_ffn", out, ref, base, torch.float32)
    for name in ref_grads:
        assert_2x(f"grad {name}", "gelu_ffn", grads[name], ref_grads[name], base_grads[name], torch.float32)
    f.eval()
    evaluated, _ = run(copy.deepcopy(f), *args, torch.float32, torch.device("cpu"))
    assert (evaluated - base).abs().max() > 1e-2, "train mode applied no dropout"


def test_convert_transformer_decoder_everything_fused():
    needs("reference")
    torch.manual_seed(1)
    model = nn.Transformer(D_MODEL, NHEAD, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=FF,
                           activation="gelu", batch_first=True).eval()
    fused = copy.deepcopy(model)
    report = ff.convert(fused, backend="reference")
    assert {"decoder.layers.0", "decoder.layers.1", "encoder.layers.0"} <= set(report.converted)
    assert report.kinds["decoder.layers.0"] == "TransformerDecoderLayer" and report.skipped == []
    layer = fused.decoder.layers[0]
    assert type(layer) is ff.nn.TransformerDecoderLayer
    assert type(layer.multihead_attn) is ff.nn.MultiheadAttention and type(layer.norm3) is ff.nn.LayerNorm
    assert list(fused.state_dict()) == list(model.state_dict())
    tgt, memory, tgt_pad, mem_pad = (a.float() if a.is_floating_point() else a for a in inputs())
    mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])

    def call(m):
        return m(memory, tgt, tgt_mask=mask, src_key_padding_mask=mem_pad, tgt_key_padding_mask=tgt_pad,
                 memory_key_padding_mask=mem_pad, tgt_is_causal=True)
    with OpCounter() as rec:
        out = call(fused)
        out.sum().backward()
    assert not (set(rec.counts) & UNFUSED_ATEN), rec.counts
    # encoder: 1 attention, 2 norms + the final norm; decoder: 2 x (2 attentions, 3 norms) + the final norm
    assert rec.counts["fusedformer.attention_fwd"] == 5 and rec.counts["fusedformer.attention_bwd"] == 5
    assert rec.counts["fusedformer.layer_norm_fwd"] == 2 + 1 + 6 + 1
    assert rec.counts["fusedformer.gelu_ffn_fwd"] == 3
    with torch.no_grad():
        rows = ~tgt_pad
        torch.testing.assert_close(call(fused)[rows], call(model)[rows], rtol=1e-5, atol=1e-5)
    ff.revert(fused)
    assert type(fused.decoder.layers[0]) is nn.TransformerDecoderLayer
    assert type(fused.decoder.layers[0].self_attn) is nn.MultiheadAttention


def test_decoder_layer_partial_conversion_notes_and_skips():
    relu = nn.TransformerDecoder(nn.TransformerDecoderLayer(D_MODEL, NHEAD, FF, batch_first=True), 1)
    report = ff.convert(relu)
    assert "layers.0" in report.converted and any("not a GELU" in n for _, n in report.notes)

    class MyNorm(nn.LayerNorm):
        pass
    odd = nn.TransformerDecoderLayer(D_MODEL, NHEAD, FF, batch_first=True)
    odd.norm2 = MyNorm(D_MODEL)
    report = ff.convert(odd)
    assert "norm2 is a" in dict(report.skipped)[""]
    assert type(odd) is nn.TransformerDecoderLayer and type(odd.self_attn) is ff.nn.MultiheadAttention
