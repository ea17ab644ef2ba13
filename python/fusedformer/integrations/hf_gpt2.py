"""Hugging Face GPT-2: ``GPT2Block`` -> :class:`FusedGPT2Block` (``GPT2Model``, ``GPT2LMHeadModel``, ...).

One converted block (pre-LN, causal)::

    h = layer_norm(x)                                                      # ln_1
    q, k, v = c_attn(h).split(C)                                           # Conv1D (weight is (in, out))
    o = c_proj(attention(q, k, v, causal / mask, dropout_p=attn_pdrop))    # the key/value cache is updated first
    h, s = layer_norm(o, residual=x, dropout_p=resid_pdrop, return_residual=True)
                                                                           # s = x + dropout(o); h = ln_2(s)
    y = s + gelu_ffn(h, c_fc.weight.T, c_fc.bias, mlp.c_proj.weight.T, mlp.c_proj.bias, 'tanh', dropout_p=resid_pdrop)

``Conv1D`` stores its weight as (in, out); ``gelu_ffn`` takes the ``nn.Linear`` layout (out, in), so
the two feed-forward weights are passed transposed: the cpu backend reads them as they are (torch's
GEMMs take either layout), the other backends copy each to the (out, in) layout per call. The
submodules, parameters and ``state_dict`` keys are GPT-2's own: only the block's class changes.

Causality follows the model's attention implementation exactly (the model's mask; for "sdpa" and
"fusedformer" without a mask, SDPA's ``is_causal`` rule). Left untouched (reported): blocks with
cross-attention, parts replaced by other classes, attention implementations other than "eager" /
"sdpa" / "fusedformer". At call time the original forward runs (with a ``RuntimeWarning``, once per
reason per model) only for ``output_attentions``, an implementation switched after conversion,
cross-attention inputs, or an argument in ``hf_common.UNHONOURED_ATTENTION_KWARGS``; other keyword
arguments pass through. The key/value cache (``generate()``, dynamic or static) is updated as the
original does. Like ``FusedBertLayer``, the class can be built by transformers itself
(``register_patch_mapping({"^GPT2Block$": FusedGPT2Block})``).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.gpt2 import modeling_gpt2 as mg
from transformers.pytorch_utils import Conv1D

from ..nn._base import dropout_p, linear_gelu_linear, residual_layer_norm
from ..ops.attention import attention
from . import hf_common as hf
from . import registry
from .rules import Rule


class FusedGPT2Block(hf.PatchableLayer, mg.GPT2Block):
    """``transformers`` ``GPT2Block`` on the fused kernels (see the module docstring)."""

    _ff_torch_class = mg.GPT2Block

    def forward(self, hidden_states: Tensor, cache=None, attention_mask: Optional[Tensor] = None,
                encoder_hidden_states: Optional[Tensor] = None, encoder_attention_mask: Optional[Tensor] = None,
                use_cache: Optional[bool] = False, **kwargs) -> Tensor:
        cache = hf.pop_cache(cache, kwargs)
        attn = self.attn
        why = hf.static_reason(self, _unsupported_parts) or hf.runtime_fallback_reason(attn.config, kwargs)
        if why is None and encoder_hidden_states is not None:
            why = "cross-attention inputs were passed"
        if why is not None:
            hf.warn_fallback(self, why, attn.config)
            return super().forward(hidden_states, cache, attention_mask, encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask, use_cache=use_cache, **kwargs)
        x = hidden_states
        B, S, C = x.shape
        H, D = attn.num_heads, attn.head_dim
        h = residual_layer_norm(self.ln_1, x, backend=self.backend)
        q, k, v = attn.c_attn(h).split(attn.split_size, dim=2)
        q, k, v = (t.view(B, S, H, D).transpose(1, 2) for t in (q, k, v))   # (B, H, S, D) views
        if cache is not None:
            layer_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            k, v = layer_cache.update(k, v, attn.layer_idx)
        mask, key_padding_mask = hf.attention_masks(attention_mask, q.dtype)
        causal = hf.is_causal(attn.config, attn.is_causal, kwargs, S, mask)
        if causal and k.shape[2] > S:
            # as transformers' SDPA path does (prefill into an empty static cache): the keys past
            # the queries are all masked by a top-left causal mask
            k, v = k[:, :, :S], v[:, :, :S]
        o = attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_dropout.p if attn.training else 0.0,
                      is_causal=causal, scale=attn.scaling, key_padding_mask=key_padding_mask, backend=self.backend)
        o = attn.c_proj(o.transpose(1, 2).reshape(B, S, C))
        h, s = residual_layer_norm(self.ln_2, o, x, dropout_p(attn.resid_dropout, attn.resid_dropout.training),
                                   return_residual=True, backend=self.backend)
        mlp = self.mlp
        approximate = hf.gelu_kind(mlp.act)
        if approximate is not None:
            f = linear_gelu_linear(h, mlp.c_fc.weight.t(), mlp.c_fc.bias, mlp.c_proj.weight.t(), mlp.c_proj.bias,
                                   approximate, dropout_p(mlp.dropout, mlp.dropout.training), backend=self.backend)
        else:
            f = mlp(h)
        return s + f



def _unsupported(block: mg.GPT2Block) -> Optional[str]:
    return hf.transformers_version_reason() or _unsupported_parts(block) or \
        hf.attn_implementation_reason(block.attn.config)


def _unsupported_parts(block: mg.GPT2Block) -> Optional[str]:
    """What about the block itself (not the call) keeps it off the fused path, or None."""
    if hasattr(block, "crossattention"):
        return "cross-attention layer (add_cross_attention)"
    if type(block.attn) is not mg.GPT2Attention or block.attn.is_cross_attention:
        return f"attn is a {type(block.attn).__qualname__}, not a GPT2Attention self-attention"
    if type(block.mlp) is not mg.GPT2MLP:
        return f"mlp is a {type(block.mlp).__qualname__}, not GPT2MLP"
    for name, conv in (("attn.c_attn", block.attn.c_attn), ("attn.c_proj", block.attn.c_proj),
                       ("mlp.c_fc", block.mlp.c_fc), ("mlp.c_proj", block.mlp.c_proj)):
        if type(conv) is not Conv1D:
            return f"{name} is a {type(conv).__qualname__}, not Conv1D"
    for name in ("ln_1", "ln_2"):
        if type(getattr(block, name)) not in hf.LAYER_NORMS:
            return f"{name} is a {type(getattr(block, name)).__qualname__}, not nn.LayerNorm"
    return None


def _notes(block: mg.GPT2Block) -> list:
    if hf.gelu_kind(block.mlp.act) is None:
        return [f"activation {hf.activation_name(block.mlp.act)} is not a GELU: the MLP runs as plain torch ops "
                "(attention and the residual/dropout/LayerNorm steps are fused)"]
    return []


def rules() -> list:
    return [Rule(mg.GPT2Block, FusedGPT2Block, _unsupported, _notes)]


registry.register(rules())
