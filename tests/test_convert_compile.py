"""Converted Hugging Face BERT and GPT-2 under torch.compile(fullgraph=True): one graph, no graph
breaks, the fused ops inside it, in eval and in training (forward and backward), with the same
results as eager.

The compiler backend is "aot_eager": it traces forward and backward through AOTAutograd (the fake
implementations of the fused ops, their autograd formulas) without spending minutes in Inductor's
C++ code generation on this CPU-only machine; ``tests/test_compile.py`` runs Inductor over the ops.
"""
import copy

import pytest
import torch

import fusedformer as ff
from fusedformer.ops import attention as attention_op
from fusedformer.ops import gelu_ffn as gelu_ffn_op
from fusedformer.ops import layer_norm as layer_norm_op

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel  # noqa: E402
from torch._dynamo.backends.registry import lookup_backend  # noqa: E402

FUSED_OPS = ("fusedformer.layer_norm_fwd", "fusedformer.attention_fwd", "fusedformer.gelu_ffn_fwd")


def _bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                     max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = BertForSequenceClassification(cfg)
    model.bert.embeddings.dropout.p = 0.0       # torch's dropout RNG differs between eager and AOT; ours does not
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4, embd_pdrop=0.0,
                     resid_pdrop=0.1, attn_pdrop=0.1, bos_token_id=100, eos_token_id=100)
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 7:] = 0
    return model, {"input_ids": ids, "attention_mask": mask, "use_cache": False}


MODELS = {"bert": _bert, "gpt2": _gpt2}


def _backend_for_ops():
    """The backend the converted model runs on: automatic selection (cpu where built, else reference)."""
    for op in (layer_norm_op, attention_op, gelu_ffn_op):
        if ff.backends.why_unavailable(op, "reference"):
            pytest.skip("the reference backend is unavailable")
    return None


def _step(model, batch):
    out = model(**batch).logits
    loss = (out.float() ** 2).mean()
    if model.training:
        loss.backward()
    return out.detach(), loss.detach()


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_converted_model_compiles_to_one_graph(kind, mode):
    backend = _backend_for_ops()
    model, batch = MODELS[kind]()
    model.train(mode == "train")
    report = ff.convert(model, backend=backend)
    assert report.converted and not report.skipped
    eager_model = copy.deepcopy(model)

    graphs = []
    aot_eager = lookup_backend("aot_eager")

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=recording_backend)   # fullgraph: a break raises
    with torch.set_grad_enabled(mode == "train"):
        torch.manual_seed(11)
        out_c, loss_c = _step(compiled, batch)
        torch.manual_seed(11)
        out_e, loss_e = _step(eager_model, batch)

    assert len(graphs) == 1, f"expected one graph, got {len(graphs)}"
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    for op in FUSED_OPS:
        assert any(op in t for t in targets), f"{op} is not in the compiled graph"

    # same seeds drawn in the graph as in eager: same dropout masks, same results
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-6)
    if mode == "train":
        eager_params = dict(eager_model.named_parameters())
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{name}: no gradient through the compiled graph"
            torch.testing.assert_close(p.grad, eager_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)
