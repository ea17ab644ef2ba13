"""The run configuration, the user-facing error type and the cache directory.

One :class:`RunConfig` describes one training run completely: the CLI builds it from its
arguments, ``compare`` copies it once per backend, checkpoints store it, and a resumed run
checks it. Everything is plain data (JSON round-trips it).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

#: What ``--backend`` accepts: ``torch`` is the unconverted Hugging Face model (eager attention);
#: the others are ``fusedformer.convert(model, backend=...)`` with that fusedformer backend.
BACKEND_CHOICES = ("torch", "auto", "reference", "cpu", "triton", "cuda")
OBJECTIVES = ("mlm", "clm", "classify", "mlm+nsp", "denoise")
#: What each objective trains (for messages).
OBJECTIVE_NAMES = {"mlm": "masked LM", "clm": "causal LM", "classify": "classification",
                   "mlm+nsp": "masked LM + next-sentence prediction", "denoise": "denoising (BART)"}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
STRATEGIES = ("ddp", "fsdp")


class TrainError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line (no
    traceback), so the message must say what is wrong *and* what to do about it."""


@dataclass
class RunConfig:
    """Everything that defines one training run (see ``fusedformer-train <cmd> --help``)."""

    # what to train
    command: str = "pretrain"            # pretrain | finetune (compare runs one of them per backend)
    objective: str = "mlm"               # mlm | clm | classify | mlm+nsp | denoise
    model: str = "tiny"                  # preset | config .json | checkpoint / HF model folder | minilm
    backend: str = "auto"                # see BACKEND_CHOICES
    # data
    data: str = "bbc"                    # bbc | path (.txt/.jsonl/.csv) | hf:NAME[:CONFIG]
    valid_data: Optional[str] = None     # optional validation file (else a fixed split of `data`)
    text_field: str = "text"
    label_field: str = "label"
    max_docs: Optional[int] = None       # keep only this many training documents (quick runs, tests)
    tokenizer: str = "auto"              # auto | path to tokenizer.json / folder
    vocab_size: int = 8192               # for a tokenizer trained on the corpus
    seq_len: int = 128
    mlm_probability: float = 0.15
    mask_ratio: float = 0.3              # denoise: fraction of words covered by masked spans
    poisson_lambda: float = 3.5          # denoise: mean span length
    permute_sentences: bool = True       # denoise: shuffle the sentences of the source
    # optimisation
    steps: Optional[int] = None          # optimizer steps; or use `epochs`
    epochs: Optional[float] = None
    batch_size: int = 16                 # global batch (sequences per optimizer step, all ranks)
    micro_batch_size: Optional[int] = None  # per rank and forward pass; default batch_size / world
    lr: float = 1e-3
    min_lr_ratio: float = 0.1            # the decay ends at lr * min_lr_ratio
    warmup_steps: Optional[int] = None   # default: 10% of the steps
    schedule: str = "linear"
    weight_decay: float = 0.01
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0           # 0 disables clipping
    dropout: Optional[float] = None      # overrides the model's hidden/attention dropout
    precision: str = "auto"              # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16
    device: str = "auto"                 # auto | cpu | cuda
    threads: Optional[int] = None        # CPU threads for torch (default: torch's choice)
    seed: int = 0
    # evaluation, logging, checkpoints
    eval_every: int = 50
    eval_samples: Optional[int] = 512    # validation examples per evaluation (None: all)
    log_every: int = 1
    save_every: Optional[int] = None     # checkpoint every N steps (a final one is always written)
    keep_checkpoints: int = 2
    output_dir: Optional[str] = None     # default runs/<name>
    name: Optional[str] = None
    resume: bool = False                 # continue the run in output_dir from its last checkpoint
    overwrite: bool = False              # allow a fresh run in an output_dir that holds one
    progress: bool = True
    tensorboard: bool = False
    peak_tflops: Optional[float] = None  # MFU denominator per device (default: the measured matmul ceiling)
    # more than one process
    strategy: str = "ddp"                # ddp | fsdp (under torchrun)

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown run-config keys {unknown}; expected some of {sorted(known)}")
        d = dict(d)
        if "adam_betas" in d:
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**d)

    def to_json(self, path: os.PathLike) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: os.PathLike) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def validate(self) -> "RunConfig":
        """Check values that argparse cannot; raise :class:`TrainError` naming the fix."""
        def choice(name, value, allowed):
            if value not in allowed:
                raise TrainError(f"--{name.replace('_', '-')} {value!r} is not one of {', '.join(allowed)}")
        choice("objective", self.objective, OBJECTIVES)
        choice("backend", self.backend, BACKEND_CHOICES)
        choice("precision", self.precision, PRECISIONS)
        choice("schedule", self.schedule, SCHEDULES)
        choice("strategy", self.strategy, STRATEGIES)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise TrainError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        positive = {"batch_size": self.batch_size, "seq_len": self.seq_len, "lr": self.lr,
                    "eval_every": self.eval_every, "log_every": self.log_every, "vocab_size": self.vocab_size}
        for name, value in positive.items():
            if value is None or value <= 0:
                raise TrainError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for name in ("steps", "micro_batch_size", "save_every", "max_docs", "eval_samples", "threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise TrainError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.epochs is not None and self.epochs <= 0:
            raise TrainError(f"--epochs must be > 0, got {self.epochs}")
        if self.steps is None and self.epochs is None:
            raise TrainError("say how long to train: --steps N or --epochs N")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise TrainError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise TrainError(f"--mlm-probability must be in (0, 1), got {self.mlm_probability}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise TrainError(f"--mask-ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 < self.poisson_lambda <= 64.0:
            raise TrainError(f"--poisson-lambda must be in (0, 64], got {self.poisson_lambda}")
        if self.seq_len < 4:
            raise TrainError(f"--seq-len must be at least 4, got {self.seq_len}")
        if self.keep_checkpoints < 1:
            raise TrainError(f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        return self


def cache_dir() -> Path:
    """Where tokenizers and tokenized data are cached: ``$FUSEDFORMER_CACHE``, else
    ``$XDG_CACHE_HOME/fusedformer``, else ``~/.cache/fusedformer``. Never inside the repo."""
    env = os.environ.get("FUSEDFORMER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fusedformer"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
