"""Hugging Face BERT: ``BertLayer`` -> :class:`FusedBertLayer` (any ``BertModel`` and its heads).

One converted layer (post-LN)::

    q, k, v = query(x), key(x), value(x)                                   # three nn.Linear, as in BERT
    c = attention(q, k, v, mask, dropout_p=attention_probs_dropout_prob)   # padding mask from the model
    a = layer_norm(dense(c), residual=x, dropout_p=hidden_dropout_prob)    # attention.output, fused
    f = gelu_ffn(a, intermediate.dense, output.dense, approximate)         # exact GELU for hidden_act='gelu'
    y = layer_norm(f, residual=a, dropout_p=hidden_dropout_prob)           # output, fused

The submodules, parameters and ``state_dict`` keys are BERT's own: only the layer's class changes.

Decoder layers (``is_decoder``: causal self-attention with a key/value cache; ``add_cross_attention``:
cross-attention over the encoder's states) take the fused path of ``hf_bert_decoder``.

Left untouched (reported): layers whose parts were replaced by other classes, relative position
embeddings, attention implementations other than "eager" / "sdpa" / "fusedformer". At call time the
original forward runs (with a ``RuntimeWarning``, once per reason per model) only for what the fused
path cannot compute as the original would: attention probabilities (``output_attentions``), an
attention implementation switched after conversion, cross-attention inputs or a cache given to an
encoder layer, or an argument in ``hf_common.UNHONOURED_ATTENTION_KWARGS``. Other keyword arguments
(``Trainer``'s ``num_items_in_batch``, ``position_ids``, ...) do not change the original's attention
and pass through.

The class can also be built by transformers itself (``register_patch_mapping({"^BertLayer$":
FusedBertLayer})``, see ``docs/modules.md``): it then has no backend of its own (chosen per call) and
checks its parts on its first call.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from transformers.models.bert import modeling_bert as mb

from ..nn._base import dropout_p, linear_gelu_linear, residual_layer_norm
from ..ops.attention import attention
from . import hf_bert_decoder
from . import hf_common as hf
from . import registry
from .rules import Rule


class FusedBertLayer(hf.PatchableLayer, mb.BertLayer):
    """``transformers`` ``BertLayer`` on the fused kernels (see the module docstring)."""

    _ff_torch_class = mb.BertLayer

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                encoder_hidden_states: Optional[Tensor] = None, encoder_attention_mask: Optional[Tensor] = None,
                cache=None, **kwargs) -> Tensor:
        cache = hf.pop_cache(cache, kwargs)
        sa = self.attention.self
        why = hf.static_reason(self, _unsupported_parts) or hf.runtime_fallback_reason(sa.config, kwargs)
        if why is None and not self.is_decoder and (encoder_hidden_states is not None or cache is not None):
            why = "cross-attention inputs or a key/value cache were passed to an encoder layer"
        if why is not None:
            hf.warn_fallback(self, why, sa.config)
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   cache, **kwargs)
        if self.is_decoder:  # causal self-attention with a cache, cross-attention (hf_bert_decoder)
            return hf_bert_decoder.decoder_forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                                   encoder_attention_mask, cache, kwargs, self.backend)
        x = hidden_states
        B, S, _ = x.shape
        H, D = sa.num_attention_heads, sa.attention_head_size
        # (B, S, H*D) projections viewed as (B, H, S, D): no copies
        q = sa.query(x).view(B, S, H, D).transpose(1, 2)
        k = sa.key(x).view(B, S, H, D).transpose(1, 2)
        v = sa.value(x).view(B, S, H, D).transpose(1, 2)
        mask, key_padding_mask = hf.attention_masks(attention_mask, q.dtype)
        causal = hf.is_causal(sa.config, sa.is_causal, kwargs, S, mask)
        ctx = attention(q, k, v, attn_mask=mask, dropout_p=sa.dropout.p if sa.training else 0.0, is_causal=causal,
                        scale=sa.scaling, key_padding_mask=key_padding_mask, backend=self.backend)
        ctx = ctx.transpose(1, 2).reshape(B, S, H * D)

        so = self.attention.output
        a = residual_layer_norm(so.LayerNorm, so.dense(ctx), x, dropout_p(so.dropout, so.training),
                                backend=self.backend)
        inter, out = self.intermediate, self.output
        approximate = hf.gelu_kind(inter.intermediate_act_fn)
        if approximate is not None:
            f = linear_gelu_linear(a, inter.dense.weight, inter.dense.bias, out.dense.weight, out.dense.bias,
                                   approximate, backend=self.backend)
        else:
            f = out.dense(inter(a))
        return residual_layer_norm(out.LayerNorm, f, a, dropout_p(out.dropout, out.training), backend=self.backend)



def _unsupported(layer: mb.BertLayer) -> Optional[str]:
    return hf.transformers_version_reason() or _unsupported_parts(layer) or \
        hf.attn_implementation_reason(hf.layer_config(layer))


def _unsupported_parts(layer: mb.BertLayer) -> Optional[str]:
    """What about the layer itself (not the call) keeps it off the fused path, or None."""
    why = hf_bert_decoder.decoder_parts_reason(layer)   # the cross-attention's parts, if any
    if why:
        return why
    sa = layer.attention.self if isinstance(layer.attention, mb.BertAttention) else None
    parts = {"attention": (layer.attention, mb.BertAttention), "attention.self": (sa, mb.BertSelfAttention),
             "attention.output": (getattr(layer.attention, "output", None), mb.BertSelfOutput),
             "intermediate": (layer.intermediate, mb.BertIntermediate), "output": (layer.output, mb.BertOutput)}
    for name, (module, cls) in parts.items():
        if type(module) is not cls:
            return f"{name} is a {type(module).__qualname__}, not {cls.__qualname__}"
    if hasattr(sa, "distance_embedding") or getattr(sa, "position_embedding_type", "absolute") != "absolute":
        return "relative position embeddings in the attention scores"
    for name, linear in (("attention.self.query", sa.query), ("attention.self.key", sa.key),
                         ("attention.self.value", sa.value), ("attention.output.dense", layer.attention.output.dense),
                         ("intermediate.dense", layer.intermediate.dense), ("output.dense", layer.output.dense)):
        if type(linear) is not nn.Linear:
            return f"{name} is a {type(linear).__qualname__}, not nn.Linear"
    for name, norm in (("attention.output.LayerNorm", layer.attention.output.LayerNorm),
                       ("output.LayerNorm", layer.output.LayerNorm)):
        if type(norm) not in hf.LAYER_NORMS:
            return f"{name} is a {type(norm).__qualname__}, not nn.LayerNorm"
    return None


def _notes(layer: mb.BertLayer) -> list:
    notes = []
    act = layer.intermediate.intermediate_act_fn
    if hf.gelu_kind(act) is None:
        notes.append(f"activation {hf.activation_name(act)} is not a GELU: intermediate/output dense run as "
                     "plain torch ops (attention and the residual/dropout/LayerNorm steps are fused)")
    if getattr(layer, "chunk_size_feed_forward", 0):
        notes.append("chunk_size_feed_forward is ignored: the fused feed-forward runs in one call (same result)")
    return notes


def rules() -> list:
    return [Rule(mb.BertLayer, FusedBertLayer, _unsupported, _notes)]


registry.register(rules())
