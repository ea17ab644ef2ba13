"""What the Hugging Face layer converters share: masks, causality, activations and the runtime
checks that send a call back to the original forward.

Written against the ``transformers`` 5 layer API (layers receive the 4-D mask the model built for
its attention implementation, and return a tensor). Imported only when ``transformers`` is.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from ..nn._base import gelu_approximation

# Attention implementations whose masks the fused layers understand: a 4-D bool mask (True = may
# attend, "sdpa") or a 4-D additive float mask ("eager"), or None.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")

# Keyword arguments a layer may receive that do not change what its attention computes.
HARMLESS_KWARGS = frozenset({"position_ids", "output_attentions", "output_hidden_states", "return_dict",
                             "use_cache", "cache_position", "is_causal"})


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


def runtime_fallback_reason(config, kwargs: dict) -> Optional[str]:
    """Why this call cannot take the fused path (then the original forward runs), or None."""
    why = attn_implementation_reason(config)
    if why:
        return why
    if attentions_requested(kwargs):
        return "output_attentions was requested (the fused kernel never forms the probabilities)"
    unknown = sorted(k for k, v in kwargs.items() if k not in HARMLESS_KWARGS and v is not None)
    if unknown:
        return f"unsupported keyword arguments {unknown}"
    return None


def warn_fallback(layer, why: str) -> None:
    warnings.warn(f"fusedformer: {type(layer).__name__}: {why}; running the original (unfused) forward",
                  RuntimeWarning, stacklevel=3)


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
    mask alone; "sdpa" adds SDPA's ``is_causal`` when there is no mask and more than one query
    (the rule of ``transformers.integrations.sdpa_attention``)."""
    if config._attn_implementation != "sdpa":
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
