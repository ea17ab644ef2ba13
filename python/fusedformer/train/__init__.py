"""The training driver: pretrain (masked LM, masked LM + next-sentence prediction, causal LM,
BART-style denoising), fine-tune (sequence classification) and compare the same run across
fusedformer backends.

Command line: ``fusedformer-train {pretrain,finetune,compare}`` (or ``python -m fusedformer.train``);
see ``docs/training.md``. From Python::

    from fusedformer.train import RunConfig, run, run_compare
    summary = run(RunConfig(command="pretrain", objective="mlm", model="tiny", steps=100, backend="cpu"))

Modules: ``config`` (RunConfig, TrainError), ``data`` (corpora, splits, batches), ``objectives``
(sentence pairs for NSP, denoising corruption), ``encoder_classifier`` (BART encoder + head), ``tokenizer``,
``models`` (presets, backends), ``trainer`` (the loop), ``checkpoint``, ``distributed``
(torchrun, DDP/FSDP), ``perf`` (memory, MFU), ``compare``, ``cli``. Nothing heavy is imported
until used.
"""
from __future__ import annotations

from .config import RunConfig, TrainError

__all__ = ["RunConfig", "TrainError", "run", "run_compare"]


def __getattr__(name: str):
    if name == "run":
        from .trainer import run
        return run
    if name == "run_compare":
        from .compare import run_compare
        return run_compare
    raise AttributeError(f"module 'fusedformer.train' has no attribute {name!r}")
