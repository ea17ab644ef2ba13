"""The conversion registry: each model family's module registers its rules (and hooks) here when it
is imported; ``convert`` / ``revert`` read them back.

Import graph (no circle): ``rules`` (leaf) <- ``registry`` <- ``torch_nn``, ``hf_bert``, ``hf_gpt2``,
``hf_bart`` <- ``convert``. The registry imports no family: ``convert`` imports the families
(:data:`fusedformer.integrations.convert.FAMILIES`: the Hugging Face ones only when the model's
``transformers`` modules are already loaded), and importing a family registers it.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .rules import ConversionReport, Rule

_RULES: dict[type, Rule] = {}          # source class -> rule, in registration order
_AFTER_CONVERT: list[Callable[[nn.Module, ConversionReport], None]] = []
_AFTER_REVERT: list[Callable[[nn.Module], None]] = []


def register(rules: list, after_convert: Optional[Callable] = None, after_revert: Optional[Callable] = None) -> None:
    """Add a family's rules (a rule for an already registered source replaces it) and its hooks:
    ``after_convert(model, report)`` runs once the whole model is visited, ``after_revert(model)``
    once every fused module has its class back."""
    for rule in rules:
        _RULES[rule.source] = rule
    if after_convert is not None and after_convert not in _AFTER_CONVERT:
        _AFTER_CONVERT.append(after_convert)
    if after_revert is not None and after_revert not in _AFTER_REVERT:
        _AFTER_REVERT.append(after_revert)


def rules() -> dict[type, Rule]:
    """Every registered rule, by source class."""
    return dict(_RULES)


def after_convert(model: nn.Module, report: ConversionReport) -> None:
    for hook in _AFTER_CONVERT:
        hook(model, report)


def after_revert(model: nn.Module) -> None:
    for hook in _AFTER_REVERT:
        hook(model)
