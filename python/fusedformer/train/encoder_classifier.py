"""Sequence classification on the *encoder* of a BART model (``finetune`` of a ``denoise`` checkpoint).

Hugging Face's ``BartForSequenceClassification`` runs the whole encoder–decoder and pools the
decoder's last ``</s>``; fine-tuning the encoder that denoising pretrained needs only the encoder.
:class:`BartEncoderForSequenceClassification` is that: ``BartEncoder`` → mean over the non-padding
tokens → BART's classification head (dense, tanh, dropout, projection). It is a Hugging Face
``PreTrainedModel`` (``model_type`` ``bart``, so ``save_pretrained`` / ``from_pretrained`` and
``fusedformer.convert`` work), with the encoder's parameters under ``encoder.*`` —
:func:`load_encoder_from_seq2seq` fills them from a ``BartForConditionalGeneration`` checkpoint
(``model.encoder.*``; the token embedding is the shared one).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bart import modeling_bart as mb

from .config import TrainError

ARCHITECTURE = "BartEncoderForSequenceClassification"


class BartEncoderForSequenceClassification(mb.BartPreTrainedModel):
    """``BartEncoder`` + mean pooling + ``BartClassificationHead`` (see the module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        self.encoder = mb.BartEncoder(config)
        self.classification_head = mb.BartClassificationHead(
            config.d_model, config.d_model, config.num_labels,
            config.classifier_dropout if config.classifier_dropout is not None else config.dropout)
        self.post_init()

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **kwargs) -> SequenceClassifierOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            m = attention_mask[..., None].to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        logits = self.classification_head(pooled)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def is_encoder_classifier(hf_config: dict) -> bool:
    return ARCHITECTURE in (hf_config.get("architectures") or [])


def load_encoder_from_seq2seq(model: BartEncoderForSequenceClassification, folder: Path) -> None:
    """Copy the encoder of a ``BartForConditionalGeneration`` / ``BartModel`` checkpoint into
    ``model.encoder`` (the classification head stays as initialised)."""
    from safetensors.torch import load_file
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise TrainError(f"{folder} has no model.safetensors; --model needs a complete checkpoint folder")
    state = load_file(str(path))
    prefix = "model.encoder." if any(k.startswith("model.encoder.") for k in state) else "encoder."
    encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    shared = state.get("model.shared.weight", state.get("shared.weight"))
    if "embed_tokens.weight" not in encoder_state and shared is not None:
        encoder_state["embed_tokens.weight"] = shared
    missing, unexpected = model.encoder.load_state_dict(encoder_state, strict=False)
    if missing or unexpected:
        raise TrainError(f"{folder} does not hold a BART encoder this model can load (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); pass a denoise checkpoint or a BART model folder")
