"""Model conversion: ``convert(model)`` swaps supported layers for fused ones in place, ``revert``
undoes it. ``torch.nn`` layers always; Hugging Face BERT / GPT-2 layers when the model is one
(``transformers`` is optional and never imported by fusedformer itself)."""
from .convert import ConversionReport, Rule, convert, revert

__all__ = ["ConversionReport", "Rule", "convert", "revert"]
