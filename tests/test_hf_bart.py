"""Hugging Face BART conversion (encoder, decoder, cross-attention) on seeded random models.

Eval mode is compared with the original model by the 2x rule (ref64 = the original in float64,
base = the original in float32, out = the converted model in float32), outputs and every
parameter's gradient. Train mode cannot match the original elementwise (transformers draws dropout
from torch's RNG, fusedformer from its counter-based one), so it is compared between fusedformer
backends under one torch.manual_seed, with the reference backend in float64 as ref64.

"Every attention, LayerNorm and FFN fused, no fallback" is checked by recording the ops a
forward+backward dispatches (a TorchDispatchMode): the fused ops must appear exactly as often as
the model has attentions / LayerNorms / feed-forwards, and torch's softmax, LayerNorm, GELU and
SDPA kernels never.
"""
import copy
import os
import warnings
from collections import Counter

import pytest
import torch

import fusedformer as ff

import model_helpers
from model_helpers import OP, OpCounter, assert_grads_2x, fused_base_ref, model_backend
from numerics import assert_2x

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import BartConfig, BartForCausalLM, BartForConditionalGeneration, BartModel  # noqa: E402
from transformers.models.bart import modeling_bart as mb  # noqa: E402

from fusedformer.integrations import hf_bart  # noqa: E402

PAD, BOS, EOS = 1, 0, 2
UNFUSED_ATEN = {"aten._softmax", "aten.softmax", "aten.native_layer_norm", "aten.layer_norm", "aten.gelu",
                "aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_efficient_attention",
                "aten._scaled_dot_product_flash_attention", "aten.scaled_dot_product_attention"}


def tiny_bart(seed=0, cls=BartForConditionalGeneration, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=61, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=56, max_position_embeddings=40,
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS,
                forced_eos_token_id=None, dropout=0.1, attention_dropout=0.1)
    base.update(kw)
    return cls(BartConfig(**base)).eval()


def bart_batch(seed=1, B=3, S=11, T=6, decoder_padding="right"):
    """Source (B, S) right-padded; target (B, T) with its own padding: Sq = T != Sk = S."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 61, (B, S), generator=g)
    src_mask = torch.ones(B, S, dtype=torch.long)
    src_mask[1, 7:] = 0
    src_mask[2, 3:] = 0
    src[src_mask == 0] = PAD
    tgt = torch.randint(3, 61, (B, T), generator=g)
    tgt_mask = torch.ones(B, T, dtype=torch.long)
    if decoder_padding == "right":
        tgt_mask[2, 4:] = 0
    elif decoder_padding == "left":   # query rows at padding see no key at all (fully masked)
        tgt_mask[1, :2] = 0
    tgt[tgt_mask == 0] = PAD
    return {"input_ids": src, "attention_mask": src_mask, "decoder_input_ids": tgt,
            "decoder_attention_mask": tgt_mask}


def weighted_loss(model, batch):
    """sum(logits * w) over the real target tokens (the padding rows' outputs are left out)."""
    logits = model(**batch, use_cache=False).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = batch["decoder_attention_mask"].to(logits.device)[..., None]
    return {"logits": logits}, (logits * w.to(logits.dtype) * keep).sum()


def run(model, batch, loss_fn=weighted_loss, device=torch.device("cpu"), dtype=torch.float32):
    return model_helpers.run(model, batch, loss_fn, device, dtype)


def expected_fused_calls(config, cross: bool = True, embedding_norms: int = 2) -> dict:
    enc, dec = config.encoder_layers, config.decoder_layers
    return {"attention_fwd": enc + dec * (2 if cross else 1),
            "layer_norm_fwd": embedding_norms + 2 * enc + (3 if cross else 2) * dec,
            "gelu_ffn_fwd": enc + dec}


def assert_all_fused(counts: Counter, expected: dict) -> None:
    unfused = {k: v for k, v in counts.items() if k in UNFUSED_ATEN}
    assert not unfused, f"torch kernels ran where fused ones should: {unfused}"
    for op, n in expected.items():
        assert counts[f"fusedformer.{op}"] == n, f"{op}: {counts[f'fusedformer.{op}']} calls, expected {n}"
        bwd = op.replace("_fwd", "_bwd")
        assert counts[f"fusedformer.{bwd}"] == n, f"{bwd}: {counts[f'fusedformer.{bwd}']} calls, expected {n}"


# ------------------------------------------------------------------------------------------------
# eval mode: the converted model against the original (2x rule), everything fused
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl,decoder_padding", [("eager", "right"), ("sdpa", "right"), ("sdpa", "none"),
                                                   ("eager", "left")],
                         ids=["eager", "sdpa", "sdpa-nopad-decoder", "eager-leftpad-decoder"])
def test_bart_matches_original(backend, impl, decoder_padding):
    device = model_backend(backend)
    model = tiny_bart(attn_implementation=impl)
    conv = copy.deepcopy(model)
    report = ff.convert(conv, backend=backend)
    layers = [f"model.{side}.layers.{i}" for side in ("encoder", "decoder") for i in range(2)]
    assert sorted(report.converted) == sorted(layers + ["model.encoder.layernorm_embedding",
                                                        "model.decoder.layernorm_embedding"])
    assert report.skipped == [] and report.notes == []
    assert type(conv.model.decoder.layers[0]) is hf_bart.FusedBartDecoderLayer
    batch = bart_batch(decoder_padding=decoder_padding)
    assert batch["input_ids"].shape[1] != batch["decoder_input_ids"].shape[1]   # cross-attention Sq != Sk

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # a fallback to the original forward warns
        out, grads = run(conv, batch, device=device)
        if decoder_padding != "left":                     # the same through the custom ops, counted
            with OpCounter() as rec:
                run(copy.deepcopy(conv), batch, device=device)
            assert_all_fused(rec.counts, expected_fused_calls(model.config))

    base, base_grads = run(copy.deepcopy(model), batch)
    ref, ref_grads = run(copy.deepcopy(model), batch, dtype=torch.float64)
    tokens = batch["decoder_attention_mask"].bool()
    assert_2x("logits", OP, out["logits"][tokens], ref["logits"][tokens], base["logits"][tokens], torch.float32)
    if decoder_padding == "left":
        # the padding rows see no key at all; HF's eager softmax over finfo.min weighs every key
        # equally, and so does fusedformer.attention for finite masks that low (docs/semantics.md)
        pad = ~tokens
        assert_2x("logits of fully masked rows", OP, out["logits"][pad], ref["logits"][pad], base["logits"][pad],
                  torch.float32)
    assert_grads_2x(grads, ref_grads, base_grads)


def test_bart_train_mode_same_dropout_on_every_backend(backend):
    """Train mode (dropout in attention, residual paths and embeddings): this backend against the
    reference backend in float64, same seeds."""
    device = model_backend(backend)
    model = tiny_bart(seed=2, dropout=0.2, attention_dropout=0.2)
    batch = bart_batch(seed=4)

    def train_run(b, dtype, dev):
        m = copy.deepcopy(model)
        ff.convert(m, backend=b)
        m.train()
        torch.manual_seed(77)
        return run(m, batch, device=dev, dtype=dtype)

    (out, grads), (base, base_grads), (ref, ref_grads) = fused_base_ref(train_run, backend, device)
    tokens = batch["decoder_attention_mask"].bool()
    assert_2x("train logits", OP, out["logits"][tokens], ref["logits"][tokens], base["logits"][tokens],
              torch.float32)
    assert_grads_2x(grads, ref_grads, base_grads)
    evaluated, _ = run(copy.deepcopy(model).eval(), batch)
    assert (evaluated["logits"] - base["logits"]).abs().max() > 1e-2, "train mode applied no dropout"


def test_bart_generation_with_cache_matches_original(backend):
    """Greedy generation: the decoder's self-attention cache grows one key per step, the
    cross-attention keys are computed once and reused (EncoderDecoderCache)."""
    device = model_backend(backend)
    model = tiny_bart(seed=5, attn_implementation="sdpa")
    conv = copy.deepcopy(model)
    ff.convert(conv, backend=backend)
    conv.to(device)
    batch = bart_batch(seed=6)
    prompt = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    kw = dict(max_new_tokens=7, min_new_tokens=7, do_sample=False, num_beams=1, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        want = model.generate(**prompt, **kw)
        got = conv.generate(**{k: v.to(device) for k, v in prompt.items()}, **kw)
    assert torch.equal(got.sequences.cpu(), want.sequences)
    assert len(got.logits) == 7
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


def test_bart_decoder_only_and_base_model():
    """BartForCausalLM (decoder without cross-attention) and BartModel convert and match."""
    model_backend("reference")
    causal = tiny_bart(seed=7, cls=BartForCausalLM, attn_implementation="eager")
    conv = copy.deepcopy(causal)
    report = ff.convert(conv, backend="reference")
    assert {"model.decoder.layers.0", "model.decoder.layers.1"} <= set(report.converted)
    ids = bart_batch()["decoder_input_ids"]
    mask = bart_batch()["decoder_attention_mask"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with OpCounter() as rec:
            got = conv(input_ids=ids, attention_mask=mask).logits
        want = causal(input_ids=ids, attention_mask=mask).logits
    assert rec.counts["fusedformer.attention_fwd"] == 2 and not (set(rec.counts) & UNFUSED_ATEN)
    tokens = mask.bool()
    torch.testing.assert_close(got[tokens], want[tokens], rtol=1e-5, atol=1e-5)

    base = tiny_bart(seed=8, cls=BartModel)
    conv = copy.deepcopy(base)
    ff.convert(conv, backend="reference")
    batch = bart_batch(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(conv(**batch).last_hidden_state, base(**batch).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# what stays unfused, runtime fallbacks, save/load
# ------------------------------------------------------------------------------------------------
def test_bart_partial_and_unsupported_configurations():
    model_backend("reference")
    batch = bart_batch(seed=10)
    # a non-GELU activation: the feed-forward stays plain torch, the rest is fused
    relu = tiny_bart(activation_function="relu")
    conv = copy.deepcopy(relu)
    report = ff.convert(conv, backend="reference")
    assert "model.encoder.layers.0" in report.converted
    assert any("not a GELU" in note for _, note in report.notes)
    with torch.no_grad():
        torch.testing.assert_close(conv(**batch).logits, relu(**batch).logits, rtol=1e-5, atol=1e-5)
    # dropout between fc1 and fc2: noted; in eval mode the FFN is fused anyway
    act_drop = tiny_bart(activation_dropout=0.1)
    report = ff.convert(copy.deepcopy(act_drop), backend="reference")
    assert any("activation_dropout" in note for _, note in report.notes)
    # an attention implementation the fused layers do not understand: left untouched
    flex = tiny_bart()
    flex.config._attn_implementation = "flex_attention"
    report = ff.convert(flex)
    assert "flex_attention" in dict(report.skipped)["model.encoder.layers.0"]
    assert type(flex.model.encoder.layers[0]) is mb.BartEncoderLayer
    # a part replaced by another class: left untouched, its siblings still convert
    custom = tiny_bart()

    class MyLinear(torch.nn.Linear):
        pass
    old = custom.model.decoder.layers[1].fc1
    custom.model.decoder.layers[1].fc1 = MyLinear(old.in_features, old.out_features)
    report = ff.convert(custom)
    assert "fc1 is a" in dict(report.skipped)["model.decoder.layers.1"]
    assert "model.decoder.layers.0" in report.converted
    # revert is the exact original
    conv = copy.deepcopy(relu)
    ff.convert(conv, backend="reference")
    ff.revert(conv)
    assert type(conv.model.decoder.layers[0]) is mb.BartDecoderLayer
    with torch.no_grad():
        assert torch.equal(conv(**batch).logits, relu(**batch).logits)


def test_bart_output_attentions_falls_back_to_the_original():
    model_backend("reference")
    model = tiny_bart(attn_implementation="eager")
    conv = copy.deepcopy(model)
    ff.convert(conv, backend="reference")
    batch = bart_batch(seed=11)
    with torch.no_grad():
        want = model(**batch, output_attentions=True)
        with pytest.warns(RuntimeWarning, match="output_attentions"):
            got = conv(**batch, output_attentions=True)
    assert len(got.cross_attentions) == 2 and len(got.encoder_attentions) == 2
    for a, b in zip(got.cross_attentions, want.cross_attentions):
        torch.testing.assert_close(a, b)


def test_bart_round_trip_through_save_pretrained(tmp_path):
    model_backend("reference")
    model = tiny_bart(seed=12)
    conv = copy.deepcopy(model)
    ff.convert(conv, backend="reference")
    assert list(conv.state_dict()) == list(model.state_dict())
    conv.save_pretrained(tmp_path)
    plain = BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert type(plain.model.encoder.layers[0]) is mb.BartEncoderLayer
    assert plain.lm_head.weight.data_ptr() == plain.model.shared.weight.data_ptr()   # still tied
    batch = bart_batch(seed=13)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, model(**batch).logits)
