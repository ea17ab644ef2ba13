"""Conversion rules for ``torch.nn`` layers (registered with ``registry`` on import)."""
from __future__ import annotations

import functools
from typing import Optional

from torch import nn

from .. import nn as ffnn
from ..nn._base import gelu_approximation
from . import registry
from .rules import ConversionReport, Rule

# nn.TransformerEncoder packs padded batches into nested tensors on its inference fast path; the
# fused layers take padded tensors. convert() turns that path off and remembers the setting here.
_SAVED_NESTED = "_ff_saved_use_nested_tensor"


def _layer_unsupported(layer: nn.Module, fused: type) -> Optional[str]:
    """Why a torch Transformer layer does not convert to ``fused`` (one of the fused layer classes),
    or None: its attentions and norms (named by ``fused``) must be the torch (or fused) classes."""
    for name in fused._ff_attentions:
        attn = getattr(layer, name)
        if type(attn) not in (nn.MultiheadAttention, ffnn.MultiheadAttention):
            return f"{name} is a {type(attn).__qualname__}, not nn.MultiheadAttention"
    for name in fused._ff_norms:
        norm = getattr(layer, name)
        if type(norm) not in (nn.LayerNorm, ffnn.LayerNorm):
            return f"{name} is a {type(norm).__qualname__}, not nn.LayerNorm"
    return None


def _layer_notes(layer: nn.Module) -> list:
    """What of a converted torch Transformer layer's feed-forward stays unfused."""
    if gelu_approximation(layer.activation) is None:
        act = getattr(layer.activation, "__name__", type(layer.activation).__name__)
        return [f"activation {act} is not a GELU: the feed-forward runs as plain torch ops "
                "(attention and the residual/dropout/LayerNorm steps are fused)"]
    if layer.dropout.p > 0.0:
        return [f"in training, the dropout between linear1 and linear2 (p={layer.dropout.p}) keeps the "
                "feed-forward unfused; in eval mode it is one gelu_ffn call"]
    return []


def rules() -> list:
    return [
        Rule(nn.LayerNorm, ffnn.LayerNorm),
        Rule(nn.RMSNorm, ffnn.RMSNorm),
        Rule(nn.MultiheadAttention, ffnn.MultiheadAttention),
        Rule(nn.TransformerEncoderLayer, ffnn.TransformerEncoderLayer,
             functools.partial(_layer_unsupported, fused=ffnn.TransformerEncoderLayer), _layer_notes),
        Rule(nn.TransformerDecoderLayer, ffnn.TransformerDecoderLayer,
             functools.partial(_layer_unsupported, fused=ffnn.TransformerDecoderLayer), _layer_notes),
    ]


def after_convert(model: nn.Module, report: ConversionReport) -> None:
    """Turn off the nested-tensor fast path of encoders whose layers are now fused."""
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False) and \
                any(isinstance(layer, ffnn.TransformerEncoderLayer) for layer in module.layers):
            setattr(module, _SAVED_NESTED, module.use_nested_tensor)
            module.use_nested_tensor = False
            report.notes.append((name, "use_nested_tensor set to False (the fused layers take padded batches)"))


def after_revert(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and _SAVED_NESTED in module.__dict__:
            module.use_nested_tensor = module.__dict__.pop(_SAVED_NESTED)


registry.register(rules(), after_convert, after_revert)
