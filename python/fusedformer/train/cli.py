"""``fusedformer-train`` (also ``python -m fusedformer.train``): pretrain, finetune, compare.

    fusedformer-train compare                                  # tiny MLM on BBC: reference vs cpu
    fusedformer-train pretrain --model mini --objective clm --steps 2000
    fusedformer-train pretrain --objective mlm+nsp             # BERT: masked LM + next-sentence prediction
    fusedformer-train pretrain --objective denoise             # BART: reconstruct corrupted text
    fusedformer-train finetune --model minilm --backend cpu --epochs 2
    fusedformer-train finetune --model runs/<run>/checkpoint-001000
    fusedformer-train pretrain --resume runs/<run> --steps 4000  # exact resume, longer schedule
    torchrun --nproc_per_node 2 -m fusedformer.train pretrain ...  # DDP (or --strategy fsdp)

Every option has the same meaning in every subcommand; see ``--help`` of each and
``docs/training.md``. Errors in the input print one line saying what to do (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import BACKEND_CHOICES, PRECISIONS, SCHEDULES, STRATEGIES, RunConfig, TrainError

PROG = "fusedformer-train"
PRETRAIN_OBJECTIVES = ("mlm", "mlm+nsp", "clm", "denoise")

#: Per-subcommand defaults on top of RunConfig's.
DEFAULTS = {
    "pretrain": {"command": "pretrain", "objective": "mlm", "model": "tiny", "steps": 1000, "lr": 1e-3,
                 "batch_size": 32, "eval_every": 100, "save_every": 500},
    "finetune": {"command": "finetune", "objective": "classify", "model": "minilm", "epochs": 3.0,
                 "lr": 1e-4, "batch_size": 16, "eval_every": 50, "eval_samples": None, "save_every": None},
    # compare's default is the README's first command: a few minutes on a 2-core CPU, dropout on.
    # One thread per run: the tiny model gains little from more, and on a machine busy with other
    # work one thread was 7-25x faster than two (OpenMP threads waiting on each other).
    "compare": {"command": "pretrain", "objective": "mlm", "model": "tiny", "steps": 100, "lr": 2e-3,
                "batch_size": 16, "seq_len": 64, "dropout": 0.1, "eval_every": 25, "eval_samples": 128,
                "warmup_steps": 10, "threads": 1},
    # `compare --objective classify`: MiniLM on the BBC topics (the docs' fine-tuning result). Dropout
    # is off by default: the reference backend draws its dropout masks with Philox in plain PyTorch,
    # which at MiniLM's sizes costs far more than the model itself on a CPU.
    "compare-classify": {"command": "finetune", "objective": "classify", "model": "minilm", "steps": 100,
                         "lr": 1e-4, "batch_size": 16, "seq_len": 64, "dropout": 0.0, "eval_every": 25,
                         "eval_samples": None, "warmup_steps": 10, "save_every": None},
}


def _eval_samples(text: str) -> Optional[int]:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


def _run_options() -> argparse.ArgumentParser:
    """The options every subcommand shares (defaults applied later, so explicit ones are known)."""
    p = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("model")
    g.add_argument("--model", help="preset (tiny, mini, small, base), minilm, a config .json, or a "
                                   "checkpoint / Hugging Face model folder")
    g.add_argument("--backend", choices=BACKEND_CHOICES,
                   help="torch = the unconverted Hugging Face model; others = fusedformer.convert with "
                        "that backend (default auto)")
    g.add_argument("--dropout", type=float, help="override the model's hidden and attention dropout")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="bbc (built-in, default), a .txt/.jsonl/.csv file, or hf:NAME[:CONFIG]")
    g.add_argument("--valid-data", help="validation file (default: a fixed 10%% split of --data)")
    g.add_argument("--text-field", help="text field of .jsonl/.csv records (default text)")
    g.add_argument("--label-field", help="label field of .jsonl/.csv records (default label)")
    g.add_argument("--max-docs", type=int, help="use only this many training documents")
    g.add_argument("--tokenizer", help="auto (the model's own, else one trained on the corpus and "
                                       "cached) or a tokenizer.json path")
    g.add_argument("--vocab-size", type=int, help="vocabulary of a trained tokenizer (default 8192)")
    g.add_argument("--seq-len", type=int, help="tokens per sequence (default 128)")
    g.add_argument("--mlm-probability", type=float, help="masked-LM masking rate (default 0.15)")
    g.add_argument("--mask-ratio", type=float, help="denoise: fraction of words covered by masked spans "
                                                    "(default 0.3)")
    g.add_argument("--poisson-lambda", type=float, help="denoise: mean masked-span length (default 3.5)")
    g.add_argument("--no-permute-sentences", dest="permute_sentences", action="store_false",
                   help="denoise: keep the source's sentence order")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--epochs", type=float, help="epochs (instead of --steps)")
    g.add_argument("--batch-size", type=int, help="global batch size (all processes, all accumulation steps)")
    g.add_argument("--micro-batch-size", type=int, help="per process and forward pass; the rest is "
                                                        "gradient accumulation")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, help="final LR as a fraction of --lr (default 0.1)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 10%% of the run)")
    g.add_argument("--schedule", choices=SCHEDULES, help="decay after warmup (default linear)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    g.add_argument("--adam-betas", type=float, nargs=2, metavar=("B1", "B2"))
    g.add_argument("--adam-eps", type=float)
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping norm; 0 disables (default 1)")
    g.add_argument("--precision", choices=PRECISIONS, help="auto (bf16 on a GPU, fp32 on the CPU), "
                                                           "fp32, bf16 or fp16 (autocast, GPU only)")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; on a busy "
                                               "machine 1 can be several times faster)")
    g.add_argument("--seed", type=int, help="seeds the weights, dropout and data order (default 0)")
    g = p.add_argument_group("evaluation, logs and checkpoints")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps")
    g.add_argument("--eval-samples", type=_eval_samples, help="validation examples per evaluation, or all")
    g.add_argument("--log-every", type=int, help="log.jsonl line every N steps (default 1)")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (a final one is always written)")
    g.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept (default 2)")
    g.add_argument("--output-dir", help="where logs and checkpoints go (default runs/<name>)")
    g.add_argument("--name", help="run name (default: command, objective, model, backend and time)")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
    g.add_argument("--peak-tflops", type=float, help="TFLOP/s per device that MFU divides by (default: a large "
                                                     "matmul in the training precision, measured at the start)")
    g.add_argument("--strategy", choices=STRATEGIES, help="under torchrun: ddp (default) or fsdp")
    g.add_argument("--quiet", action="store_true", help="only warnings and the final result")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _run_options()
    parser = argparse.ArgumentParser(prog=PROG, description="Pretrain, fine-tune and compare "
                                     "Transformers on fusedformer's backends (see docs/training.md).")
    sub = parser.add_subparsers(dest="cmd", metavar="{pretrain,finetune,compare}")
    pre = sub.add_parser("pretrain", parents=[common], argument_default=argparse.SUPPRESS,
                         help="masked-LM / +NSP (BERT), causal-LM (GPT-2) or denoising (BART) pretraining",
                         description="Masked-LM (BERT-style, optionally with next-sentence prediction), "
                                     "causal-LM (GPT-style) or denoising (BART-style encoder-decoder) "
                                     "pretraining from a preset, a config file or a checkpoint.")
    pre.add_argument("--objective", choices=PRETRAIN_OBJECTIVES,
                     help="mlm (BERT, default), mlm+nsp (BERT with next-sentence prediction), clm (GPT-2) "
                          "or denoise (BART: text infilling + sentence permutation)")
    pre.add_argument("--resume", nargs="?", const="", metavar="DIR",
                     help="continue the run in DIR (or --output-dir) exactly from its last checkpoint")
    fin = sub.add_parser("finetune", parents=[common], argument_default=argparse.SUPPRESS,
                         help="sequence classification from a checkpoint or Hugging Face model",
                         description="Sequence classification (BERT) from a checkpoint of ours, a Hugging "
                                     "Face model folder or minilm; labels from the corpus (BBC topics).")
    fin.add_argument("--resume", nargs="?", const="", metavar="DIR",
                     help="continue the run in DIR (or --output-dir) exactly from its last checkpoint")
    cmp = sub.add_parser("compare", parents=[common], argument_default=argparse.SUPPRESS,
                         help="the same run on several backends: loss differences, speed, memory",
                         description="Run the same seed, data and steps on two or more backends and report "
                                     "per-step loss differences, final metrics, tokens/s, step time and peak "
                                     "memory (table, compare.json, compare.png).")
    cmp.add_argument("--objective", choices=PRETRAIN_OBJECTIVES + ("classify",),
                     help="mlm (default), mlm+nsp, clm, denoise, or classify (a fine-tuning comparison)")
    cmp.add_argument("--backends", help="comma-separated backends, the first is the baseline "
                                        "(default reference,cpu)")
    cmp.add_argument("--reuse-runs", action="store_true",
                     help="keep a backend's finished run in --output-dir if its configuration is the same")
    cmp.add_argument("--in-process", action="store_true",
                     help="run the backends in this process (faster start)")
    return parser


def make_config(cmd: str, given: dict) -> RunConfig:
    """RunConfig = RunConfig defaults < subcommand defaults < saved run (on --resume) < options."""
    if cmd == "compare" and given.get("objective") == "classify":
        cmd = "compare-classify"
    values = dict(DEFAULTS[cmd])
    given = {k: v for k, v in given.items() if k not in ("cmd", "quiet", "backends", "in_process", "reuse_runs")}
    resume = given.pop("resume", None)
    if resume is not None:
        out = Path(resume or given.get("output_dir") or "")
        if not str(out) or str(out) == ".":
            raise TrainError("--resume needs the run's folder: --resume DIR (or --output-dir DIR --resume)")
        saved = out / "run_config.json"
        if not saved.is_file():
            raise TrainError(f"--resume: {out} holds no run (no run_config.json); pass the folder of an "
                             "earlier run")
        values = RunConfig.from_json(saved).to_dict()
        values.update(output_dir=str(out), resume=True, overwrite=False)
    # --steps and --epochs are alternatives: the one given replaces the other's default
    if "steps" in given and "epochs" not in given:
        values["epochs"] = None
    if "epochs" in given and "steps" not in given:
        values["steps"] = None
    values.update(given)
    return RunConfig.from_dict(values).validate()


class _BarFriendlyHandler(logging.StreamHandler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # no tqdm, or a stream it cannot write to
            super().emit(record)


def _setup_logging(quiet: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logger = logging.getLogger("fusedformer.train")
    logger.handlers.clear()
    handler = _BarFriendlyHandler(sys.stderr)
    prefix = f"[{PROG}{'' if rank == 0 else f' rank {rank}'}] "
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet or rank != 0 else logging.INFO)


def _quiet_transformers() -> None:
    """Keep transformers' load reports and warnings off the driver's output (errors still show)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()


def _one_line(exc: BaseException) -> str:
    return " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _print_run(summary: dict) -> None:
    ev = summary.get("final_eval") or {}
    metric = " ".join(f"{k} {v:.4f}" for k, v in ev.items())
    tps = summary.get("tokens_per_s")
    mfu = ""
    if summary.get("mfu"):
        of = "--peak-tflops" if summary.get("mfu_ceiling") == "--peak-tflops" else "the measured matmul ceiling"
        mfu = f", MFU {summary['mfu']:.1%} of {of}"
    print(f"{summary['backend']}: {summary['steps_done']} steps, train loss {summary['final_train_loss']:.4f}, "
          f"validation {metric}, {tps:,.0f} tokens/s, step peak {summary['peak_memory_mb']:,.1f} MB{mfu}"
          f"\noutput: {summary['output_dir']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    code = _main(argv)
    if _is_torchrun_rank():
        _exit_rank(code)
    return code


def _is_torchrun_rank() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _exit_rank(code: int) -> None:
    """End a torchrun rank without finalizing the interpreter, once everything is written.

    Under DDP on the CPU, torch's gloo process group outlives ``destroy_process_group``: DDP keeps
    a reference to it in C++ (torch 2.14; a plain group is freed and its worker threads joined), so
    its worker threads are still alive at exit. A worker drops its last reference to a finished
    collective's tensors a moment after the collective has returned to Python, and doing so takes
    the GIL; if the interpreter is finalizing by then, the thread is unwound from under a
    ``noexcept`` frame and the process aborts ("terminate called without an active exception"),
    after a run that succeeded. ``os._exit`` skips finalization; what finalization would still
    do for us (flush Python's buffered streams and log handlers) is done first. Every file the
    run writes is closed before :func:`run` returns."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def _main(argv: Optional[Sequence[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if argv and argv[0] == "_worker":  # one backend of `compare`, in its own process
            _setup_logging(quiet=False)
            _quiet_transformers()
            from .trainer import run
            run(RunConfig.from_json(argv[1]))
            return 0
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.cmd:
            parser.print_help(sys.stderr)
            return 2
        given = vars(args)
        _setup_logging(given.get("quiet", False))
        if not str(given.get("data", "bbc")).startswith("hf:"):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local models only; never wait on a network
        cfg = make_config(args.cmd, given)
        _quiet_transformers()
        if args.cmd == "compare":
            from .compare import format_table, run_compare
            backends = [b.strip() for b in given.get("backends", "reference,cpu").split(",") if b.strip()]
            out = Path(cfg.output_dir) if cfg.output_dir else \
                Path("runs") / (cfg.name or f"compare-{cfg.objective}-{Path(cfg.model).name}-"
                                             f"{time.strftime('%Y%m%d-%H%M%S')}")
            t0 = time.perf_counter()
            result = run_compare(cfg, backends, out, isolate=not given.get("in_process", False),
                                 reuse=given.get("reuse_runs", False))
            print(format_table(result))
            print(f"wrote {result['json_path']}" + (f" and {result['plot_path']}" if result["plot_path"] else "")
                  + f" ({time.perf_counter() - t0:.0f} s)")
            return 0
        from .trainer import run
        summary = run(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            _print_run(summary)
        return 0
    except TrainError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; completed checkpoints are kept (resume with --resume)", file=sys.stderr)
        return 130
    except Exception as exc:
        from ..backends import BackendError
        if isinstance(exc, BackendError):
            print(f"{PROG}: error: {_one_line(exc)} | pick another --backend (reference runs anywhere)",
                  file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
