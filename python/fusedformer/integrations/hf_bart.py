"""Hugging Face BART: ``BartEncoderLayer`` -> :class:`FusedBartEncoderLayer` and ``BartDecoderLayer`` ->
:class:`FusedBartDecoderLayer` (``BartModel``, ``BartForConditionalGeneration``, ``BartForCausalLM``, ...).

BART is post-LN with exact GELU. One converted encoder layer::

    a = out_proj(attention(q_proj(x), k_proj(x), v_proj(x), padding mask, dropout_p=attention_dropout))
    h = layer_norm(a, residual=x, dropout_p=dropout)                       # self_attn_layer_norm
    f = gelu_ffn(h, fc1, fc2, approximate)                                 # exact GELU for 'gelu'
    y = layer_norm(f, residual=h, dropout_p=dropout)                       # final_layer_norm

One converted decoder layer (queries of the target length Sq, keys of the source length Sk)::

    a = self_attn(x)         causal (the model's mask, or SDPA's is_causal rule), key/value cache
    h = layer_norm(a, residual=x, dropout_p=dropout)                       # self_attn_layer_norm
    c = encoder_attn(h, encoder_hidden_states)   cross-attention, Sq != Sk, the source's padding mask
    h = layer_norm(c, residual=h, dropout_p=dropout)                       # encoder_attn_layer_norm
    y = layer_norm(gelu_ffn(h), residual=h, dropout_p=dropout)             # final_layer_norm

The attention follows ``BartAttention.forward`` step by step (projections, the self- and
cross-attention caches of an ``EncoderDecoderCache``), with ``fusedformer.attention`` in place of the
attention interface. The submodules, parameters and ``state_dict`` keys are BART's own: only the
layers' classes change. The embedding LayerNorms (``layernorm_embedding``) are plain
``nn.LayerNorm`` modules and convert through the ``torch.nn`` rule.

Left untouched (reported): layers whose parts were replaced by other classes, attention
implementations other than "eager" / "sdpa". The feed-forward runs as plain torch ops (the rest
fused, noted in the report) for an activation that is not a GELU, and, in training, when
``activation_dropout`` > 0 (a dropout *between* fc1 and fc2, which ``gelu_ffn`` does not have). At
call time the original forward runs (with a ``RuntimeWarning``) when attention probabilities are
requested (``output_attentions``), when the attention implementation was switched after conversion,
or for keyword arguments that change the attention.

Masks: HF BART builds 4-D additive masks with ``finfo.min`` ("eager") or bool masks ("sdpa"); they
are passed to ``fusedformer.attention`` as they are (the padding of the source is the
cross-attention's mask). A query row whose every key is masked (left-padded decoder inputs, a
fully padded source) attends uniformly under a ``finfo.min`` mask, as HF's eager softmax does
(``docs/semantics.md``; tested on left-padded decoder inputs).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.bart import modeling_bart as mb

from ..nn._base import FusedModule, dropout_p, linear_gelu_linear, residual_layer_norm
from ..ops.attention import attention
from . import hf_common as hf
from . import registry
from .rules import Rule


def bart_attention(attn: mb.BartAttention, hidden_states: Tensor, key_value_states: Optional[Tensor],
                   attention_mask: Optional[Tensor], cache, kwargs: dict, backend: Optional[str]) -> Tensor:
    """``BartAttention.forward`` on ``fusedformer.attention``: (B, Sq, C) queries from
    ``hidden_states``, keys/values from ``key_value_states`` (cross-attention, (B, Sk, C)) or from
    ``hidden_states`` (self-attention), the cache updated exactly as BART updates it. Returns the
    ``out_proj`` output (B, Sq, C)."""
    B, Sq, _ = hidden_states.shape
    H, D = attn.num_heads, attn.head_dim
    q = attn.q_proj(hidden_states).view(B, Sq, H, D).transpose(1, 2)       # (B, H, Sq, D) view
    is_cross = key_value_states is not None
    current, is_updated = None, False
    if cache is not None:
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(attn.layer_idx)
            current = cache.cross_attention_cache if is_cross else cache.self_attention_cache
        else:
            current = cache
    if is_cross and cache is not None and is_updated:
        # later generation steps: the encoder's keys and values are already cached
        k, v = current.layers[attn.layer_idx].keys, current.layers[attn.layer_idx].values
    else:
        source = key_value_states if is_cross else hidden_states
        Sk = source.shape[1]
        k = attn.k_proj(source).view(B, Sk, H, D).transpose(1, 2)          # (B, H, Sk, D)
        v = attn.v_proj(source).view(B, Sk, H, D).transpose(1, 2)
        if cache is not None:
            k, v = current.update(k, v, attn.layer_idx, kwargs=kwargs)
            if is_cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[attn.layer_idx] = True
    mask, key_padding_mask = hf.attention_masks(attention_mask, q.dtype)
    causal = hf.is_causal(attn.config, attn.is_causal, kwargs, Sq, mask)
    if causal and k.shape[2] > Sq:
        # as transformers' SDPA path does (prefill into an empty static cache): the keys past the
        # queries are all masked by a top-left causal mask
        k, v = k[:, :, :Sq], v[:, :, :Sq]
    o = attention(q, k, v, attn_mask=mask, dropout_p=attn.dropout if attn.training else 0.0, is_causal=causal,
                  scale=attn.scaling, key_padding_mask=key_padding_mask, backend=backend)
    return attn.out_proj(o.transpose(1, 2).reshape(B, Sq, H * D))


def _feed_forward(layer, h: Tensor, backend: Optional[str]) -> Tensor:
    """``fc2(dropout(act(fc1(h)), activation_dropout))``: one ``gelu_ffn`` call when the activation
    is a GELU and the inner dropout is inactive, else the plain torch ops."""
    approximate = hf.gelu_kind(layer.activation_fn)
    p_inner = dropout_p(layer.activation_dropout, layer.training)
    if approximate is not None and p_inner == 0.0:
        return linear_gelu_linear(h, layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias,
                                  approximate, backend=backend)
    f = F.dropout(layer.activation_fn(layer.fc1(h)), p=layer.activation_dropout, training=layer.training)
    return layer.fc2(f)


def _clamp_fp16(h: Tensor) -> Tensor:
    """What BART's encoder layer does to float16 overflow."""
    if h.dtype == torch.float16 and not torch.isfinite(h).all():
        clamp = torch.finfo(h.dtype).max - 1000
        h = torch.clamp(h, min=-clamp, max=clamp)
    return h


class FusedBartEncoderLayer(FusedModule, mb.BartEncoderLayer):
    """``transformers`` ``BartEncoderLayer`` on the fused kernels (see the module docstring)."""

    _ff_torch_class = mb.BartEncoderLayer

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        why = hf.runtime_fallback_reason(self.self_attn.config, kwargs)
        if why is not None:
            hf.warn_fallback(self, why)
            return super().forward(hidden_states, attention_mask, **kwargs)
        x = hidden_states
        p = dropout_p(self.dropout, self.training)
        a = bart_attention(self.self_attn, x, None, attention_mask, None, kwargs, self.backend)
        h = residual_layer_norm(self.self_attn_layer_norm, a, x, p, backend=self.backend)
        f = _feed_forward(self, h, self.backend)
        return _clamp_fp16(residual_layer_norm(self.final_layer_norm, f, h, p, backend=self.backend))


class FusedBartDecoderLayer(FusedModule, mb.BartDecoderLayer):
    """``transformers`` ``BartDecoderLayer`` on the fused kernels (see the module docstring)."""

    _ff_torch_class = mb.BartDecoderLayer

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                encoder_hidden_states: Optional[Tensor] = None, encoder_attention_mask: Optional[Tensor] = None,
                cache=None, use_cache: Optional[bool] = True, **kwargs) -> Tensor:
        if cache is None:  # the name before transformers 5.x renamed it (deprecated)
            cache = kwargs.pop("past_key_values", None)
        why = hf.runtime_fallback_reason(self.self_attn.config, kwargs)
        if why is not None:
            hf.warn_fallback(self, why)
            return super().forward(hidden_states, attention_mask, encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask, cache=cache, use_cache=use_cache,
                                   **kwargs)
        x = hidden_states
        p = dropout_p(self.dropout, self.training)
        a = bart_attention(self.self_attn, x, None, attention_mask, cache, kwargs, self.backend)
        h = residual_layer_norm(self.self_attn_layer_norm, a, x, p, backend=self.backend)
        if encoder_hidden_states is not None:
            c = bart_attention(self.encoder_attn, h, encoder_hidden_states, encoder_attention_mask, cache, kwargs,
                               self.backend)
            h = residual_layer_norm(self.encoder_attn_layer_norm, c, h, p, backend=self.backend)
        f = _feed_forward(self, h, self.backend)
        return residual_layer_norm(self.final_layer_norm, f, h, p, backend=self.backend)


def _attention_unsupported(name: str, attn) -> Optional[str]:
    if type(attn) is not mb.BartAttention:
        return f"{name} is a {type(attn).__qualname__}, not BartAttention"
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        linear = getattr(attn, proj)
        if type(linear) is not nn.Linear:
            return f"{name}.{proj} is a {type(linear).__qualname__}, not nn.Linear"
    return None


def _unsupported(layer) -> Optional[str]:
    why = hf.transformers_version_reason()
    if why:
        return why
    attentions = [("self_attn", layer.self_attn)]
    norms = ["self_attn_layer_norm", "final_layer_norm"]
    if isinstance(layer, mb.BartDecoderLayer):
        attentions.append(("encoder_attn", layer.encoder_attn))
        norms.append("encoder_attn_layer_norm")
    for name, attn in attentions:
        why = _attention_unsupported(name, attn)
        if why:
            return why
    for name in ("fc1", "fc2"):
        if type(getattr(layer, name)) is not nn.Linear:
            return f"{name} is a {type(getattr(layer, name)).__qualname__}, not nn.Linear"
    for name in norms:
        if type(getattr(layer, name)) not in hf.LAYER_NORMS:
            return f"{name} is a {type(getattr(layer, name)).__qualname__}, not nn.LayerNorm"
    return hf.attn_implementation_reason(layer.self_attn.config)


def _notes(layer) -> list:
    if hf.gelu_kind(layer.activation_fn) is None:
        return [f"activation {hf.activation_name(layer.activation_fn)} is not a GELU: fc1/fc2 run as plain torch "
                "ops (attention and the residual/dropout/LayerNorm steps are fused)"]
    if layer.activation_dropout > 0.0:
        return [f"in training, activation_dropout={layer.activation_dropout} (between fc1 and fc2) keeps the "
                "feed-forward unfused; in eval mode it is one gelu_ffn call"]
    return []


def rules() -> list:
    return [Rule(mb.BartEncoderLayer, FusedBartEncoderLayer, _unsupported, _notes),
            Rule(mb.BartDecoderLayer, FusedBartDecoderLayer, _unsupported, _notes)]


registry.register(rules())
