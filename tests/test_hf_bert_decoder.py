"""Hugging Face BERT used as a decoder: ``is_decoder`` (causal self-attention with a key/value cache)
and ``add_cross_attention`` (cross-attention over an encoder's states), converted by
``fusedformer.convert`` (hf_bert + hf_bert_decoder), on seeded random models.

Eval mode against the original model by the 2x rule (outputs and every parameter's gradient),
every attention / LayerNorm / feed-forward on the fused ops (dispatch count, no fallback warning),
train mode between backends, and greedy generation with the cache in a BERT2BERT
``EncoderDecoderModel``.
"""
import copy
import os
import warnings

import pytest
import torch

import fusedformer as ff

from model_helpers import OP, OpCounter, fused_base_ref, model_backend
from numerics import assert_2x

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertLMHeadModel, BertModel, EncoderDecoderModel  # noqa: E402

from fusedformer.integrations import hf_bert  # noqa: E402

UNFUSED_ATEN = {"aten._softmax", "aten.native_layer_norm", "aten._scaled_dot_product_flash_attention_for_cpu"}


def config(**kw):
    base = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                is_decoder=True, pad_token_id=0)
    base.update(kw)
    return BertConfig(**base)


def batch(seed=0, B=3, S=7, S_enc=10, cross=True, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if pad:   # without padding, "sdpa" builds no mask: causality is SDPA's is_causal
        mask[1, 5:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if cross:
        out["encoder_hidden_states"] = torch.randn(B, S_enc, 48, generator=g, dtype=torch.float64)
        enc_mask = torch.ones(B, S_enc, dtype=torch.long)
        enc_mask[0, 6:] = 0
        enc_mask[2, 3:] = 0
        out["encoder_attention_mask"] = enc_mask
    return out


def loss_fn(model, b):
    out = model(**b, use_cache=False)
    y = out.logits if hasattr(out, "logits") else out.last_hidden_state
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return y, (y * w.to(y.dtype) * b["attention_mask"][..., None].to(y.dtype)).sum()


def run(model, b, device=torch.device("cpu"), dtype=torch.float32):
    model = model.to(device=device, dtype=dtype)
    model.zero_grad(set_to_none=True)
    b = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in b.items()}
    y, loss = loss_fn(model, b)
    loss.backward()
    return y.detach().cpu(), {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head,cross,impl,pad", [
    (BertLMHeadModel, False, "eager", True), (BertLMHeadModel, False, "sdpa", False),
    (BertModel, True, "eager", True), (BertModel, True, "sdpa", True)],
    ids=["causal-lm-eager", "causal-lm-sdpa-nopad", "cross-eager", "cross-sdpa"])
def test_bert_decoder_matches_original(backend, head, cross, impl, pad):
    device = model_backend(backend)
    torch.manual_seed(0)
    model = head(config(add_cross_attention=cross, attn_implementation=impl)).eval()
    conv = copy.deepcopy(model)
    report = ff.convert(conv, backend=backend)
    prefix = "bert." if head is BertLMHeadModel else ""
    assert {f"{prefix}encoder.layer.0", f"{prefix}encoder.layer.1"} <= set(report.converted)
    assert report.skipped == []
    assert type(conv.get_submodule(f"{prefix}encoder.layer.0")) is hf_bert.FusedBertLayer
    b = batch(cross=cross, pad=pad)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, grads = run(conv, b, device)
        with OpCounter() as rec:
            run(copy.deepcopy(conv), b, device)
    assert not (set(rec.counts) & UNFUSED_ATEN), {k: rec.counts[k] for k in set(rec.counts) & UNFUSED_ATEN}
    assert rec.counts["aten.gelu"] == (head is BertLMHeadModel)   # only the LM head's transform (no FFN)
    per_layer = 2 if cross else 1
    assert rec.counts["fusedformer.attention_fwd"] == 2 * per_layer
    assert rec.counts["fusedformer.attention_bwd"] == 2 * per_layer
    assert rec.counts["fusedformer.gelu_ffn_fwd"] == 2
    # the embedding LayerNorm, then (1 + per_layer) per layer; the LM head's transform LayerNorm
    assert rec.counts["fusedformer.layer_norm_fwd"] == 1 + 2 * (1 + per_layer) + (head is BertLMHeadModel)

    base, base_grads = run(copy.deepcopy(model), b)
    ref, ref_grads = run(copy.deepcopy(model), b, dtype=torch.float64)
    rows = b["attention_mask"].bool()
    assert_2x("output", OP, out[rows], ref[rows], base[rows], torch.float32)
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        assert_2x(f"grad {name}", OP, grads[name], ref_grads[name], base_grads[name], torch.float32)


def test_bert_decoder_train_mode_same_dropout_on_every_backend(backend):
    device = model_backend(backend)
    torch.manual_seed(3)
    model = BertModel(config(add_cross_attention=True, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2))
    b = batch(seed=4)

    def train_run(bk, dtype, dev):
        m = copy.deepcopy(model)
        ff.convert(m, backend=bk)
        m.train()
        torch.manual_seed(9)
        return run(m, b, dev, dtype)

    (out, grads), (base, base_grads), (ref, ref_grads) = fused_base_ref(train_run, backend, device)
    rows = b["attention_mask"].bool()
    assert_2x("train output", OP, out[rows], ref[rows], base[rows], torch.float32)
    for name in ref_grads:
        assert_2x(f"grad {name}", OP, grads[name], ref_grads[name], base_grads[name], torch.float32)
    evaluated, _ = run(copy.deepcopy(model).eval(), b)
    assert (evaluated - base).abs().max() > 1e-2, "train mode applied no dropout"


def test_bert2bert_generation_with_cache_matches_original(backend):
    """An EncoderDecoderModel of two BERTs: the encoder's layers, the decoder's causal self-attention
    with its growing cache and its cross-attention (cached after the first step) all fused."""
    device = model_backend(backend)
    torch.manual_seed(5)
    enc = BertModel(config(is_decoder=False, attn_implementation="sdpa"))
    dec = BertLMHeadModel(config(add_cross_attention=True, attn_implementation="sdpa"))
    model = EncoderDecoderModel(encoder=enc, decoder=dec).eval()
    model.config.decoder_start_token_id = 2
    model.config.pad_token_id = 0
    model.generation_config.decoder_start_token_id = 2
    model.generation_config.pad_token_id = 0
    conv = copy.deepcopy(model)
    report = ff.convert(conv, backend=backend)
    assert {"encoder.encoder.layer.0", "decoder.bert.encoder.layer.1"} <= set(report.converted)
    conv.to(device)
    b = batch(seed=6, S=9, cross=False)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        want = model.generate(**b, **kw)
        got = conv.generate(**{k: v.to(device) for k, v in b.items()}, **kw)
    assert torch.equal(got.sequences.cpu(), want.sequences)
    assert len(got.logits) == 6
    for x, y in zip(got.logits, want.logits):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-4, atol=1e-4)
