"""The training loop: one :class:`RunConfig` in, a trained model, logs and checkpoints out.

What one optimizer step does
----------------------------
1. Take the step's global batch (:class:`~fusedformer.train.data.StepSampler`), cut it into
   ``world_size × accumulation`` micro-batches, and count the loss terms of the whole global batch
   (all-reduced), per loss (mlm+nsp has two: masked tokens and sentence pairs).
2. For each of this rank's micro-batches: forward (under bf16/fp16 autocast on a GPU if asked),
   loss = Σ over the losses of the *sum* of per-term cross-entropies × ``world_size / global_count``,
   backward (gradient sync only on the last micro-batch). The result is the mean over the global
   batch (for mlm+nsp: MLM mean + NSP mean), exactly as if one process had seen it.
3. Unscale (fp16), clip the global gradient norm, AdamW step, LR schedule step.

Around it: evaluation every ``eval_every`` steps (and before the first step), a JSONL log line per
step, checkpoints, a progress bar with loss and tokens/s, and the run summary.

Randomness: torch's global RNG is seeded with ``seed`` before the model is built (so every backend
starts from the same weights), then re-seeded per rank for training. Dropout draws from it — on
fused backends through ``fusedformer.rng``, whose seeds come from torch's generator — so two
backends given the same seed drop the same elements at every step. Data order and masks never
touch it (see ``data.py``). A checkpoint stores every rank's RNG state, so a resumed run continues
bit for bit (on the CPU; GPU kernels with atomics may differ in the last bits).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import distributed as distrib
from .config import RunConfig, TrainError, atomic_write_text
from .data import (IGNORE_INDEX, Batch, StepSampler, _mix, classification_dataset, collate, denoise_dataset,
                   lm_dataset, load_corpus, nsp_dataset)
from .models import (apply_backend, build_model, check_backend, check_supported, count_parameters,
                     matmul_parameters, resolve_model)
from .perf import PEAK_MEMORY_KIND, PeakMemory, memory_step, mfu, mfu_ceiling, train_flops_per_token
from .tokenizer import TextTokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger("fusedformer.train")


def default_output_dir(cfg: RunConfig) -> Path:
    name = cfg.name or f"{cfg.command}-{cfg.objective}-{Path(cfg.model).name}-{cfg.backend}-" \
                       f"{time.strftime('%Y%m%d-%H%M%S')}"
    return Path("runs") / name


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------
#: The losses of each objective: ``main`` (counted by ``Batch.count``), and ``nsp`` for mlm+nsp.
TERMS = {"mlm+nsp": ("main", "nsp")}
#: How a loss is named in logs and metrics (``main`` of mlm+nsp is the masked-LM loss).
TERM_NAMES = {"mlm+nsp": {"main": "mlm", "nsp": "nsp"}}


def terms_of(objective: str) -> tuple[str, ...]:
    return TERMS.get(objective, ("main",))


def _ce(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    return F.cross_entropy(logits, target, reduction="sum"), (logits.detach().argmax(-1) == target).sum()


class LossModule(torch.nn.Module):
    """The Hugging Face model plus its loss, as one module (what DDP/FSDP wrap).

    ``forward`` returns, per loss (``"main"``, and ``"nsp"`` for mlm+nsp), ``(sum of cross-entropies,
    number of correct predictions)`` over the batch's loss terms. For masked LM the prediction head
    runs only at the masked positions (~15% of the tokens; the head's vocabulary-sized matmul would
    otherwise dominate a small model's step) — the same loss as ``BertForMaskedLM``'s /
    ``BertForPreTraining``'s, computed on what it is computed on; for denoising the LM head runs at
    the target's tokens (not its padding), as ``BartForConditionalGeneration``'s loss does."""

    def __init__(self, model: torch.nn.Module, objective: str):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                labels: torch.Tensor, **extra: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        m = self.model
        if self.objective == "mlm+nsp":
            out = m.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=extra["token_type_ids"])
            hidden, pooled = out[0], out[1]
            picked = labels != IGNORE_INDEX
            return {"main": _ce(m.cls.predictions(hidden[picked]), labels[picked]),
                    "nsp": _ce(m.cls.seq_relationship(pooled), extra["next_sentence_label"])}
        if self.objective == "denoise":
            from transformers.models.bart.modeling_bart import shift_tokens_right
            decoder_input_ids = shift_tokens_right(labels, m.config.pad_token_id, m.config.decoder_start_token_id)
            hidden = m.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                             decoder_attention_mask=extra["decoder_attention_mask"], use_cache=False)[0]
            picked = labels != IGNORE_INDEX
            logits = m.lm_head(hidden[picked]) + m.final_logits_bias[0].to(hidden.dtype)
            return {"main": _ce(logits, labels[picked])}
        if self.objective == "mlm" and hasattr(m, "bert") and hasattr(m, "cls"):
            hidden = m.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            picked = labels != IGNORE_INDEX
            logits, target = m.cls(hidden[picked]).float(), labels[picked]
        else:
            logits = m(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            if self.objective == "clm":
                logits = logits[:, :-1].reshape(-1, logits.shape[-1])
                target = labels[:, 1:].reshape(-1)
            elif self.objective == "mlm":
                picked = labels != IGNORE_INDEX
                logits, target = logits[picked], labels[picked]
            else:
                target = labels
        return {"main": _ce(logits, target)}


def batch_loss(model: torch.nn.Module, b: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run the (wrapped) :class:`LossModule` on a batch: ``{loss name: (sum, correct)}``."""
    return model(b.input_ids, b.attention_mask, b.labels, **b.extra)


def lr_lambda(cfg: RunConfig, total_steps: int, warmup: int):
    """Linear warmup to ``lr``, then linear/cosine decay to ``lr·min_lr_ratio`` (or constant)."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            decay = 1.0 - progress
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay
    return f


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights (parameters with < 2 dims)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)


def resolve_precision(cfg: RunConfig, device: torch.device) -> str:
    if cfg.precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if cfg.precision in ("bf16", "fp16") and device.type != "cuda":
        raise TrainError(f"--precision {cfg.precision} is autocast on a GPU; this run is on the CPU: "
                         "use --precision fp32 (or auto)")
    return cfg.precision


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
class JsonlLog:
    """``log.jsonl``: one JSON object per line, flushed as written (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: Optional[int]):
        self.path, self.enabled = path, enabled
        self._f = None
        if not enabled:
            return
        if keep_until_step is not None and path.is_file():
            # resume: drop what the interrupted run logged after its last checkpoint
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until_step
                    and json.loads(line).get("kind") != "summary"]
            atomic_write_text(path, "".join(k + "\n" for k in kept))
        self._f = open(path, "a")

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def locate_run(cfg: RunConfig) -> tuple[Path, Optional[Path]]:
    """The run's folder and, when resuming, the checkpoint to resume from. Refuses to start a
    fresh run on top of an existing one unless ``--overwrite``. Changes nothing on disk."""
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg)
    latest = ckpt.latest_checkpoint(out)
    if cfg.resume:
        if latest is None:
            raise TrainError(f"--resume: no complete checkpoint in {out}; start a new run without --resume")
        return out, latest
    if (latest is not None or (out / "log.jsonl").is_file()) and not cfg.overwrite:
        raise TrainError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace "
                         "it, or choose another --output-dir")
    return out, None


def init_output_dir(out: Path, cfg: RunConfig, fresh: bool, env: distrib.DistEnv) -> None:
    """Create the run folder (clearing an old run there if ``--overwrite``) and write the run's
    configuration. Called once the data and model have loaded, so bad input changes nothing."""
    if env.is_main:
        if fresh:
            for _, path in ckpt.list_checkpoints(out):
                shutil.rmtree(path)
            for name in ("log.jsonl", "summary.json"):
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        cfg.to_json(out / "run_config.json")
    distrib.barrier(env)


def _check_resume_compatible(cfg: RunConfig, saved: RunConfig) -> None:
    for key in ("objective", "seq_len", "batch_size", "seed", "data", "max_docs", "mlm_probability",
                "mask_ratio", "poisson_lambda", "permute_sentences"):
        if getattr(cfg, key) != getattr(saved, key):
            raise TrainError(f"--resume: --{key.replace('_', '-')} is {getattr(cfg, key)!r} but the run was "
                             f"started with {getattr(saved, key)!r}; resume with the same settings")


def get_tokenizer(cfg: RunConfig, corpus, source, resume_from: Optional[Path]) -> TextTokenizer:
    if resume_from is not None:
        return load_tokenizer(resume_from / "tokenizer.json")
    if cfg.tokenizer != "auto":
        return load_tokenizer(cfg.tokenizer)
    d = source.tokenizer_dir
    if d is not None and ((d / "tokenizer.json").is_file() or (d / "vocab.txt").is_file()):
        return load_tokenizer(d)
    return train_tokenizer(corpus.texts["train"], cfg.vocab_size, corpus.fingerprint)


def run(cfg: RunConfig) -> dict:
    """Train as ``cfg`` says (joining torchrun's process group if launched by it). Returns the
    summary (also written to ``<output_dir>/summary.json``)."""
    cfg.validate()
    try:  # the driver draws its own progress bar; keep transformers' (checkpoint writing) quiet
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = distrib.init(cfg.device, cfg.strategy)
    try:
        return _run(cfg, env)
    finally:
        distrib.shutdown(env)


def _run(cfg: RunConfig, env: distrib.DistEnv) -> dict:
    device = env.device
    check_backend(cfg.backend, device)
    precision = resolve_precision(cfg, device)
    out, resume_from = locate_run(cfg)
    if resume_from is not None:
        _check_resume_compatible(cfg, RunConfig.from_json(resume_from / "run_config.json"))

    # ---- data and model -----------------------------------------------------------------------
    source = resolve_model(str(resume_from) if resume_from is not None else cfg.model)
    check_supported(source, cfg.objective)  # before the data: a mismatch fails at once
    corpus = load_corpus(cfg.data, cfg.valid_data, cfg.text_field, cfg.label_field, cfg.max_docs)
    tok = get_tokenizer(cfg, corpus, source, resume_from)
    if cfg.objective == "classify":
        train_ds = classification_dataset(corpus, "train", tok, cfg.seq_len)
        valid_ds = classification_dataset(corpus, "validation", tok, cfg.seq_len)
        num_labels = train_ds.num_labels
    elif cfg.objective == "mlm+nsp":
        train_ds = nsp_dataset(corpus, "train", tok, cfg.seq_len, cfg.seed)
        valid_ds = nsp_dataset(corpus, "validation", tok, cfg.seq_len, cfg.seed)
        num_labels = 2
    elif cfg.objective == "denoise":
        settings = (cfg.mask_ratio, cfg.poisson_lambda, cfg.permute_sentences)
        train_ds = denoise_dataset(corpus, "train", tok, cfg.seq_len, *settings)
        valid_ds = denoise_dataset(corpus, "validation", tok, cfg.seq_len, *settings)
        num_labels = 2
    else:
        train_ds = lm_dataset(corpus, "train", tok, cfg.seq_len, cfg.objective)
        valid_ds = lm_dataset(corpus, "validation", tok, cfg.seq_len, cfg.objective)
        num_labels = 2

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(source, cfg.objective, vocab_size=tok.vocab_size, seq_len=cfg.seq_len,
                        pad_id=tok.pad_id, eos_id=tok.sep_id, dropout=cfg.dropout, num_labels=num_labels,
                        bos_id=tok.cls_id)
    if resume_from is not None:
        ckpt.load_weights(model, resume_from)
    conversion = apply_backend(model, cfg.backend)
    model.to(device)
    n_params = count_parameters(model)
    hf_model = model

    # ---- batch geometry -----------------------------------------------------------------------
    W = env.world_size
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // W)
    if cfg.batch_size % (W * micro):
        raise TrainError(f"--batch-size {cfg.batch_size} is not a multiple of processes ({W}) × "
                         f"--micro-batch-size ({micro}); choose sizes that divide")
    accum = cfg.batch_size // (W * micro)
    terms = terms_of(cfg.objective)
    sampler = StepSampler(len(train_ds), cfg.batch_size, cfg.seed)
    total_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * sampler.steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else total_steps // 10

    # ---- optimisation state -------------------------------------------------------------------
    model = distrib.wrap(LossModule(model, cfg.objective), env)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps, warmup))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    start_step = 0
    torch.manual_seed(_mix(cfg.seed, 0x7261696E, env.rank))  # the training stream (dropout)
    if resume_from is not None:
        state = ckpt.load_training_state(resume_from)
        distrib.load_optimizer_state(model, optimizer, state["optimizer"], env)
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_step = int(state["step"])
        rng = state["rng"]
        if len(rng) == W:
            ckpt.restore_rng(rng[env.rank])
        else:
            log.warning("resuming on %d processes a run saved on %d: dropout streams restart", W, len(rng))
            torch.manual_seed(_mix(cfg.seed, start_step, env.rank))
        if start_step >= total_steps:
            raise TrainError(f"--resume: the run in {out} already has {start_step} steps (its schedule has "
                             f"{total_steps}); pass a larger --steps to continue it")
        log.info("resuming %s at step %d", out, start_step)

    # ---- accounting ---------------------------------------------------------------------------
    config = hf_model.config
    layers = (config.encoder_layers + config.decoder_layers if config.model_type == "bart"
              else getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer"))
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    flops_per_token = train_flops_per_token(matmul_parameters(hf_model, cfg.objective), layers, width,
                                            cfg.seq_len)
    # MFU's denominator: the matmul ceiling measured on this process's device (or --peak-tflops),
    # summed over the processes, whose tokens the global tokens/s counts
    ceiling_tflops, ceiling_source = mfu_ceiling(device, precision, cfg.peak_tflops)
    ceiling_total = distrib.all_reduce_sum([ceiling_tflops], env)[0]
    mem_step = memory_step(start_step, total_steps)  # the step the peak-memory meter watches
    writer = None
    if cfg.tensorboard and env.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
        writer = SummaryWriter(str(out / "tensorboard"))
    init_output_dir(out, cfg, resume_from is None, env)
    jlog = JsonlLog(out / "log.jsonl", env.is_main, start_step if resume_from is not None else None)
    info = {"backend": cfg.backend, "device": str(device), "precision": precision, "world_size": W,
            "micro_batch_size": micro, "accumulation": accum, "total_steps": total_steps,
            "warmup_steps": warmup, "parameters": n_params, "converted": len(conversion["converted"]),
            "skipped": len(conversion["skipped"]), "tokenizer": tok.source, "vocab_size": tok.vocab_size,
            "train_examples": len(train_ds), "valid_examples": len(valid_ds),
            "flops_per_token": flops_per_token, "mfu_ceiling": ceiling_source, "mfu_ceiling_tflops": ceiling_tflops,
            "mfu_ceiling_tflops_total": ceiling_total}
    jlog.write({"kind": "start", "step": start_step, **info})
    log.info("%s | %s | %d parameters | %d layers fused (%d skipped) | %d steps of %d × %d tokens | %s | "
             "MFU ceiling %.3g TFLOP/s (%s)", cfg.backend, device, n_params, len(conversion["converted"]),
             len(conversion["skipped"]), total_steps, cfg.batch_size, cfg.seq_len, precision, ceiling_tflops,
             ceiling_source)

    def evaluate(step: int) -> dict:
        metrics = run_eval(model, valid_ds, tok, cfg, env, micro, precision)
        jlog.write({"kind": "eval", "step": step, **metrics})
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(f"eval/{k}", v, step)
        log.info("step %d: validation %s", step,
                 " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    last_eval = evaluate(start_step) if start_step == 0 else {}
    bar = None
    if cfg.progress and env.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=start_step, desc=cfg.backend, unit="step",
                   dynamic_ncols=True, file=sys.stderr)

    # ---- the loop -----------------------------------------------------------------------------
    timings: list[tuple[float, int, bool]] = []  # (step time, tokens, memory measured)
    last_loss = float("nan")
    peak_memory_mb: Optional[float] = None
    t_start = time.perf_counter()
    for step in range(start_step, total_steps):
        epoch, indices = sampler.batch(step)
        mine = indices[env.rank * accum * micro:(env.rank + 1) * accum * micro]
        batches = [collate(train_ds, mine[a * micro:(a + 1) * micro], tok, seed=cfg.seed, epoch=epoch,
                           mlm_probability=cfg.mlm_probability) for a in range(accum)]
        *term_counts, global_tokens = distrib.all_reduce_sum(
            [sum(b.term_counts()[t] for b in batches) for t in terms] + [sum(b.tokens for b in batches)], env)
        global_counts = dict(zip(terms, term_counts))

        batches = [b.to(device) for b in batches]  # data preparation: outside the step's time and memory
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        measured = step == mem_step
        meter = PeakMemory(device) if measured else contextlib.nullcontext()
        t0 = time.perf_counter()
        with meter:
            model.train()
            loss_sums = {t: torch.zeros((), dtype=torch.float64, device=device) for t in terms}
            correct_sums = {t: torch.zeros((), dtype=torch.float64, device=device) for t in terms}
            for a, b in enumerate(batches):
                with distrib.maybe_no_sync(model, env, sync=(a == accum - 1)):
                    with autocast_context(precision, device):
                        losses = batch_loss(model, b)
                    scaled = sum(losses[t][0] * (W / global_counts[t]) for t in terms)
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                for t in terms:
                    loss_sums[t] += losses[t][0].detach().double()
                    correct_sums[t] += losses[t][1].detach().double()
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            lr = optimizer.param_groups[0]["lr"]
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            reduced = distrib.all_reduce_sum([float(loss_sums[t]) for t in terms] +
                                             [float(correct_sums[t]) for t in terms], env)
            term_losses = {t: reduced[i] / global_counts[t] for i, t in enumerate(terms)}
            term_correct = {t: reduced[len(terms) + i] / global_counts[t] for i, t in enumerate(terms)}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        dt = distrib.all_reduce_max(dt, env)
        timings.append((dt, int(global_tokens), measured))

        last_loss = sum(term_losses.values())
        done = step + 1
        tps = global_tokens / dt
        record = {"kind": "train", "step": done, "epoch": epoch, "loss": last_loss, "lr": lr,
                  "grad_norm": float(grad_norm), "step_time": dt, "tokens": int(global_tokens),
                  "tokens_per_s": tps}
        if len(terms) > 1:  # each loss, and each head's training accuracy
            names = TERM_NAMES[cfg.objective]
            for t in terms:
                record[f"{names[t]}_loss"] = term_losses[t]
                record[f"{names[t]}_accuracy"] = term_correct[t]
        step_mfu = mfu(flops_per_token, tps, ceiling_total)
        if step_mfu is not None:
            record["mfu"] = step_mfu
        if measured:  # this step's time includes the meter's cost (see perf.py)
            peak_memory_mb = meter.mb
            record["peak_memory_mb"] = peak_memory_mb
        if not math.isfinite(last_loss):
            jlog.write(record)
            raise TrainError(f"the loss became {last_loss} at step {done}; lower --lr or use --precision "
                             "fp32 (earlier checkpoints are kept)")
        if done % cfg.log_every == 0 or done == total_steps:
            jlog.write(record)
            if writer is not None:
                for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                    writer.add_scalar(f"train/{k}", record[k], done)
        if bar is not None:
            bar.set_postfix_str(f"loss {last_loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s", refresh=False)
            bar.update(1)
        if done % cfg.eval_every == 0 or done == total_steps:
            last_eval = evaluate(done)
        if (cfg.save_every and done % cfg.save_every == 0) or done == total_steps:
            _save(out, done, model, hf_model, optimizer, scheduler, scaler, tok, cfg, env,
                  {"step": done, "loss": last_loss, "eval": last_eval, "backend": cfg.backend})
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t_start

    # ---- summary ------------------------------------------------------------------------------
    skip = min(3, len(timings) // 5)  # the first steps warm up allocators and caches
    # ... and the step the memory meter watched is not a timing sample (the only one: then it is)
    timed = [(t, n) for t, n, measured in timings[skip:] if not measured] or [(t, n) for t, n, _ in timings]
    step_times = sorted(t for t, _ in timed)
    summary = {
        **info, "command": cfg.command, "objective": cfg.objective, "model": cfg.model, "seed": cfg.seed,
        "steps_done": total_steps, "final_train_loss": last_loss, "final_eval": last_eval,
        "median_step_time_s": step_times[len(step_times) // 2] if step_times else None,
        "tokens_per_s": (sum(n for _, n in timed) / sum(t for t, _ in timed)) if timed else None,
        "peak_memory_mb": peak_memory_mb, "peak_memory_kind": PEAK_MEMORY_KIND, "peak_memory_step": mem_step + 1,
        "wall_time_s": wall, "torch": torch.__version__, "python": platform.python_version(),
        "output_dir": str(out),
    }
    summary["mfu"] = mfu(flops_per_token, summary["tokens_per_s"], ceiling_total)
    summary["peak_memory_mb"] = distrib.all_reduce_max(summary["peak_memory_mb"], env)
    jlog.write({"kind": "summary", "step": total_steps, **{k: v for k, v in summary.items()
                                                           if k != "final_eval"},
                "final_eval": last_eval})
    jlog.close()
    if writer is not None:
        writer.close()
    if env.is_main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _save(out: Path, step: int, model, hf_model, optimizer, scheduler, scaler, tok, cfg: RunConfig,
          env: distrib.DistEnv, meta: dict) -> None:
    """Gather what a checkpoint needs on every rank (collectives), write it on rank 0."""
    model_state = distrib.full_model_state(model, hf_model, env)
    optim_state = distrib.full_optimizer_state(model, optimizer, env)
    rng = distrib.gather_objects(ckpt.capture_rng(), env)
    if env.is_main:
        state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng,
                 "world_size": env.world_size}
        ckpt.save_checkpoint(out, step, model=hf_model, model_state=model_state, training_state=state,
                             tokenizer=tok, run_config=cfg, meta=meta, keep=cfg.keep_checkpoints)
    distrib.barrier(env)


@torch.no_grad()
def run_eval(model, ds, tok: TextTokenizer, cfg: RunConfig, env: distrib.DistEnv, micro: int,
             precision: str) -> dict:
    """Validation loss and accuracy (masked-token, next-token, reconstructed-token or label accuracy)
    on the first ``eval_samples`` examples, sharded over ranks (each takes every world_size-th
    example). mlm+nsp: ``loss`` = masked-LM loss + NSP loss (what is trained), each also on its own
    (``mlm_loss``, ``nsp_loss``) with its accuracy; ``accuracy`` and ``perplexity`` are the masked LM's."""
    terms = terms_of(cfg.objective)
    n = len(ds) if cfg.eval_samples is None else min(len(ds), cfg.eval_samples)
    n -= n % env.world_size  # equal shards: collectives inside FSDP forwards must pair up
    mine = list(range(env.rank, n, env.world_size))
    model.eval()
    sums = [0.0] * (3 * len(terms))  # per loss: loss sum, correct, count
    for start in range(0, len(mine), micro):
        b = collate(ds, mine[start:start + micro], tok, seed=cfg.seed, epoch=0,
                    mlm_probability=cfg.mlm_probability, eval_mode=True).to(env.device)
        with autocast_context(precision, env.device):
            losses = batch_loss(model, b)
        counts = b.term_counts()
        for i, t in enumerate(terms):
            sums[3 * i] += float(losses[t][0])
            sums[3 * i + 1] += float(losses[t][1])
            sums[3 * i + 2] += counts[t]
    sums = distrib.all_reduce_sum(sums, env)
    model.train()
    loss = {t: sums[3 * i] / max(sums[3 * i + 2], 1) for i, t in enumerate(terms)}
    accuracy = {t: sums[3 * i + 1] / max(sums[3 * i + 2], 1) for i, t in enumerate(terms)}
    metrics = {"loss": sum(loss.values()), "accuracy": accuracy["main"]}
    if cfg.objective != "classify":
        metrics["perplexity"] = math.exp(min(loss["main"], 50.0))
    if len(terms) > 1:
        names = TERM_NAMES[cfg.objective]
        for t in terms:
            metrics[f"{names[t]}_loss"] = loss[t]
            metrics[f"{names[t]}_accuracy"] = accuracy[t]
    return metrics
