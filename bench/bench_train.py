"""The end-to-end training step: tokens/s of BERT-base MLM and GPT-2 small causal-LM training.

One step = forward with the loss, backward, AdamW step (dropout on, as in training; torch's fused
AdamW, one kernel over all parameters, where torch has it for the device: its foreach form allocates
parameter-sized temporaries every step, whose first-touch page faults made a quarter of the CPU
step, the same for every provider). Providers, all
starting from the same randomly initialized Hugging Face model (no weights are downloaded):

  hf-eager     Hugging Face with ``attn_implementation="eager"``
  hf-sdpa      Hugging Face with ``attn_implementation="sdpa"`` (its default; the baseline)
  compile      ``torch.compile`` of the hf-sdpa model
  hf-fusedformer  Hugging Face with ``attn_implementation="fusedformer"`` (``fusedformer.integrations.
               register_hf()``): its own layers, with only the attention on ``fusedformer.attention``
               (backend chosen by dispatch) — what any model family gets without ``convert``
  reference,   the hf-sdpa model after ``fusedformer.convert(model, backend)``: BertLayer / GPT2Block
  cpu, cuda,   run fusedformer's attention, layer_norm and gelu_ffn on that backend
  triton

Check before timing: the loss of one evaluation batch (dropout off), held to the 2x rule against
the same model in float64 (hf-eager), with hf-eager in the benchmark dtype as the base.

--quick runs all-MiniLM-L6-v2's shape whole (6 layers, width 384, its vocabulary) on 16 x 128 tokens,
and keeps BERT-base's and GPT-2's layer shapes (width 768, 12 heads, FFN 3072) but builds 2 layers
and an 8192-token vocabulary on 2 x 128 tokens; --full builds the real models (12 layers, real
vocabularies) on 32 x 512 (BERT) and 16 x 1024 (GPT-2) tokens, and MiniLM on 64 x 128. Peak memory is measured on a GPU only (on a CPU it would cost one
more profiled step per provider, and AdamW's temporaries dominate it there).
"""
from __future__ import annotations

import contextlib
import gc
from typing import Callable, Optional, Sequence

import torch

import fusedformer

from . import checks, driver, suite, timing

OP = "train"


#: BERT-style models (masked LM on padded batches): their widths. MiniLM is all-MiniLM-L6-v2's shape
#: (hidden 384, 12 heads of 32, FFN 1536; 6 layers), the encoder CPU users fine-tune.
BERT_SHAPES = {
    "bert-base": {},
    "minilm": {"hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536},
}


def _configs(size: str) -> list[dict]:
    if size == "quick":
        return [{"model": "minilm", "layers": 6, "vocab": 30522, "B": 16, "S": 128},
                {"model": "bert-base", "layers": 2, "vocab": 8192, "B": 2, "S": 128},
                {"model": "gpt2-small", "layers": 2, "vocab": 8192, "B": 2, "S": 128}]
    return [{"model": "minilm", "layers": 6, "vocab": 30522, "B": 64, "S": 128},
            {"model": "bert-base", "layers": 12, "vocab": 30522, "B": 32, "S": 512},
            {"model": "gpt2-small", "layers": 12, "vocab": 50257, "B": 16, "S": 1024}]


def _build(cfg: dict, attn: str):
    """A freshly initialized model (seed 0, so every provider starts from the same weights)."""
    torch.manual_seed(0)
    if cfg["model"] in BERT_SHAPES:
        from transformers import BertConfig, BertForMaskedLM

        config = BertConfig(vocab_size=cfg["vocab"], num_hidden_layers=cfg["layers"],
                            max_position_embeddings=max(512, cfg["S"]), **BERT_SHAPES[cfg["model"]])
        config._attn_implementation = attn
        return BertForMaskedLM(config)
    from transformers import GPT2Config, GPT2LMHeadModel

    special = {} if cfg["vocab"] > 50256 else {"bos_token_id": 0, "eos_token_id": 0}  # a cut vocabulary
    config = GPT2Config(vocab_size=cfg["vocab"], n_layer=cfg["layers"], n_positions=max(1024, cfg["S"]), **special)
    config._attn_implementation = attn
    return GPT2LMHeadModel(config)


def _batch(cfg: dict, device: torch.device) -> dict:
    """BERT: padded sequences (lengths in [S/2, S]) with 15% of the real tokens masked for MLM;
    GPT-2: full sequences, next-token labels."""
    gen = torch.Generator().manual_seed(0)
    B, S, V = cfg["B"], cfg["S"], cfg["vocab"]
    ids = torch.randint(0, V, (B, S), generator=gen)
    if cfg["model"] not in BERT_SHAPES:
        return {"input_ids": ids.to(device), "labels": ids.to(device)}
    lengths = torch.randint(S // 2, S + 1, (B,), generator=gen)
    real = torch.arange(S)[None, :] < lengths[:, None]
    chosen = (torch.rand(B, S, generator=gen) < 0.15) & real
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return {"input_ids": ids.to(device), "attention_mask": real.long().to(device), "labels": labels.to(device)}


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Model:
    """One provider's model, optimizer and batch: ``loss()`` for the check, ``step()`` to time."""

    def __init__(self, provider: str, cfg: dict, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        attn = {"hf-eager": "eager", "hf-fusedformer": _register_hf}.get(provider, "sdpa")
        attn = attn() if callable(attn) else attn
        model = _build(cfg, attn).to(device)
        self.note = ""
        if provider in suite.FUSEDFORMER_BACKENDS:
            report = fusedformer.convert(model, provider)
            if not report.converted:
                raise suite.Unavailable(f"fusedformer.convert converted nothing in {cfg['model']}")
            if report.skipped:
                self.note = f"; convert left {len(report.skipped)} module(s) unfused"
        self.model = model
        self.run = torch.compile(model) if provider == "compile" else model
        self.opt = _adamw(model.parameters(), device)
        self.batch = _batch(cfg, device)

    def loss(self) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad(), _autocast(self.device, self.dtype):
            out = self.run(**self.batch).loss.detach().float()
        self.model.train()
        return out

    def step(self) -> None:
        with _autocast(self.device, self.dtype):
            loss = self.run(**self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _adamw(params, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as a throughput-minded user runs it: fused where torch has that for ``device``."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, ValueError, TypeError):  # no fused AdamW for this device / torch
        return torch.optim.AdamW(params, lr=1e-4)


def _register_hf() -> str:
    """``attn_implementation="fusedformer"`` registered with transformers; its name."""
    try:
        return fusedformer.integrations.register_hf()
    except ImportError as exc:  # transformers missing, or older than 5
        raise suite.Unavailable(str(exc)) from exc


PROVIDERS = ("hf-eager", "hf-sdpa", "hf-fusedformer", "compile") + suite.FUSEDFORMER_BACKENDS


def _static_reason(provider: str, device: torch.device) -> Optional[str]:
    if provider == "cuda" and device.type != "cuda":
        return "the cuda backend takes CUDA tensors"
    if provider == "cpu" and device.type != "cpu":
        return "the cpu backend takes CPU tensors"
    if provider == "triton" and device.type != "cuda":
        return "Triton kernels need a CUDA GPU (the CPU interpreter is for tests, not timing)"
    return None


def _reference_loss(cfg: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss of hf-eager in float64 on the CPU, loss of hf-eager in the benchmark dtype)."""
    ref = _build(cfg, "eager").double().eval()
    batch = _batch(cfg, torch.device("cpu"))
    with torch.no_grad():
        ref64 = ref(**batch).loss.detach()
    del ref
    base = _Model("hf-eager", cfg, device, dtype).loss()
    return ref64, base


def run(*, size: str, device: torch.device, dtypes: Sequence[torch.dtype], wanted, budget: timing.TimingBudget,
        env: dict, skipped: Optional[dict] = None, baseline: Optional[str] = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """Check, then time, every provider's training step (see the module docstring). A provider that
    fails the check is not timed, except the ``baseline`` (its row says that it failed)."""
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        log(f"  train: skipped — transformers is not installed ({exc}); pip install 'fusedformer[hf]'")
        return [dict(env, op=OP, sweep="e2e", config=c["model"], dtype=suite.DTYPE_NAMES[d], mode="train-step",
                     provider="-", status="unavailable: transformers is not installed", unit="tokens/s")
                for c in _configs(size) for d in dtypes]
    names = [p for p in PROVIDERS if wanted is None or any(p == w or p.startswith(w + "-") for w in wanted)]
    step_budget = timing.TimingBudget(seconds=budget.seconds * 4, min_samples=3, max_samples=budget.max_samples,
                                      min_sample_s=0.0, warmup_s=0.0)
    rows = []
    for cfg in _configs(size):
        for dtype in dtypes:
            dname = suite.DTYPE_NAMES[dtype]
            config = " ".join(f"{k}={v}" for k, v in cfg.items())
            log(f"  train e2e: {config} {dname}")
            row0 = dict(env, op=OP, sweep="e2e", config=config, dtype=dname, mode="train-step", unit="tokens/s",
                        _x=cfg["model"], _series="")
            out = {p: dict(row0, provider=p, status="ok", check="") for p in names}
            ref: list = []         # (ref64, base), computed for the first provider that is checked
            models: dict[str, _Model] = {}
            for p in names:

                def check(p=p):
                    try:
                        if not ref:
                            ref.extend(_reference_loss(cfg, device, dtype))
                        m = models[p] = _Model(p, cfg, device, dtype)
                        failure, err, bound = checks.rule_2x("loss", OP, m.loss(), ref[0], ref[1], dtype)
                    except Exception as exc:
                        models.pop(p, None)
                        return suite.status_of(exc, p), ""
                    if failure:
                        return f"{suite.CHECK_FAILED}{failure}", ""
                    return None, f"ok (loss err {err:.1e} <= {bound:.1e}{m.note})"

                status, text = driver.admit(p, skipped=skipped, baseline=baseline,
                                            unavailable=lambda p=p: _static_reason(p, device), check=check)
                if status is not None:
                    out[p]["status"] = status
                    models.pop(p, None)
                    continue
                out[p]["check"] = text
            fns = {}
            for p, m in models.items():
                try:
                    m.step()  # optimizer state, allocator, compilation
                    if size != "quick":
                        m.step()
                    fns[p] = m.step
                except Exception as exc:
                    out[p]["status"] = suite.status_of(exc, p)
            tokens = cfg["B"] * cfg["S"]

            def record(r: dict, t, tokens=tokens) -> None:
                r.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, samples=t.samples,
                         throughput=tokens / (t.median_ms * 1e-3))

            driver.time_into_rows(fns, out, device, step_budget, record, memory=device.type == "cuda")
            rows.extend(out.values())
            models.clear()
            del fns
            gc.collect()
    return rows


# ------------------------------------------------------------------------------------------------
# pytest-benchmark
# ------------------------------------------------------------------------------------------------
def pytest_items(size: str, device: torch.device, wanted) -> tuple[list, list[str]]:
    items, ids = [], []
    for cfg in _configs(size):
        for p in PROVIDERS:
            if wanted is None or any(p == w or p.startswith(w + "-") for w in wanted):
                items.append((cfg, p, device))
                ids.append(f"{cfg['model']}-{p}")
    return items, ids


def test_train(benchmark, bench_item):
    import pytest

    cfg, provider, device = bench_item
    dtype = suite.default_dtypes(OP, device.type)[0]
    pytest.importorskip("transformers")
    why = _static_reason(provider, device)
    if why:
        pytest.skip(f"{provider}: {why}")
    try:
        ref64, base = _reference_loss(cfg, device, dtype)
        m = _Model(provider, cfg, device, dtype)
        failure, _, _ = checks.rule_2x("loss", OP, m.loss(), ref64, base, dtype)
        m.step()
    except Exception as exc:
        pytest.skip(f"{provider}: {suite.status_of(exc, provider)}")
    if failure:
        if provider in suite.FUSEDFORMER_BACKENDS:
            pytest.fail(f"{provider}: check failed: {failure}")
        pytest.skip(f"{provider}: check failed: {failure}")

    def step():
        m.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(op=OP, model=cfg["model"], provider=provider, dtype=suite.DTYPE_NAMES[dtype])
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = cfg["B"] * cfg["S"] / benchmark.stats.stats.median
