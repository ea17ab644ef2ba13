"""``fusedformer-bench``: check, then time, every provider of every op side by side.

    fusedformer-bench --quick                       # CPU-sized, a few minutes
    fusedformer-bench --full --device cuda          # the sweeps of DESIGN.md
    fusedformer-bench --ops layer_norm --backends cpu,torch --dtype float32,bfloat16

Prints a table per (op, sweep, dtype, mode), appends rows to <results>/<op>.csv and writes a PNG per
sweep. See bench/README.md for how to read them.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

OPS = ("attention", "layer_norm", "gelu_ffn", "train")
KNOWN_PROVIDERS = ("reference", "cpu", "cuda", "triton", "torch", "sdpa", "sdpa-math", "sdpa-flash",
                   "sdpa-efficient", "sdpa-cudnn", "compile", "flash-attn", "liger", "hf", "hf-eager", "hf-sdpa",
                   "hf-fusedformer")
DEFAULT_BASELINE = {"attention": "torch", "layer_norm": "torch", "gelu_ffn": "torch", "train": "hf-sdpa"}


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusedformer-bench",
        description="Benchmark fusedformer's kernels and an end-to-end training step against what a user "
                    "would use instead (torch eager, SDPA, torch.compile, flash-attn, Liger-Kernel). Every "
                    "provider is checked against the float64 reference before it is timed.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick",
                      help="small sizes that fit a CPU in a few minutes (the default)")
    size.add_argument("--full", dest="size", action="store_const", const="full",
                      help="the full sweeps (meant for a GPU)")
    p.set_defaults(size="quick")
    p.add_argument("--ops", default=",".join(OPS), metavar="LIST",
                   help=f"comma-separated ops to run, from {', '.join(OPS)} (default: all)")
    p.add_argument("--backends", default="default", metavar="LIST",
                   help="comma-separated providers to run (a prefix before '-' selects a family: 'sdpa' is "
                        f"every SDPA backend); known: {', '.join(KNOWN_PROVIDERS)}; 'all' is every one; "
                        "the default is every one except, in --quick on a CPU, torch.compile (it takes "
                        "minutes to compile there)")
    p.add_argument("--dtype", default=None, metavar="LIST",
                   help="comma-separated dtypes from float32, bfloat16, float16 (default: on a CPU float32, "
                        "plus bfloat16 for layer_norm; on a GPU bfloat16, plus float32 for layer_norm)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="where to run (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--modes", default="fwd,bwd,fwd+bwd", metavar="LIST",
                   help="comma-separated kernel modes from fwd, bwd, fwd+bwd (default: all three)")
    p.add_argument("--baseline", default=None, metavar="PROVIDER",
                   help="the provider speedups are relative to (default: torch for kernels, hf-sdpa for train)")
    p.add_argument("--seconds", type=float, default=None, metavar="S",
                   help="timing per provider and config, in seconds (default: 0.1 with --quick, 1 with "
                        "--full); raise it for a careful run on a noisy machine")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="where CSV rows and plots go (default: bench/results in a source checkout, "
                        "else ./fusedformer-bench-results)")
    p.add_argument("--no-save", action="store_true", help="print the tables only; write no CSV or PNG")
    p.add_argument("--cpu-heap", default="kept", choices=("kept", "default"),
                   help="on a CPU, 'kept' (the default) makes malloc keep freed memory, so that timings are "
                        "of the kernels rather than of first-touch page faults, whose count depends on the "
                        "process's allocation history; 'default' leaves malloc as it is (see "
                        "bench/README.md)")
    return p


def _parse(argv: Optional[Sequence[str]]):
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    from . import suite

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch "
                     f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    args.ops = _csv_list(args.ops)
    bad = [o for o in args.ops if o not in OPS]
    if bad or not args.ops:
        parser.error(f"--ops: unknown op(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(OPS)}")
    args.skipped = {}
    if args.backends.strip() in ("all", "default"):
        if args.backends.strip() == "default" and args.size == "quick" and args.device != "cuda":
            args.skipped = {"compile": "torch.compile takes minutes to compile on a CPU; add --backends all"}
        args.backends = None
    else:
        args.backends = _csv_list(args.backends)
        bad = [b for b in args.backends if b not in KNOWN_PROVIDERS]
        if bad or not args.backends:
            parser.error(f"--backends: unknown provider(s) {', '.join(bad) or '(none given)'}; "
                         f"known: {', '.join(KNOWN_PROVIDERS)} (or 'all')")
    if args.dtype is not None:
        names = _csv_list(args.dtype)
        bad = [d for d in names if d not in suite.DTYPES]
        if bad or not names:
            parser.error(f"--dtype: unknown dtype(s) {', '.join(bad) or '(none given)'}; "
                         f"choose from {', '.join(suite.DTYPES)}")
        args.dtype = [suite.DTYPES[d] for d in names]
    args.modes = _csv_list(args.modes)
    bad = [m for m in args.modes if m not in suite.MODES]
    if bad or not args.modes:
        parser.error(f"--modes: unknown mode(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(suite.MODES)}")
    if args.seconds is not None and not (0 < args.seconds <= 600):
        parser.error(f"--seconds: expected a number of seconds in (0, 600], got {args.seconds}")
    if args.baseline is not None and args.baseline not in KNOWN_PROVIDERS:
        parser.error(f"--baseline: unknown provider {args.baseline!r}; known: {', '.join(KNOWN_PROVIDERS)}")
    return args


def results_dir(arg: Optional[str]) -> Path:
    if arg:
        return Path(arg)
    here = Path(__file__).resolve().parent
    if (here.parent / "pyproject.toml").exists() and (here.parent / "csrc").is_dir():  # a source checkout
        return here / "results"
    return Path.cwd() / "fusedformer-bench-results"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    import torch

    from . import (bench_attention, bench_gelu_ffn, bench_layer_norm, bench_train, ceilings, driver, environment, memory,
                   plot, results, suite, timing)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    device = torch.device(args.device)
    start = time.perf_counter()
    heap_kept = device.type == "cpu" and args.cpu_heap == "kept" and memory.keep_cpu_heap()
    if device.type == "cpu" and args.cpu_heap == "kept" and not heap_kept:
        log("note: could not set malloc options (not glibc?); CPU timings include page faults")
    env = environment.environment(device, heap_kept)
    budget = timing.QUICK_BUDGET if args.size == "quick" else timing.FULL_BUDGET
    if args.seconds is not None:
        budget = dataclasses.replace(budget, seconds=args.seconds, max_samples=max(budget.max_samples, 200),
                                     slow_seconds=max(budget.slow_seconds, 3 * args.seconds))
    out_dir = results_dir(args.results)
    no_plots = None if args.no_save else plot.unavailable()
    if no_plots:
        log(f"note: no plots this run: {no_plots}; the tables and CSV rows are written as usual")
    log(f"fusedformer-bench --{args.size} on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}, git {env['git_sha']})")

    dtype_sets = {op: (args.dtype or suite.default_dtypes(op, device.type)) for op in args.ops}
    all_dtypes = list(dict.fromkeys(d for ds in dtype_sets.values() for d in ds))
    log("measuring ceilings (a large copy, a large matmul per dtype) ...")
    measured = ceilings.measure_ceilings(device, all_dtypes, budget)
    ceiling_text = f"copy {measured.copy_gbps:.1f} GB/s; " + "; ".join(
        f"matmul {suite.DTYPE_NAMES[d]} {t:.3g} TFLOP/s" for d, t in measured.matmul_tflops.items())
    print(f"ceilings on {env['device']}: {ceiling_text} ({measured.notes})")
    all_rows = [ceilings.ceiling_rows(env, measured)]

    kernel_modules = {"attention": bench_attention, "layer_norm": bench_layer_norm, "gelu_ffn": bench_gelu_ffn}
    for op in args.ops:
        t0 = time.perf_counter()
        log(f"{op}:")
        if op == "train":
            rows = bench_train.run(size=args.size, device=device, dtypes=dtype_sets[op], wanted=args.backends,
                                   budget=budget, env=env, skipped=args.skipped,
                                   baseline=args.baseline or DEFAULT_BASELINE[op], log=log)
        else:
            rows = driver.run_op(kernel_modules[op].bench(), size=args.size, device=device, dtypes=dtype_sets[op],
                                 wanted=args.backends, budget=budget, ceilings=measured, env=env,
                                 modes=args.modes, skipped=args.skipped,
                                 baseline=args.baseline or DEFAULT_BASELINE[op], log=log)
        results.add_speedups(rows, args.baseline or DEFAULT_BASELINE[op])
        print(results.format_table(rows), flush=True)
        log(f"{op}: {time.perf_counter() - t0:.0f} s")
        all_rows.append(rows)
        if not args.no_save:
            results.append_csv(out_dir / f"{op}.csv", rows)
            for sweep in dict.fromkeys(r["sweep"] for r in rows):
                path = out_dir / f"{op}-{sweep}-{device.type}.png"
                title = f"{op} / {sweep} on {env['device']} — {env['date']}, git {env['git_sha']}"
                if no_plots is None and plot.plot_sweep([r for r in rows if r["sweep"] == sweep], path, title):
                    log(f"  wrote {path}")
    if not args.no_save:
        results.append_csv(out_dir / "ceilings.csv", all_rows[0])
        log(f"rows appended to {out_dir}/<op>.csv")
    log(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
