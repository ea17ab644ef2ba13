"""Hugging Face the way its users work: ``attn_implementation="fusedformer"`` (transformers' attention
interface) on tiny random Llama (grouped-query), Mistral (sliding window) and GPT-2 models against
``"sdpa"``; ``generate()`` with the key/value cache on left-padded batches; ``Trainer`` on a
converted BERT; loading fused through transformers' class patching.

Every comparison is with unconverted transformers (``"sdpa"`` / ``"eager"``, the ground truth a
user has) by the 2x rule where it is numeric (ref64 = the sdpa model in float64, base = the sdpa
model in float32), and exact for generated tokens. Every test also checks that the fused path ran
(the calls into ``fusedformer.attention`` are counted), so none passes by falling back.
"""
import copy
import os
import warnings

import pytest
import torch

import fusedformer as ff
from fusedformer.ops import attention as attention_op
from fusedformer.ops import gelu_ffn as gelu_ffn_op
from fusedformer.ops import layer_norm as layer_norm_op

from conftest import skip_unless_available
from numerics import assert_2x

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is optional: pip install 'fusedformer[hf]'")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"transformers {transformers.__version__}: the attention interface tests need transformers >= 5",
                allow_module_level=True)
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM)

from fusedformer.integrations import hf_attention, register_hf  # noqa: E402

OP = "gelu_ffn"   # whole models: the matmul-heavy op's tolerances


def model_backend(backend, ops=(attention_op,)):
    """Skip unless ``backend`` runs the ops here (and not the slow Triton interpreter)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("triton: the Triton CPU interpreter is too slow for whole-model tests (run them on a GPU)")
    device = None
    for op in ops:
        device = skip_unless_available(op, backend)
    return device


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts the calls the attention interface makes into fusedformer.attention."""
    calls = []
    real = hf_attention.attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_causal"))
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "attention", counting)
    return calls


@pytest.fixture
def no_fallback_warnings():
    """Turns every fusedformer RuntimeWarning into an error for the test's body."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fusedformer", category=RuntimeWarning)
        yield


# ------------------------------------------------------------------------------------------------
# registration and the attention function itself
# ------------------------------------------------------------------------------------------------
def test_register_hf_is_idempotent_and_registers_the_attention_and_its_mask():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    name = register_hf()
    assert name == "fusedformer" and register_hf() == name
    assert ALL_ATTENTION_FUNCTIONS[name] is hf_attention.attention_forward
    assert name in ALL_MASK_ATTENTION_FUNCTIONS     # without a mask function transformers builds no mask at all
    assert name in ALL_ATTENTION_FUNCTIONS.valid_keys()


def _sdpa(module, q, k, v, mask, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, q, k, v, mask, **kw)[0]


class _Module(torch.nn.Module):
    def __init__(self, groups, is_causal=True):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, is_causal


CASES = ["causal-nomask", "bool-pad-causal", "additive", "gqa-decode", "mqa-chunk", "static-prefill", "scaling",
         "bidirectional"]


@pytest.mark.parametrize("case", CASES)
def test_attention_function_matches_transformers_sdpa(backend, case):
    """The interface function against transformers' own sdpa function, call by call: the shapes,
    masks and flags that models and generate() pass (B=2, H=4, D=16)."""
    device = model_backend(backend)
    g = torch.Generator().manual_seed(CASES.index(case))
    H, Hk, Sq, Sk, kw = 4, 4, 7, 7, {}
    mask, is_causal = None, True
    if case in ("gqa-decode", "mqa-chunk"):
        Hk = 2 if case == "gqa-decode" else 1
        Sq, Sk = (1, 9) if case == "gqa-decode" else (3, 10)
    if case == "static-prefill":
        Sk = 12                       # an empty static cache: keys past the queries, no mask
    q = torch.randn(2, H, Sq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, Hk, Sk, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, Hk, Sk, 16, generator=g, dtype=torch.float64)
    pad = torch.ones(2, Sk, dtype=torch.bool)
    pad[1, :3] = False                # left padding in the second row
    qpos = torch.arange(Sk - Sq, Sk)[:, None]
    allowed = (torch.arange(Sk)[None, :] <= qpos) & pad[:, None, None, :]         # (B, 1, Sq, Sk)
    if case in ("bool-pad-causal", "gqa-decode", "mqa-chunk"):
        mask = allowed
    elif case == "additive":
        # a causal -1e4 mask and a bias (no row fully masked: float32 cannot resolve scores next to -1e4)
        causal = (torch.arange(Sk)[None, :] <= qpos).expand(2, 1, Sq, Sk)
        mask = torch.zeros(2, 1, Sq, Sk, dtype=torch.float64).masked_fill(~causal, -1e4)
        mask += 0.3 * torch.randn(2, 1, Sq, Sk, generator=g, dtype=torch.float64)
        mask = mask.float().double()      # values float32 holds exactly: the inputs are the same for all three
    elif case == "scaling":
        kw["scaling"] = 0.37
    elif case == "bidirectional":
        is_causal, mask = False, pad[:, None, None, :].expand(2, 1, Sq, Sk)
    module = _Module(H // Hk, is_causal)
    ref64 = _sdpa(module, q, k, v, mask, **kw)
    base = _sdpa(module, q.float(), k.float(), v.float(), None if mask is None else mask.float()
                 if mask.is_floating_point() else mask, **kw)
    f = (lambda t: None if t is None else (t.float() if t.is_floating_point() else t).to(device))
    out, weights = hf_attention.attention_forward(module, f(q), f(k), f(v), f(mask), **kw)
    assert weights is None
    assert out.shape == ref64.shape == (2, Sq, H, 16)
    assert_2x(f"attention ({case})", "attention", out.cpu(), ref64, base, torch.float32)


def test_attention_function_refuses_what_it_does_not_compute():
    q = torch.randn(1, 2, 3, 8)
    module = _Module(1)
    for name, value in (("softcap", 30.0), ("position_bias", torch.zeros(1, 2, 3, 3)), ("s_aux", torch.zeros(2))):
        with pytest.raises(ValueError, match=f"{name}=.*attn_implementation=\"eager\""):
            hf_attention.attention_forward(module, q, q, q, None, **{name: value})
    with pytest.raises(TypeError, match="attention_mask of type"):
        hf_attention.attention_forward(module, q, q, q, [[1, 0]])


def test_attention_function_applies_a_sliding_window_the_mask_does_not_carry():
    """A model that passes sliding_window= with no mask while the keys reach past the window gets
    the window (bottom-right aligned), not full causal attention."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 4, 8, generator=g)
    k = torch.randn(1, 2, 9, 8, generator=g)
    v = torch.randn(1, 2, 9, 8, generator=g)
    module = _Module(1)
    got, _ = hf_attention.attention_forward(module, q, k, v, None, sliding_window=3)
    allowed = hf_attention._window_mask(3, 4, 9, q.device)
    assert allowed.sum(-1).tolist() == [3, 3, 3, 3]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# whole models: Llama (GQA), Mistral (sliding window), GPT-2
# ------------------------------------------------------------------------------------------------
def tiny_llama(impl, seed=0, **kw):
    base = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**base, attn_implementation=impl)).eval()


def tiny_mistral(impl, seed=0):
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, sliding_window=4, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attn_implementation=impl)).eval()


def tiny_gpt2(impl, seed=0, **kw):
    base = dict(vocab_size=101, n_positions=64, n_embd=64, n_layer=3, n_head=4, bos_token_id=100,
                eos_token_id=100, pad_token_id=100)
    base.update(kw)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**base, attn_implementation=impl)).eval()


def tiny_bert(impl, seed=0):
    from transformers import BertForMaskedLM
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=80, max_position_embeddings=64,
                                      attn_implementation=impl)).eval()


def same_weights(build, impl_from, impl_to):
    """The model ``build(impl_from)`` and a copy of it on ``impl_to`` (same weights)."""
    a = build(impl_from)
    b = build(impl_to)
    b.load_state_dict(a.state_dict())
    return a, b


def left_padded(seed=1, B=3, S=11, vocab=100, low=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :7] = 0
    return {"input_ids": ids, "attention_mask": mask}


def lm_loss(model, batch):
    logits = model(**batch).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    keep = batch["attention_mask"][..., None].to(logits.dtype)
    return logits, (logits * w.to(logits.dtype) * keep).sum()


def forward_backward(model, batch, dtype=torch.float32):
    model = copy.deepcopy(model).to(dtype)
    logits, loss = lm_loss(model, batch)
    loss.backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


BUILDERS = {"llama-gqa": tiny_llama, "mistral-window": tiny_mistral, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("family", list(BUILDERS) + ["bert"])
def test_model_on_fusedformer_attention_matches_sdpa(backend, family, attention_calls, no_fallback_warnings):
    """Logits and every parameter's gradient of the whole model, left-padded batch, fusedformer's
    attention against sdpa (2x rule on the real tokens)."""
    model_backend(backend)
    build = BUILDERS.get(family, tiny_bert)
    sdpa, fused = same_weights(build, "sdpa", register_hf())
    batch = left_padded()
    ref, ref_grads = forward_backward(sdpa, batch, torch.float64)
    base, base_grads = forward_backward(sdpa, batch)
    with ff.use_backend(backend):
        out, grads = forward_backward(fused, batch)
    layers = fused.config.num_hidden_layers
    assert len(attention_calls) == layers, "the model did not run fusedformer.attention in every layer"
    tokens = batch["attention_mask"].bool()
    assert_2x(f"{family} logits", OP, out[tokens], ref[tokens], base[tokens], torch.float32)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_2x(f"{family} grad {name}", OP, grads[name], ref_grads[name], base_grads[name], torch.float32)


def test_sliding_window_changes_the_result():
    """The sliding-window model's fused logits are not those of full causal attention (so the
    window comparison above can fail)."""
    sdpa, fused = same_weights(tiny_mistral, "sdpa", register_hf())
    batch = left_padded()
    with torch.no_grad():
        got = fused(**batch).logits
        fused.config.sliding_window = None       # the same weights, full causal attention
        full = fused(**batch).logits
    assert (got[0, -1] - full[0, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("family,cache", [("llama-gqa", "dynamic"), ("llama-gqa", "static"), ("mistral-window", "dynamic"),
                                          ("gpt2", "dynamic")])
def test_generate_with_kv_cache_matches_sdpa(backend, family, cache, attention_calls, no_fallback_warnings):
    """Greedy generate() with the key/value cache on a left-padded batch (fully masked query rows
    in the prompt): the same tokens as sdpa, logits close; decoding runs the fused attention with
    one query against the cached keys."""
    device = model_backend(backend)
    sdpa, fused = same_weights(BUILDERS[family], "sdpa", register_hf())
    prompt = left_padded(seed=7, S=6)
    kw = dict(max_new_tokens=7, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=sdpa.config.pad_token_id)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        want = sdpa.generate(**prompt, **kw)
        with ff.use_backend(backend):
            got = fused.to(device).generate(**{k: v.to(device) for k, v in prompt.items()}, **kw)
    assert torch.equal(got.sequences.cpu(), want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)
    layers = fused.config.num_hidden_layers
    assert len(attention_calls) == layers * 7, f"{len(attention_calls)} fused attention calls for 7 steps"


@pytest.mark.parametrize("attn,cache", [(None, "static"), ("fusedformer", "dynamic"), ("fusedformer", "static")])
def test_converted_gpt2_generates_like_the_original(backend, attn, cache, no_fallback_warnings):
    """A converted GPT-2 (blocks fused; with attn_implementation="fusedformer" the model's
    implementation switched too): left-padded generate() with the dynamic or static cache gives the
    original's tokens, no fallback; revert restores the original classes and implementation."""
    device = model_backend(backend, (attention_op, layer_norm_op, gelu_ffn_op))
    model = tiny_gpt2("sdpa", seed=5)
    conv = copy.deepcopy(model)
    report = ff.convert(conv, backend=backend, attn_implementation=attn)
    assert conv.config._attn_implementation == (attn or "sdpa")
    assert "transformer.h.0" in report.converted and report.skipped == []
    if attn:
        assert any("'sdpa' -> 'fusedformer'" in note for _, note in report.notes)
    prompt = left_padded(seed=7, S=6, vocab=100, low=0)
    kw = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
              cache_implementation=cache)
    with torch.no_grad():
        want = model.generate(**prompt, **kw)
        got = conv.to(device).generate(**{k: v.to(device) for k, v in prompt.items()}, **kw)
    assert torch.equal(got.sequences.cpu(), want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)
    ff.revert(conv)
    assert conv.config._attn_implementation == "sdpa"
    assert type(conv.transformer.h[0]).__name__ == "GPT2Block"


def test_convert_sets_the_attention_implementation_and_backend_of_any_family(attention_calls):
    """A Llama has no layers convert() swaps (RMSNorm and SwiGLU are its own classes), but
    convert(..., attn_implementation="fusedformer") puts every attention layer on fusedformer's,
    on the backend asked for; revert gives the model its implementation back."""
    model = tiny_llama("sdpa")
    report = ff.convert(model, backend="reference", attn_implementation="fusedformer")
    assert model.config._attn_implementation == "fusedformer"
    attn = model.model.layers[0].self_attn
    assert hf_attention.backend_for(attn) == "reference"
    batch = left_padded()
    with torch.no_grad():
        model(**batch)
    assert len(attention_calls) == 2
    assert "fusedformer" in str(report)
    ff.revert(model)
    assert model.config._attn_implementation == "sdpa" and hf_attention.backend_for(attn) is None
    with pytest.raises(ValueError, match="attn_implementation must be None .* 'fusedformer'"):
        ff.convert(model, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="applies to Hugging Face models"):
        ff.convert(torch.nn.Sequential(torch.nn.LayerNorm(4)), attn_implementation="fusedformer")


def test_output_attentions_are_computed_once_more_and_announced_once(attention_calls):
    """attentions requested through the interface: the fused output, plus the probabilities
    formed in plain PyTorch — those of the eager model — with one warning per model."""
    eager, fused = same_weights(tiny_llama, "eager", register_hf())
    batch = left_padded()
    with torch.no_grad():
        want = eager(**batch, output_attentions=True)
        with pytest.warns(RuntimeWarning, match="computed a second time") as record:
            got = fused(**batch, output_attentions=True)
            fused(**batch, output_attentions=True)
    assert sum("computed a second time" in str(w.message) for w in record) == 1
    assert len(got.attentions) == len(want.attentions) == 2
    tokens = batch["attention_mask"].bool()
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a.permute(0, 2, 1, 3)[tokens], b.permute(0, 2, 1, 3)[tokens], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logits[tokens], want.logits[tokens], rtol=1e-4, atol=1e-4)
    assert len(attention_calls) == 4


def test_dropout_in_training_runs_fused_and_matches_across_backends(backend):
    """attention_dropout in train mode: the model hands dropout to the fused op, which draws it
    from fusedformer's RNG — the same masks on every backend (against the reference backend)."""
    model_backend(backend)
    if backend == "reference":
        pytest.skip("compares a backend with the reference backend")
    model = tiny_llama(register_hf(), attention_dropout=0.3).train()
    batch = left_padded()

    def run(b, dtype):
        torch.manual_seed(11)
        with ff.use_backend(b):
            return forward_backward(model, batch, dtype)

    out, grads = run(backend, torch.float32)
    base, base_grads = run("reference", torch.float32)
    ref, ref_grads = run("reference", torch.float64)
    tokens = batch["attention_mask"].bool()
    assert_2x("train logits", OP, out[tokens], ref[tokens], base[tokens], torch.float32)
    for name in ref_grads:
        assert_2x(f"train grad {name}", OP, grads[name], ref_grads[name], base_grads[name], torch.float32)
    with torch.no_grad():
        evaluated = copy.deepcopy(model).eval()(**batch).logits
    assert (evaluated[tokens] - base[tokens]).abs().max() > 1e-3, "train mode applied no attention dropout"


# ------------------------------------------------------------------------------------------------
# Trainer on a converted BERT
# ------------------------------------------------------------------------------------------------
class _Topics(torch.utils.data.Dataset):
    """32 random padded sequences with 3 labels."""

    def __init__(self, n=32, S=12, vocab=97):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, S), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.mask = torch.ones(n, S, dtype=torch.long)
        for i in range(n):
            self.mask[i, S - (i % 5):] = 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _trainer_losses(model, tmp_path, steps=6):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (in fusedformer[hf])")
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Losses(TrainerCallback):
        def __init__(self):
            self.losses = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    losses = Losses()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             learning_rate=1e-3, dataloader_num_workers=0, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=_Topics(), callbacks=[losses]).train()
    assert len(losses.losses) == steps
    return losses.losses


@pytest.mark.parametrize("attn", [None, "fusedformer"], ids=["convert", "convert+attn_implementation"])
def test_trainer_on_converted_bert_runs_fused_with_the_original_losses(tmp_path, attn):
    """Trainer (num_items_in_batch and all) for 6 steps on a converted BertForSequenceClassification:
    no fallback, every layer call on the fused path, the losses of the unconverted model
    (dropout off: the two RNGs differ)."""
    model_backend("cpu", (attention_op, layer_norm_op, gelu_ffn_op))
    config = BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=80, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    want = _trainer_losses(copy.deepcopy(model), tmp_path / "plain")

    conv = copy.deepcopy(model)
    ff.convert(conv, backend="cpu", attn_implementation=attn)
    layer_kwargs, original_attention_calls = set(), []
    for layer in conv.bert.encoder.layer:
        layer.register_forward_pre_hook(lambda m, a, kw: layer_kwargs.update(kw), with_kwargs=True)
        layer.attention.register_forward_hook(lambda m, a, out: original_attention_calls.append(1))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _trainer_losses(conv, tmp_path / "fused")
    fallbacks = [str(w.message) for w in record if "fusedformer" in str(w.message)]
    assert fallbacks == []
    assert original_attention_calls == [], "the original attention ran: the layers fell back"
    assert "num_items_in_batch" in layer_kwargs, "Trainer's num_items_in_batch did not reach the layers"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# loading fused: transformers' class patching
# ------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=False)
def restore_recorders():
    """transformers' patching rewrites the class-level ``_can_record_outputs`` of the models it
    builds (BertLayer -> FusedBertLayer) for good; put them back for the tests that follow."""
    from transformers.models.bert.modeling_bert import BertPreTrainedModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2PreTrainedModel
    saved = {cls: dict(cls.__dict__["_can_record_outputs"]) for cls in (BertPreTrainedModel, GPT2PreTrainedModel)
             if isinstance(cls.__dict__.get("_can_record_outputs"), dict)}
    yield
    for cls, recorders in saved.items():
        cls.__dict__["_can_record_outputs"].clear()
        cls.__dict__["_can_record_outputs"].update(recorders)


def test_from_pretrained_comes_back_fused_through_class_patching(tmp_path, monkeypatch, restore_recorders,
                                                                  no_fallback_warnings):
    """register_patch_mapping(hf_patch_mapping()): from_pretrained builds FusedBertLayer /
    FusedGPT2Block itself (no convert), with the checkpoint's weights and the converted outputs."""
    from transformers import BertForMaskedLM
    from transformers.monkey_patching import register_patch_mapping, unregister_patch_mapping
    from fusedformer.integrations import hf_patch_mapping
    from fusedformer.integrations.hf_bert import FusedBertLayer
    from fusedformer.integrations.hf_gpt2 import FusedGPT2Block

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=80, max_position_embeddings=64)).eval()
    gpt2 = tiny_gpt2("sdpa", seed=3)
    bert.save_pretrained(tmp_path / "bert")
    gpt2.save_pretrained(tmp_path / "gpt2")
    mapping = hf_patch_mapping()
    register_patch_mapping(mapping)
    try:
        fused_bert = BertForMaskedLM.from_pretrained(tmp_path / "bert").eval()
        fused_gpt2 = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    finally:
        unregister_patch_mapping(list(mapping))
    assert type(fused_bert.bert.encoder.layer[0]) is FusedBertLayer
    assert type(fused_gpt2.transformer.h[0]) is FusedGPT2Block
    assert type(BertForMaskedLM.from_pretrained(tmp_path / "bert").bert.encoder.layer[0]).__name__ == "BertLayer"
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    from fusedformer.integrations import hf_bert
    calls, original = [], hf_bert.attention
    monkeypatch.setattr(hf_bert, "attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        torch.testing.assert_close(fused_bert(input_ids=ids).logits, bert(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2, "the patched-in layers did not take the fused path"
    with torch.no_grad():
        torch.testing.assert_close(fused_gpt2(input_ids=ids).logits, gpt2(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # the loaded model converts and reverts like any other
    ff.revert(fused_bert)
    assert type(fused_bert.bert.encoder.layer[0]).__name__ == "BertLayer"


def test_a_patched_in_layer_it_cannot_fuse_says_so_once_and_runs_the_original(tmp_path, restore_recorders):
    """A FusedBertLayer that transformers built (patch mapping) checks its parts on its first call:
    one with a part of another class runs the original forward, announced once for the model."""
    from transformers import BertModel
    from transformers.monkey_patching import register_patch_mapping, unregister_patch_mapping
    from fusedformer.integrations import hf_patch_mapping

    class MyLinear(torch.nn.Linear):
        pass

    torch.manual_seed(0)
    plain = BertModel(BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=80, max_position_embeddings=64)).eval()
    plain.save_pretrained(tmp_path)
    mapping = hf_patch_mapping()
    register_patch_mapping(mapping)
    try:
        fused = BertModel.from_pretrained(tmp_path).eval()
    finally:
        unregister_patch_mapping(list(mapping))
    assert type(fused.encoder.layer[1]).__name__ == "FusedBertLayer"
    dense = fused.encoder.layer[1].intermediate.dense
    dense.__class__ = MyLinear
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = [fused(input_ids=ids).last_hidden_state for _ in range(3)]
        want = plain(input_ids=ids).last_hidden_state
    msgs = [str(w.message) for w in record if "fusedformer" in str(w.message)]
    assert len(msgs) == 1 and "intermediate.dense is a" in msgs[0] and "MyLinear, not nn.Linear" in msgs[0], msgs
    for g in got:
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# more families: whatever is written against the attention interface
# ------------------------------------------------------------------------------------------------
FAMILIES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
            "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
            "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 4,
                                                                 "query_pre_attn_scalar": 24})}


def tiny_family(family, impl):
    config_name, model_name, kw = FAMILIES[family]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config = getattr(transformers, config_name)(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation=impl, **kw)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_more_families_match_sdpa(family, attention_calls, no_fallback_warnings):
    """Qwen2, Phi-3, Gemma 3 (sliding-window layers, its own query scaling): logits by the 2x rule
    and greedy left-padded generate() tokens against sdpa, on the backend dispatch picks."""
    sdpa, fused = same_weights(lambda impl: tiny_family(family, impl), "sdpa", register_hf())
    batch = left_padded()
    with torch.no_grad():
        ref = copy.deepcopy(sdpa).double()(**batch).logits
        base = sdpa(**batch).logits
        out = fused(**batch).logits
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        want, got = sdpa.generate(**batch, **kw), fused.generate(**batch, **kw)
    tokens = batch["attention_mask"].bool()
    assert_2x(f"{family} logits", OP, out[tokens], ref[tokens], base[tokens], torch.float32)
    assert torch.equal(got, want)
    assert len(attention_calls) == 2 * (1 + 5)


def test_soft_capping_models_are_refused_by_name():
    """Gemma 2 soft-caps its attention scores: refused with the argument's name, not computed wrong."""
    if not hasattr(transformers, "Gemma2ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma2ForCausalLM")
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attn_implementation=register_hf())).eval()
    with pytest.raises(ValueError, match="Gemma2Attention passed softcap="):
        model(input_ids=torch.tensor([[3, 4, 5]]))
