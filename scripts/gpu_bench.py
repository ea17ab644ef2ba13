"""Focused speed for the GPU session (``scripts/gpu_session.sh``): the shapes of issue 20, each
provider checked against the float64 reference and then timed, one CSV row per (case, dtype, mode,
provider), appended to ``--out`` as each case finishes (a run cut short keeps every row before the cut).

    python scripts/gpu_bench.py --out bench.csv              # on a GPU
    python scripts/gpu_bench.py --out bench.csv --dry-run    # on a CPU: tiny shapes, float32, the cpu
                                                             # backend and the Triton interpreter

This is the benchmark suite's own machinery (``bench/driver.py``: ``run_op`` checks with the 2x rule
before timing, times with ``triton.testing.do_bench`` on a GPU, writes the suite's CSV columns) on a
short list of cases; only the case list, the provider lists and the bare-GEMM rows are new here.

* ceilings, measured first in the same run: a 1 GiB device copy (GB/s) and an 8192^3 matmul in the
  benchmark dtype (TFLOP/s); rows with ``op = ceiling``; every other row has ``pct_of_ceiling``.
* attention, forward and forward+backward, batch x seq = 16k tokens: D=128 S=4096 (16 heads) causal
  and not, D=64 S=2048 (32 heads), and BERT-base (32 x 512, 12 heads of 64, 20% key padding,
  dropout 0.1) — against SDPA's flash and cuDNN backends, and its efficient backend (the one that
  takes the padding mask). TFLOP/s is the nominal 4*B*H*S^2*D (x0.5 causal, x3.5 fwd+bwd).
* gelu_ffn, forward and forward+backward, M=16384, C=1024, F=4096 and BERT-base (768 -> 3072) on
  32 x 512 tokens — against eager PyTorch and a bare pair of ``torch.mm`` (the same two GEMMs without
  bias or GELU: the cuBLAS ceiling for this work; not checked, it computes something else).
* layer_norm, forward and backward, M=32768, widths 768 / 1024 / 4096 — against ``F.layer_norm``.

Triton kernels run with ``FUSEDFORMER_TRITON_AUTOTUNE`` as the environment sets it; the session sets
it to 0 (each kernel's first configuration that fits: autotuning every case would take minutes of
compiling), and the triton rows' check column says which.
"""
from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # before anything imports triton: the kernels run in its CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from fusedformer.bench import bench_attention, bench_gelu_ffn, bench_layer_norm, common  # noqa: E402

OPS = ("attention", "gelu_ffn", "layer_norm")
SWEEP = "gpu-session"
# Budgets for the CPU's interleaved timer (a GPU is timed by do_bench, which ignores them).
# The dry run takes one sample a provider: it rehearses the code, it measures nothing.
DRY_BUDGET = common.TimingBudget(seconds=0.0, min_samples=1, max_samples=1, min_sample_s=0.0, warmup_s=0.0,
                                 slow_seconds=1.0)


@dataclasses.dataclass
class Focus:
    """One focused case: the op, its params on a GPU and in the dry run, the modes, the providers
    (on a GPU, and in the dry run) and the speedup baseline."""
    op: str
    label: str
    params: dict
    tiny: dict
    modes: tuple
    providers: tuple
    dry_providers: tuple
    baseline: str


ATTN_GPU = ("cuda", "triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
ATTN_DRY = ("cpu", "triton", "sdpa-flash", "sdpa-efficient")   # efficient: CUDA only, shows the reason
KERNEL_GPU = ("cuda", "triton", "torch")
KERNEL_DRY = ("cpu", "triton", "torch")


def _attn(label, B, H, S, D, causal=False, pad_frac=0.0, dropout_p=0.0, tiny=None, baseline="sdpa-flash"):
    p = {"B": B, "H": H, "S": S, "D": D, "causal": causal, "padding": pad_frac > 0, "dropout_p": dropout_p}
    if pad_frac:
        p["pad_frac"] = pad_frac
    return Focus("attention", label, p, tiny or {}, ("fwd", "fwd+bwd"), ATTN_GPU, ATTN_DRY, baseline)


CASES = [
    _attn("D=128 S=4096 (16k tokens)", 4, 16, 4096, 128, tiny=dict(B=1, H=1, S=16, D=32)),
    _attn("D=128 S=4096 causal (16k tokens)", 4, 16, 4096, 128, causal=True, tiny=dict(B=1, H=1, S=16, D=32)),
    _attn("D=64 S=2048 (16k tokens)", 8, 32, 2048, 64, tiny=dict(B=1, H=1, S=16, D=16)),
    _attn("BERT-base 32x512, 20% padding, dropout 0.1", 32, 12, 512, 64, pad_frac=0.2, dropout_p=0.1,
          tiny=dict(B=2, H=1, S=20, D=16), baseline="sdpa-efficient"),
    Focus("gelu_ffn", "M=16384 C=1024 F=4096 erf",
          {"M": 16384, "C": 1024, "F": 4096, "approximate": "none", "dropout_p": 0.0},
          dict(M=16, C=16, F=32), ("fwd", "fwd+bwd"), KERNEL_GPU, KERNEL_DRY, "torch"),
    Focus("gelu_ffn", "BERT-base M=16384 C=768 F=3072 erf",
          {"M": 16384, "C": 768, "F": 3072, "approximate": "none", "dropout_p": 0.0},
          dict(M=8, C=24, F=40), ("fwd", "fwd+bwd"), KERNEL_GPU, KERNEL_DRY, "torch"),
] + [
    Focus("layer_norm", f"M=32768 N={n}", {"M": 32768, "N": n, "residual": False, "dropout_p": 0.0},
          dict(M=2), ("fwd", "bwd"), KERNEL_GPU, KERNEL_DRY, "torch")
    for n in (768, 1024, 4096)
]

MODULES = {"attention": bench_attention, "gelu_ffn": bench_gelu_ffn, "layer_norm": bench_layer_norm}


def attention_inputs(params: dict, dtype: torch.dtype, device: torch.device):
    """bench_attention's inputs; with ``pad_frac``, key padding of that fraction on average (sequence
    lengths spread evenly over [S (1 - 2 pad_frac), S]) instead of the suite's lengths in [S/2, S]."""
    frac = params.get("pad_frac", 0.0)
    t, leaves = bench_attention.make_inputs({**params, "padding": params["padding"] and not frac}, dtype, device)
    if frac:
        B, S = params["B"], params["S"]
        steps = torch.linspace(0.0, 1.0, B) if B > 1 else torch.ones(1)
        lengths = torch.round(S * (1 - 2 * frac + 2 * frac * steps)).long().clamp(1, S)
        t["pad"] = (torch.arange(S)[None, :] >= lengths[:, None]).to(device)  # (B, S) True = padding
    return t, leaves


def _label(focus: Focus, dry: bool) -> str:
    """The table's name for the case: the GPU shape, or the dry run's tiny one."""
    if not dry:
        return focus.label
    return "dry run: " + " ".join(f"{k}={v}" for k, v in focus.tiny.items())


def _op_bench(focus: Focus, params: dict, label: str) -> common.OpBench:
    base = MODULES[focus.op].bench()
    case = common.Case(focus.op, SWEEP, params, label, label)
    bench = dataclasses.replace(base, cases=lambda size, device: [case])
    if focus.op == "attention":
        bench = dataclasses.replace(bench, make_inputs=attention_inputs)
    return bench


def _gemm_pair(t: dict, p: dict):
    """The gelu_ffn's two GEMMs and nothing else: x W1^T, then (that) W2^T."""
    return torch.mm(torch.mm(t["x"], t["w1"].t()), t["w2"].t())


def gemm_rows(bench: common.OpBench, params: dict, label: str, modes, dtype, device, budget, ceilings,
              env) -> list[dict]:
    """Rows for a bare torch.mm pair at the gelu_ffn case's shapes (same FLOP count as the FFN)."""
    rows = []
    provider = common.Provider("torch.mm", _gemm_pair)
    tensors, _ = bench.make_inputs(params, dtype, device)
    leaves = ["x", "w1", "w2"]
    for mode in modes:
        row = dict(env, op=bench.op, sweep=SWEEP, config=common.Case(bench.op, SWEEP, params, "", "").config(),
                   dtype=common.DTYPE_NAMES[dtype], mode=mode, provider="torch.mm", status="ok", unit=bench.unit,
                   _label=label,
                   check="not checked: the two GEMMs alone, no bias or GELU (the cuBLAS ceiling)")
        try:
            fn = common.mode_runner(provider, tensors, leaves, params, mode)
            t = common.time_providers({"torch.mm": fn}, device, budget)["torch.mm"]
            if isinstance(t, BaseException):
                raise t
            common._record(row, t, bench.work(params, mode, dtype), bench.unit, ceilings, dtype)
        except Exception as exc:
            row["status"] = common.status_of(exc, "torch.mm")
        rows.append(row)
    return rows


def _skipped_rows(focus, params, providers, dtype, env, why) -> list[dict]:
    config = common.Case(focus.op, SWEEP, params, "", "").config()
    return [dict(env, op=focus.op, sweep=SWEEP, config=config, dtype=common.DTYPE_NAMES[dtype], mode=m, provider=p,
                 status=f"skipped: {why}", unit=MODULES[focus.op].bench().unit)
            for m in focus.modes for p in providers]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="CSV file the rows are appended to (bench/results.py's columns)")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes, float32")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {', '.join(OPS)}")
    ap.add_argument("--dtype", default=None, choices=tuple(common.DTYPES),
                    help="default: bfloat16 on a GPU, float32 in the dry run (a CPU's bfloat16 matmul ceiling "
                         "takes minutes)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="Unix time after which no case starts (its rows say skipped)")
    args = ap.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        ap.error(f"--ops: unknown {bad}; choose from {OPS}")

    if args.dry_run:
        device, budget = torch.device("cpu"), DRY_BUDGET
    else:
        if not torch.cuda.is_available():
            print("gpu_bench: no CUDA GPU is visible to torch (use --dry-run on a CPU)", file=sys.stderr)
            return 2
        device, budget = torch.device("cuda"), common.FULL_BUDGET
    dtype = common.DTYPES[args.dtype or ("float32" if args.dry_run else "bfloat16")]
    out = Path(args.out)
    env = common.environment(device)
    autotune = os.environ.get("FUSEDFORMER_TRITON_AUTOTUNE", "1") != "0"
    triton_note = "triton autotune " + ("on" if autotune else "off (first fitting config)")
    print(f"gpu_bench on {env['device']} (torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"git {env['git_sha']}); {common.DTYPE_NAMES[dtype]}; {triton_note}", flush=True)

    t0 = time.perf_counter()
    ceilings = common.measure_ceilings(device, [dtype], budget)
    ceiling_rows = common.ceiling_rows(env, ceilings)
    common.append_csv(out, ceiling_rows)
    print(f"ceilings: copy {ceilings.copy_gbps:.1f} GB/s, matmul {common.DTYPE_NAMES[dtype]} "
          f"{ceilings.matmul_tflops[dtype]:.3g} TFLOP/s ({ceilings.notes}; {time.perf_counter() - t0:.1f} s)",
          flush=True)

    failed = 0
    for focus in (c for c in CASES if c.op in ops):
        params = {**focus.params, **focus.tiny} if args.dry_run else dict(focus.params)
        providers = focus.dry_providers if args.dry_run else focus.providers
        if args.deadline is not None and time.time() > args.deadline:
            rows = _skipped_rows(focus, params, providers, dtype, env, "the session's deadline for this step passed")
            common.append_csv(out, rows)
            print(f"  not run (deadline): {focus.op} {focus.label}", flush=True)
            continue
        t1 = time.perf_counter()
        label = _label(focus, args.dry_run)
        bench = _op_bench(focus, params, label)
        rows = common.run_op(bench, size="focus", device=device, dtypes=[dtype], wanted=list(providers),
                             budget=budget, ceilings=ceilings, env=env, modes=list(focus.modes),
                             baseline=focus.baseline, log=lambda m: None)
        if focus.op == "gelu_ffn":
            rows += gemm_rows(bench, params, label, focus.modes, dtype, device, budget, ceilings, env)
        common.add_speedups(rows, focus.baseline)
        for r in rows:
            if r["provider"] == "triton":
                r["check"] = f"{r.get('check') or ''}; {triton_note}".strip("; ")
            status = str(r.get("status", ""))
            if r["provider"] in common.FUSEDFORMER_BACKENDS and status.startswith(("check failed", "error")):
                failed += 1
        common.append_csv(out, rows)
        print(common.format_table(rows), flush=True)
        print(f"  ({focus.op} {focus.label}: {time.perf_counter() - t1:.1f} s)", flush=True)
        del rows, bench
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"gpu_bench: done in {time.perf_counter() - t0:.0f} s; {failed} fusedformer rows failed their check "
          "or raised", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
