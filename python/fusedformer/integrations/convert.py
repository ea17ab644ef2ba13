"""``convert()`` / ``revert()``: swap supported layers of an existing model for fused ones, in place.

How it works: every fused class subclasses the class it replaces and overrides ``forward`` only
(see ``fusedformer.nn._base``). Converting a module sets its ``__class__`` to the fused subclass;
nothing else about the module changes — the same parameter objects, buffers, submodules, hooks and
``state_dict`` keys — so optimizers, tied weights, ``save_pretrained`` / ``from_pretrained`` and
``load_state_dict`` work unchanged in both directions. ``revert()`` sets the classes back.

A *rule* says which exact class converts to which fused class, and when a module of that class
must be left untouched (an option the fused forward does not implement). Only exact classes
match: a user subclass may override ``forward``, so it is reported and left alone (its children
are still visited). The rules live in ``registry``, where each family's module (``torch_nn``,
``hf_bert``, ...) registers them when imported; :data:`FAMILIES` says which to import. The Hugging
Face families are imported only when the model's ``transformers`` modules already are — ``convert``
never imports ``transformers`` itself.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional

from torch import nn

from ..nn._base import FusedModule, check_backend
from . import registry
from .rules import ConversionReport

# The model families: (the module that must already be imported for the family to apply, or None
# for always; the family's module in this package, which registers its rules when imported).
# Hugging Face families load only when the model's code is loaded (a model holding a BertLayer has
# imported modeling_bert); importing transformers here would make it a hard dependency.
FAMILIES = (
    (None, "torch_nn"),
    ("transformers.models.bert.modeling_bert", "hf_bert"),
    ("transformers.models.gpt2.modeling_gpt2", "hf_gpt2"),
    ("transformers.models.bart.modeling_bart", "hf_bart"),
)


def _load_families() -> None:
    for trigger, module in FAMILIES:
        if trigger is None or trigger in sys.modules:
            importlib.import_module(f"{__package__}.{module}")


def convert(model: nn.Module, backend: Optional[str] = None, *,
            attn_implementation: Optional[str] = None) -> ConversionReport:
    """Swap, in place and keeping the weights, every supported layer of ``model`` for its fused
    version; return a :class:`ConversionReport`.

    Supported: ``torch.nn`` ``LayerNorm``, ``RMSNorm``, ``MultiheadAttention``,
    ``TransformerEncoderLayer``, ``TransformerDecoderLayer``; Hugging Face ``BertLayer`` (any BERT
    model or head, encoder or decoder), ``GPT2Block`` (``GPT2Model``, ``GPT2LMHeadModel``, ...) and
    ``BartEncoderLayer`` / ``BartDecoderLayer`` (any BART model). Modules of these kinds with an option
    the fused forward does not implement are left untouched and listed in ``report.skipped``.
    ``backend`` is remembered by the converted modules (None: chosen at each call by
    ``use_backend`` / ``FUSEDFORMER_BACKEND`` / automatically). Converting an already converted
    model sets the new backend. Undo with :func:`revert`.

    ``attn_implementation="fusedformer"`` (Hugging Face models only) also sets the model's attention
    implementation to fusedformer's (registered by ``fusedformer.integrations.register_hf``): every
    attention layer the model routes through transformers' attention interface (Llama, Mistral,
    Qwen2, ... any family) then runs ``fusedformer.attention``. Models already on that
    implementation get ``backend`` for their attention either way. :func:`revert` restores the
    implementation the model had.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    backend = check_backend(backend)
    report = ConversionReport(backend=backend)
    if attn_implementation is not None or "transformers" in sys.modules:
        from . import hf_attention
        hf_attention.apply(model, attn_implementation, backend, report)
    _load_families()
    rules = registry.rules()

    def visit(module: nn.Module, name: str) -> None:
        if isinstance(module, FusedModule):
            if module.backend != backend:
                module.backend = backend
                report.notes.append((name, f"already converted; backend set to {backend!r}"))
            return
        rule = rules.get(type(module))
        if rule is not None:
            why = rule.unsupported(module)
            if why is None:
                notes = rule.notes(module)
                rule.target._ff_adopt(module, backend)
                report.converted.append(name)
                report.kinds[name] = rule.source.__name__
                report.notes.extend((name, n) for n in notes)
                return
            report.skipped.append((name, why))
        else:
            for source in rules:
                if isinstance(module, source):
                    report.skipped.append((name, f"{type(module).__qualname__} subclasses {source.__qualname__} and "
                                                 "may change its forward; only the exact class is converted"))
                    break
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    registry.after_convert(model, report)
    return report


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` in place: every fused module gets its original class back, with the
    same parameters (also fused modules built directly, e.g. ``fusedformer.nn.LayerNorm``, become
    the torch class; ``GeluFFN`` has none and stays). Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert: model must be a torch.nn.Module, got {type(model).__name__}")
    for module in list(model.modules()):
        if isinstance(module, FusedModule) and type(module)._ff_torch_class is not None:
            module._ff_release()
    _load_families()
    registry.after_revert(model)
    if "transformers" in sys.modules:
        from . import hf_attention
        hf_attention.restore(model)
    return model
