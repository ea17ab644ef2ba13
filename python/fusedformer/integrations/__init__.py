"""Model conversion: ``convert(model)`` swaps supported layers for fused ones in place, ``revert``
undoes it. ``torch.nn`` layers always; Hugging Face BERT / GPT-2 / BART layers when the model is one
(``transformers`` is optional and never imported by fusedformer itself). ``register_hf()`` adds
``attn_implementation="fusedformer"`` to transformers (imported then, and only then)."""
from .convert import convert, revert
from .rules import ConversionReport, Rule


def register_hf() -> str:
    """Register ``"fusedformer"`` with transformers' attention interface; returns the name, for
    ``from_pretrained(..., attn_implementation=...)``. Idempotent. See ``hf_attention``."""
    from .hf_attention import register_hf as register
    return register()


def hf_patch_mapping() -> dict:
    """``{class-name pattern: fused class}`` for ``transformers.monkey_patching.register_patch_mapping``,
    so that ``from_pretrained`` / ``from_config`` build BERT and GPT-2 models with the fused layers."""
    from .hf_bert import FusedBertLayer
    from .hf_gpt2 import FusedGPT2Block
    return {"^BertLayer$": FusedBertLayer, "^GPT2Block$": FusedGPT2Block}


__all__ = ["ConversionReport", "Rule", "convert", "hf_patch_mapping", "register_hf", "revert"]
