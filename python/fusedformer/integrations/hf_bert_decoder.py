"""Hugging Face BERT used as a decoder (``is_decoder=True``, optionally ``add_cross_attention=True``):
the fused forward of such a ``BertLayer`` (called by :class:`~fusedformer.integrations.hf_bert.FusedBertLayer`).

One converted decoder layer (post-LN)::

    c = attention(query(x), key(x), value(x), causal mask, cache)          # causal self-attention; the
                                                                           # key/value cache updated as BERT does
    a = layer_norm(attention.output.dense(c), residual=x, dropout_p)
    e = attention(query(a), key(enc), value(enc), encoder padding mask)    # crossattention: Sq != Sk
    a = layer_norm(crossattention.output.dense(e), residual=a, dropout_p)
    y = layer_norm(gelu_ffn(a), residual=a, dropout_p)

Causality is the model's own: the 4-D mask ``create_causal_mask`` built, or SDPA's ``is_causal`` rule
when there is none. With an ``EncoderDecoderCache`` the cross-attention keys and values are computed
once and reused on later generation steps, as ``BertCrossAttention`` does.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.bert import modeling_bert as mb

from ..nn._base import dropout_p, linear_gelu_linear, residual_layer_norm
from ..ops.attention import attention
from . import hf_common as hf


def decoder_parts_reason(layer: mb.BertLayer) -> Optional[str]:
    """For a decoder layer with cross-attention: why its cross-attention parts keep it off the fused
    path (another class than BERT's), or None. Other layers: None."""
    if not (getattr(layer, "add_cross_attention", False) or hasattr(layer, "crossattention")):
        return None
    ca = getattr(layer, "crossattention", None)
    if type(ca) is not mb.BertAttention or not getattr(ca, "is_cross_attention", False):
        return f"crossattention is a {type(ca).__qualname__}, not a cross-attention BertAttention"
    if type(ca.self) is not mb.BertCrossAttention:
        return f"crossattention.self is a {type(ca.self).__qualname__}, not BertCrossAttention"
    if type(ca.output) is not mb.BertSelfOutput:
        return f"crossattention.output is a {type(ca.output).__qualname__}, not BertSelfOutput"
    for name in ("query", "key", "value"):
        if type(getattr(ca.self, name)) is not nn.Linear:
            return f"crossattention.self.{name} is a {type(getattr(ca.self, name)).__qualname__}, not nn.Linear"
    if type(ca.output.dense) is not nn.Linear:
        return f"crossattention.output.dense is a {type(ca.output.dense).__qualname__}, not nn.Linear"
    if type(ca.output.LayerNorm) not in hf.LAYER_NORMS:
        return f"crossattention.output.LayerNorm is a {type(ca.output.LayerNorm).__qualname__}, not nn.LayerNorm"
    return None


def _heads(linear: nn.Linear, x: Tensor, H: int, D: int) -> Tensor:
    """(B, S, H*D) projection -> a (B, H, S, D) view."""
    B, S, _ = x.shape
    return linear(x).view(B, S, H, D).transpose(1, 2)


def _attend(sa, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], kwargs: dict, causal_allowed: bool,
            backend: Optional[str]) -> Tensor:
    B, H, Sq, D = q.shape
    attn_mask, key_padding_mask = hf.attention_masks(mask, q.dtype)
    causal = causal_allowed and hf.is_causal(sa.config, sa.is_causal, kwargs, Sq, attn_mask)
    if causal and k.shape[2] > Sq:
        # prefill into an empty static cache: the keys past the queries are masked by a top-left causal mask
        k, v = k[:, :, :Sq], v[:, :, :Sq]
    ctx = attention(q, k, v, attn_mask=attn_mask, dropout_p=sa.dropout.p if sa.training else 0.0, is_causal=causal,
                    scale=sa.scaling, key_padding_mask=key_padding_mask, backend=backend)
    return ctx.transpose(1, 2).reshape(B, Sq, H * D)


def decoder_forward(layer: mb.BertLayer, hidden_states: Tensor, attention_mask: Optional[Tensor],
                    encoder_hidden_states: Optional[Tensor], encoder_attention_mask: Optional[Tensor], cache,
                    kwargs: dict, backend: Optional[str]) -> Tensor:
    """``BertLayer.forward`` of a decoder layer on the fused ops (see the module docstring). The
    caller has decided that the call can take the fused path."""
    x = hidden_states
    sa = layer.attention.self
    H, D = sa.num_attention_heads, sa.attention_head_size
    q, k, v = _heads(sa.query, x, H, D), _heads(sa.key, x, H, D), _heads(sa.value, x, H, D)
    if cache is not None:
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        k, v = self_cache.update(k, v, sa.layer_idx, kwargs=kwargs)
    ctx = _attend(sa, q, k, v, attention_mask, kwargs, True, backend)
    so = layer.attention.output
    a = residual_layer_norm(so.LayerNorm, so.dense(ctx), x, dropout_p(so.dropout, so.training), backend=backend)

    if encoder_hidden_states is not None:
        if not hasattr(layer, "crossattention"):
            raise ValueError(f"If `encoder_hidden_states` are passed, {layer} has to be instantiated with "
                             "cross-attention layers by setting `config.add_cross_attention=True`")
        ca = layer.crossattention.self
        H, D = ca.num_attention_heads, ca.attention_head_size
        q = _heads(ca.query, a, H, D)
        if cache is not None and cache.is_updated.get(ca.layer_idx):
            cached = cache.cross_attention_cache.layers[ca.layer_idx]
            k, v = cached.keys, cached.values
        else:
            k, v = _heads(ca.key, encoder_hidden_states, H, D), _heads(ca.value, encoder_hidden_states, H, D)
            if cache is not None:
                k, v = cache.cross_attention_cache.update(k, v, ca.layer_idx)
                cache.is_updated[ca.layer_idx] = True
        ctx = _attend(ca, q, k, v, encoder_attention_mask, kwargs, False, backend)
        co = layer.crossattention.output
        a = residual_layer_norm(co.LayerNorm, co.dense(ctx), a, dropout_p(co.dropout, co.training), backend=backend)

    inter, out = layer.intermediate, layer.output
    approximate = hf.gelu_kind(inter.intermediate_act_fn)
    if approximate is not None:
        f = linear_gelu_linear(a, inter.dense.weight, inter.dense.bias, out.dense.weight, out.dense.bias,
                               approximate, backend=backend)
    else:
        f = out.dense(inter(a))
    return residual_layer_norm(out.LayerNorm, f, a, dropout_p(out.dropout, out.training), backend=backend)
