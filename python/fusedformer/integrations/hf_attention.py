"""``attn_implementation="fusedformer"``: ``fusedformer.attention`` behind transformers' attention interface.

transformers 5 routes every model family that is written against its ``AttentionInterface`` (Llama,
Mistral, Qwen2/3, Gemma, Phi-3, GPT-2, BERT, ...) through one call per attention layer::

    attn_output, attn_weights = attention_interface(module, query, key, value, attention_mask,
                                                    dropout=..., scaling=..., **kwargs)

with ``query`` (B, H, Sq, D) and ``key`` / ``value`` (B, Hk, Sk, D) — after rotary embeddings and
the key/value cache update, so Sq < Sk while decoding — and the mask the model built through the
mask function registered under the same name. :func:`register_hf` registers both under
``"fusedformer"``: the attention below, and transformers' own SDPA mask builder (a 4-D bool mask,
True = may attend, with padding, causality, sliding windows and packed sequences in it; or None
where SDPA's ``is_causal`` says the same). So ``from_pretrained(..., attn_implementation="fusedformer")``
computes exactly what ``"sdpa"`` computes, on whatever backend fusedformer's dispatch picks.

What the attention does with the call:

* mask: bool (True = attend) or additive float (cast to the query's dtype), broadcast over heads;
* causal: SDPA's rule in transformers — ``is_causal`` (the call's, else the module's) only when
  there is no mask and more than one query; keys past the queries of an empty static cache are
  dropped as transformers does (they are all masked by a top-left causal mask);
* grouped-query / multi-query attention: ``enable_gqa`` (Hk divides H), no repeated keys;
* ``dropout`` (the model passes 0 in eval mode) with fusedformer's dropout RNG; ``scaling``;
* ``sliding_window``: carried by the mask; should a model pass a window with no mask while the
  keys reach past it, the window is applied here (bottom-right aligned, as while decoding);
* attention probabilities (``output_attentions``): the fused kernel never forms them; they are
  computed a second time in plain PyTorch (before dropout), with a warning once per model.

Refused with an error naming the argument (no silent fallback): ``softcap``, attention sinks
(``s_aux`` / ``sinks``), ``position_bias`` (learned relative attention biases) and head masks —
use ``"eager"`` (the model's own code) for such models.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from ..nn._base import check_backend
from ..ops.attention import attention
from . import hf_common

NAME = "fusedformer"


def register_hf() -> str:
    """Register ``"fusedformer"`` with transformers' ``AttentionInterface`` (and its mask builder
    with ``AttentionMaskInterface``) and return the name, for
    ``AutoModel*.from_pretrained(..., attn_implementation=register_hf())``. Idempotent."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:
        raise ImportError("fusedformer.integrations.register_hf needs transformers >= 5 with its attention "
                          "interface (pip install 'fusedformer[hf]')") from exc
    why = hf_common.transformers_version_reason()
    if why:
        raise ImportError(f"fusedformer.integrations.register_hf: {why}")
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


# ------------------------------------------------------------------------------------------------
# the backend a converted model asked for (convert(model, backend=..., attn_implementation=...))
# ------------------------------------------------------------------------------------------------
_BACKENDS = hf_common.WeakIdMap()    # config -> backend


def set_backend(config, backend: Optional[str]) -> None:
    """Make the attention of layers holding ``config`` run on ``backend`` (None: chosen per call
    by ``use_backend`` / ``FUSEDFORMER_BACKEND`` / automatically). Kept outside the config, whose
    attributes ``save_pretrained`` writes."""
    if backend is None:
        _BACKENDS.pop(config)
        return
    _BACKENDS.set(config, check_backend(backend))


def backend_for(module) -> Optional[str]:
    config = getattr(module, "config", None)
    return _BACKENDS.get(config) if config is not None else None


# ------------------------------------------------------------------------------------------------
# the attention function
# ------------------------------------------------------------------------------------------------
def _refuse(module, kwargs: dict) -> None:
    for name, what in hf_common.UNHONOURED_ATTENTION_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f'attn_implementation="fusedformer": {type(module).__name__} passed {name}= '
                             f"({what}), which fusedformer.attention does not compute; load this model with an "
                             'implementation that does (attn_implementation="eager", the model\'s own code)')


def _window_mask(sliding_window: int, q_len: int, k_len: int, device) -> Tensor:
    """(Sq, Sk) bool, True = attend: causal, bottom-right aligned (query i is position
    k_len - q_len + i), keys less than ``sliding_window`` positions back."""
    qpos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    kpos = torch.arange(k_len, device=device)[None, :]
    return (kpos <= qpos) & (qpos - kpos < sliding_window)


def _probabilities(query: Tensor, key: Tensor, mask: Optional[Tensor], causal: bool, scale: float) -> Tensor:
    """softmax(q k^T * scale + mask) in plain PyTorch, (B, H, Sq, Sk), in the query's dtype; rows
    with every key masked by -inf are 0 (the fused output's convention)."""
    B, H, Sq, D = query.shape
    k = key.repeat_interleave(H // key.shape[1], dim=1) if key.shape[1] != H else key
    s = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    if causal:
        s = s.masked_fill(torch.ones(Sq, k.shape[2], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0).to(query.dtype)


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                      dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      **kwargs) -> tuple[Tensor, Optional[Tensor]]:
    """The ``AttentionInterface`` entry: query (B, H, Sq, D), key / value (B, Hk, Sk, D) ->
    ((B, Sq, H, Dv) output, probabilities or None). See the module docstring."""
    _refuse(module, kwargs)
    H, Sq = query.shape[1], query.shape[2]
    flag = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is not None and not isinstance(mask, Tensor):
        raise TypeError(f'attn_implementation="fusedformer": attention_mask of type {type(mask).__name__} is not '
                        "supported (expected a 4-D bool or additive float tensor, or None); it is built by the "
                        "mask function registered under the same name")
    window = kwargs.get("sliding_window")
    if mask is None and window is not None and Sq > 0 and key.shape[2] > window and flag:
        mask = _window_mask(int(window), Sq, key.shape[2], query.device)
    causal = bool(Sq > 1 and mask is None and flag)
    if causal and key.shape[2] > Sq:
        key, value = key[:, :, :Sq], value[:, :, :Sq]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out = attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling,
                    enable_gqa=k.shape[1] != H, backend=backend_for(module))
    weights = None
    if hf_common.attentions_requested(kwargs):
        if hf_common.FALLBACKS_WARNED.first(getattr(module, "config", None), ("attention_forward", "probabilities")):
            warnings.warn('fusedformer: attn_implementation="fusedformer" with output_attentions: the fused '
                          "kernel never forms the attention probabilities; they are computed a second time in "
                          "plain PyTorch (before dropout) (said once for this model)", RuntimeWarning,
                          stacklevel=2)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scaling is None else scaling
        weights = _probabilities(q, k, mask, causal, scale)
    return out.transpose(1, 2).contiguous(), weights


# ------------------------------------------------------------------------------------------------
# convert(model, attn_implementation="fusedformer") / revert(model)
# ------------------------------------------------------------------------------------------------
_SAVED_IMPL = "_ff_saved_attn_implementation"


def _configs(model) -> list:
    """The distinct transformers configs held by ``model``'s modules."""
    try:
        from transformers import PretrainedConfig
    except ImportError:
        return []
    seen, out = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig) and id(config) not in seen:
            seen.add(id(config))
            out.append(config)
    return out


def _root_models(model) -> list:
    """(name, module) of the outermost transformers ``PreTrainedModel``s in ``model``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    roots = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(name == r or name.startswith(r + ".") if r else True
                                                           for r, _ in roots):
            roots.append((name, module))
    return roots


def apply(model, attn_implementation: Optional[str], backend: Optional[str], report) -> None:
    """``convert``'s part for the attention interface: switch the model to ``"fusedformer"`` when
    asked, and give every config on that implementation the conversion's backend."""
    if attn_implementation is not None:
        if attn_implementation != NAME:
            raise ValueError(f"convert: attn_implementation must be None (keep the model's) or {NAME!r}; got "
                             f"{attn_implementation!r}")
        roots = _root_models(model)
        if not roots:
            raise ValueError(f"convert: attn_implementation={NAME!r} applies to Hugging Face models (a transformers "
                             f"PreTrainedModel); {type(model).__name__} holds none")
        register_hf()
        for name, root in roots:
            before = root.config._attn_implementation
            if before == NAME:
                continue
            root.set_attn_implementation(NAME)
            if root.config._attn_implementation != NAME:
                raise ValueError(f"convert: {type(root).__name__} does not let transformers switch its attention "
                                 f"implementation after loading; load it with from_pretrained(..., "
                                 f"attn_implementation={NAME!r}) after fusedformer.integrations.register_hf()")
            root.__dict__.setdefault(_SAVED_IMPL, before)
            report.notes.append((name, f"attention implementation {before!r} -> {NAME!r} (every attention layer "
                                       "routed through transformers' attention interface runs fusedformer.attention)"))
    for config in _configs(model):
        if getattr(config, "_attn_implementation", None) == NAME:
            set_backend(config, backend)


def restore(model) -> None:
    """``revert``'s part: the attention implementation the model had before ``convert``."""
    for module in list(model.modules()):
        if _SAVED_IMPL in module.__dict__:
            module.set_attn_implementation(module.__dict__.pop(_SAVED_IMPL))
    for config in _configs(model):
        set_backend(config, None)
