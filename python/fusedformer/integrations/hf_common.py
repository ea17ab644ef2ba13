"""What the Hugging Face layer converters share: masks, causality, activations and the runtime
checks that send a call back to the original forward.

Written against the ``transformers`` 5 layer API (layers receive the 4-D mask the model built for
its attention implementation, and return a tensor). Imported only when ``transformers`` is.

When a converted layer runs the original forward: only when the call asks for something the fused
path cannot compute exactly as the original would. The original layer hands its keyword arguments
to its attention function; for "eager" and "sdpa" the math of that function depends on the 4-D
mask, ``is_causal`` (both honoured), and the few arguments in :data:`UNHONOURED_ATTENTION_KWARGS`.
Every other keyword (``num_items_in_batch`` from ``Trainer``, ``position_ids``, ``cache_position``,
``cu_seq_lens_*`` — which only the flash-attention implementations read — and whatever a new
release adds) is ignored by the original's attention, so the fused path ignores it too and the
result is the same. A fallback is announced once per reason per model (see :func:`warn_fallback`).
"""
from __future__ import annotations

import functools
import warnings
import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from .. import nn as ffnn
from ..nn._base import FusedModule, gelu_approximation

# The LayerNorm classes a converted layer's norms may be (torch's, or already fused).
LAYER_NORMS = (nn.LayerNorm, ffnn.LayerNorm)

# Attention implementations whose masks the fused layers understand: a 4-D bool mask (True = may
# attend: "sdpa", and "fusedformer", which registers transformers' SDPA mask builder) or a 4-D
# additive float mask ("eager"), or None.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "fusedformer")

# Keyword arguments an attention function of transformers reads that change its result, and that
# the fused attention does not compute (a call with any of them not None runs the original forward,
# or, through attn_implementation="fusedformer", is refused with this explanation).
UNHONOURED_ATTENTION_KWARGS = {
    "position_bias": "an additive position bias in the attention scores (relative attention)",
    "softcap": "soft-capping of the attention scores",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "head_mask": "a head mask",
    "layer_head_mask": "a head mask",
}


@functools.lru_cache(maxsize=None)
def transformers_version_reason() -> Optional[str]:
    import transformers
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        return (f"transformers {transformers.__version__} is installed; the fused layers follow the "
                "transformers 5 layer API")
    return None


def attn_implementation_reason(config) -> Optional[str]:
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ATTN_IMPLEMENTATIONS:
        return f"attention implementation {impl!r} (supported: {', '.join(ATTN_IMPLEMENTATIONS)})"
    return None


def _attentions_collector():
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers version without the output-capturing hooks
        return None
    return _active_collector


def attentions_requested(kwargs: dict) -> bool:
    """Whether the model was asked for attention probabilities (``output_attentions``). They are
    recorded by hooks on the attention modules, which the fused forward does not call."""
    if kwargs.get("output_attentions"):
        return True
    collector = _attentions_collector()
    collected = collector.get() if collector is not None else None
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


def unhonoured_kwargs_reason(kwargs: dict) -> Optional[str]:
    """The keyword arguments of this call that change the attention and that the fused attention
    does not compute, as a reason, or None."""
    asked = sorted(k for k in UNHONOURED_ATTENTION_KWARGS if kwargs.get(k) is not None)
    if not asked:
        return None
    return "; ".join(f"{k}= ({UNHONOURED_ATTENTION_KWARGS[k]})" for k in asked) + " was passed"


def runtime_fallback_reason(config, kwargs: dict) -> Optional[str]:
    """Why this call cannot take the fused path (then the original forward runs), or None: the
    attention implementation, attention probabilities requested, or an argument that changes the
    attention in a way the fused kernel does not compute. Other keyword arguments pass through."""
    why = attn_implementation_reason(config)
    if why:
        return why
    if attentions_requested(kwargs):
        return "output_attentions was requested (the fused kernel never forms the probabilities)"
    return unhonoured_kwargs_reason(kwargs)


class WeakIdMap:
    """A value per live object, by identity, without keeping the object alive or touching its
    attributes (a config's attributes are what ``save_pretrained`` writes)."""

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, object]] = {}

    def get(self, owner, default=None):
        entry = self._entries.get(id(owner))
        return entry[1] if entry is not None and entry[0]() is owner else default

    def set(self, owner, value) -> None:
        k = id(owner)

        def forget(ref, k=k):
            if self._entries.get(k, (None,))[0] is ref:
                del self._entries[k]
        self._entries[k] = (weakref.ref(owner, forget), value)

    def pop(self, owner) -> None:
        self._entries.pop(id(owner), None)


class _OncePerOwner:
    """Remembers, per live object (a model's config, shared by its layers), which messages were
    already given (a :class:`WeakIdMap` of sets)."""

    def __init__(self):
        self._seen = WeakIdMap()

    def first(self, owner, key) -> bool:
        """True the first time ``key`` is seen for ``owner``."""
        if owner is None:
            return True
        seen = self._seen.get(owner)
        if seen is None:
            seen = set()
            self._seen.set(owner, seen)
        if key in seen:
            return False
        seen.add(key)
        return True


FALLBACKS_WARNED = _OncePerOwner()


def layer_config(layer):
    """The transformers config a layer's parts hold (the model's config, shared by its layers)."""
    for module in layer.modules():
        config = getattr(module, "config", None)
        if config is not None:
            return config
    return None


def warn_fallback(layer, why: str, config=None) -> None:
    """Announce that ``layer`` runs its original forward, once per reason per model (the model is
    known by ``config``, default: the config the layer's parts hold)."""
    config = layer_config(layer) if config is None else config
    if FALLBACKS_WARNED.first(config, (type(layer).__name__, why)):
        warnings.warn(f"fusedformer: {type(layer).__name__}: {why}; running the original (unfused) forward "
                      "(said once per reason for this model)", RuntimeWarning, stacklevel=3)


def static_reason(layer, unsupported) -> Optional[str]:
    """Why ``layer`` cannot run fused whatever the call (its parts, its kind), decided once per layer:
    None for a layer ``convert`` adopted (it checked), ``unsupported(layer)`` for one transformers
    built from the fused class itself (``transformers.monkey_patching.register_patch_mapping``)."""
    d = layer.__dict__
    if "_ff_static_reason" not in d:
        d["_ff_static_reason"] = unsupported(layer)
    return d["_ff_static_reason"]


class PatchableLayer(FusedModule):
    """A fused layer class that transformers may also build itself
    (``transformers.monkey_patching.register_patch_mapping``): such a layer has no backend of its
    own (chosen per call) and checks its parts on its first call (:func:`static_reason`); a layer
    ``convert`` adopted has the conversion's backend and was checked then."""

    _ff_attributes = ("backend", "_ff_static_reason")
    backend = None

    @classmethod
    def _ff_adopt(cls, module, backend):
        module = super()._ff_adopt(module, backend)
        module._ff_static_reason = None      # convert() checked the parts
        return module


def pop_cache(cache, kwargs: dict):
    """The key/value cache a layer was given, under transformers' current name (``cache``) or the
    one before it (``past_key_values``, deprecated in 5.x)."""
    old = kwargs.pop("past_key_values", None)
    return cache if cache is not None else old


def attention_masks(mask, dtype: torch.dtype) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The mask a transformers layer receives -> ``(attn_mask, key_padding_mask)`` for
    ``fusedformer.attention``. 4-D bool (True = attend) and 4-D additive masks pass through (an
    additive mask is cast to the activations' dtype); a 2-D (B, Sk) padding mask (1 = token)
    becomes a key padding mask."""
    if mask is None:
        return None, None
    if not isinstance(mask, Tensor):
        raise TypeError(f"fusedformer: attention mask of type {type(mask).__name__} is not supported by the "
                        "fused layers (expected a tensor or None)")
    if mask.dim() == 4:
        if mask.dtype == torch.bool:
            return mask, None
        if mask.is_floating_point():
            return mask.to(dtype), None
    elif mask.dim() == 2:
        return None, mask == 0
    raise TypeError(f"fusedformer: attention mask of shape {tuple(mask.shape)} and dtype {mask.dtype} is not "
                    "supported by the fused layers (expected 4-D bool or additive float, or 2-D padding)")


def is_causal(config, module_is_causal: bool, kwargs: dict, q_len: int, mask: Optional[Tensor]) -> bool:
    """Causality exactly as the model's attention implementation applies it: "eager" relies on the
    mask alone; "sdpa" (and "fusedformer", which builds the same masks) adds SDPA's ``is_causal``
    when there is no mask and more than one query (the rule of
    ``transformers.integrations.sdpa_attention``)."""
    if config._attn_implementation not in ("sdpa", "fusedformer"):
        return False
    flag = kwargs.get("is_causal")
    flag = module_is_causal if flag is None else flag
    return q_len > 1 and mask is None and bool(flag)


def gelu_kind(act) -> Optional[str]:
    """``'none'`` / ``'tanh'`` for the transformers GELU activations ``gelu_ffn`` computes, else None."""
    from transformers import activations as A
    exact = (A.GELUActivation,)
    tanh = tuple(getattr(A, n) for n in ("NewGELUActivation", "GELUTanh", "FastGELUActivation",
                                         "AccurateGELUActivation") if hasattr(A, n))
    if type(act) in exact:
        return "none"
    if type(act) in tanh:
        return "tanh"
    return gelu_approximation(act)


def activation_name(act) -> str:
    return getattr(act, "__name__", type(act).__name__)
