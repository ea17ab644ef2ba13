#!/usr/bin/env python3
"""Ahead-of-time compile check of the Triton kernels (kernels/*.py) for real NVIDIA GPUs, without one.

Under TRITON_INTERPRET=1 the kernels run in Triton's CPU interpreter, which accepts code that the
real compiler rejects or compiles badly. This script runs Triton's real pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas -> cubin) for named targets (sm_90, sm_80; sm_86 on request)
on a machine without a GPU:

1. For each target it calls the project's launchers (attention_fwd/bwd, attention_varlen_*,
   layer_norm_fwd/bwd, gelu_ffn_fwd/bwd) with CPU tensors of realistic shapes inside
   ``kernels._configs.aot_target(arch)`` (so the pruners choose for that GPU), after replacing
   Triton's ``JITFunction.run`` and ``Autotuner.run`` with recorders: every launch is captured with
   its exact arguments and constexprs, and nothing runs.
2. For every captured launch it takes the autotuning configurations that the launcher's
   ``early_config_prune`` keeps for that target (``--quick``: only the first, the *default*, which
   ``FUSEDFORMER_TRITON_AUTOTUNE=0`` runs), specializes the arguments as ``JITFunction.run`` would
   (pointer alignment, integers equal to 1, divisibility by 16) and calls
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``.
3. It prints one row per (kernel, configuration, arch): status, shared memory, registers, spills,
   the kind of every ``tl.dot`` after lowering (wgmma / mma.sync / FMA), TMA use, the pipeline
   buffers, layout conversions and the occupancy they allow.

Exit status 1 when any compiled configuration fails to compile or exceeds the per-block shared
memory limit, when a default configuration spills registers, or when a default for a 16-bit case
on sm_90 lowers a ``tl.dot`` to something other than wgmma (``--strict``: also a spill in any kept
configuration); 2 on a usage error; else 0. This is static compiler evidence, not a speed
measurement.

CI runs ``python3 scripts/triton_aot_check.py --quick -j 2`` (.ci/run); the full sweep over every
kept configuration is the same command without ``--quick``. docs/triton_kernels.md carries the
``--markdown`` table of the defaults. The report (console rows, that table) is
``scripts/triton_aot_report.py``.

Needs torch and triton (a Linux x86-64 triton wheel carries ptxas); no GPU, no CUDA toolkit.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (default 90,80; 86 known)")
    p.add_argument("--quick", action="store_true",
                   help="only the default (first kept) configuration of each launch: CI's run")
    p.add_argument("--cases", default=None, help="regular expression: only cases whose name matches")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--compile-pruned", action="store_true",
                   help="also compile every configuration the pruners drop for the target (exploration; "
                        "their failures and spills are reported, never fatal)")
    p.add_argument("--strict", action="store_true", help="a spill in any kept configuration fails too")
    p.add_argument("-j", "--jobs", type=int, default=1, help="parallel compile processes (default 1)")
    p.add_argument("--json", default=None, help="write every row (and full error texts) to this JSON file")
    p.add_argument("--markdown", default=None, help="write the table of default configurations (markdown) here")
    p.add_argument("--keep-ir", default=None, help="write TTGIR and PTX of every compile under this folder")
    p.add_argument("--cache-dir", default=None,
                   help="Triton cache folder (default: a fresh temporary one, so that every kernel is compiled)")
    p.add_argument("--kernels-root", default=None,
                   help="folder that holds the kernels/ package (default: this repository, else fusedformer.kernels)")
    return p.parse_args(argv)


ARGS = parse_args()
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    # The kernels choose their configuration lists and helpers at import: they must see a GPU setup.
    print("triton_aot_check: unsetting TRITON_INTERPRET=1 (the real compiler is the point here)", file=sys.stderr)
os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("FUSEDFORMER_TRITON_AUTOTUNE", None)   # the prune functions must keep every candidate
os.environ.pop("FUSEDFORMER_TRITON_TMA", None)        # the TMA cases switch it on themselves
if ARGS.cache_dir:
    os.environ["TRITON_CACHE_DIR"] = ARGS.cache_dir
else:
    import atexit
    import shutil
    _TMPDIR = tempfile.mkdtemp(prefix="triton_aot_cache_")
    os.environ["TRITON_CACHE_DIR"] = _TMPDIR
    atexit.register(shutil.rmtree, _TMPDIR, True)

import torch                                            # noqa: E402
import triton                                           # noqa: E402
import triton.runtime.autotuner as _autotuner           # noqa: E402
import triton.runtime.jit as _jit                       # noqa: E402
from triton import knobs                                # noqa: E402
from triton.backends.compiler import GPUTarget          # noqa: E402
from triton.compiler import ASTSource, make_backend     # noqa: E402
from triton_aot_report import HEADER, fmt_row, markdown_table  # noqa: E402  (scripts/, beside this file)

# ------------------------------------------------------------------------------------------------
# 1. record launches instead of running them
# ------------------------------------------------------------------------------------------------
RECORDED: list = []


def _record_autotuned(self, *args, **kwargs):
    RECORDED.append(("autotune", self, args, kwargs))


def _record_jit(self, *args, **kwargs):
    RECORDED.append(("jit", self, args, kwargs))


_autotuner.Autotuner.run = _record_autotuned
_jit.JITFunction.run = _record_jit


def _import_kernels():
    root = Path(ARGS.kernels_root) if ARGS.kernels_root else Path(__file__).resolve().parents[1]
    if (root / "kernels" / "attention.py").exists():
        sys.path.insert(0, str(root))
        import kernels._configs as configs
        import kernels.attention as attention
        import kernels.gelu_ffn as gelu_ffn
        import kernels.layer_norm as layer_norm
        return attention, layer_norm, gelu_ffn, configs, str(root / "kernels")
    if ARGS.kernels_root:
        raise SystemExit(f"no kernels/attention.py under {ARGS.kernels_root}")
    import fusedformer.kernels._configs as configs
    import fusedformer.kernels.attention as attention
    import fusedformer.kernels.gelu_ffn as gelu_ffn
    import fusedformer.kernels.layer_norm as layer_norm
    return attention, layer_norm, gelu_ffn, configs, str(Path(attention.__file__).parent)


ATT, LN, FFN, CFG, KERNELS_DIR = _import_kernels()

# Hardware figures per arch: (shared memory per block = the kernels' own table, shared memory per
# SM, registers per SM, warps per SM). CUDA C Programming Guide, "Technical Specifications".
LIMITS = {
    90: (CFG.SMEM_PER_BLOCK[90], 228 * 1024, 65536, 64),
    80: (CFG.SMEM_PER_BLOCK[80], 164 * 1024, 65536, 64),
    86: (CFG.SMEM_PER_BLOCK[86], 100 * 1024, 65536, 48),
}
MAX_BLOCKS_PER_SM = 32
RESERVED_SMEM_PER_BLOCK = 1024      # the driver reserves 1 KB of shared memory per block (sm_80+)

# ------------------------------------------------------------------------------------------------
# 2. the cases: realistic launcher calls (CPU tensors; torch.empty touches no memory)
# ------------------------------------------------------------------------------------------------
SEED = torch.tensor([0x2545F4914F6CDD1D], dtype=torch.int64)   # a 62-bit seed, as rng.new_seed() draws
E = torch.empty
bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


@dataclass
class Case:
    name: str
    family: str
    dtype: torch.dtype          # the inputs' dtype: 16-bit cases must get wgmma on sm_90
    run: object                 # callable that calls the launchers
    archs: tuple = (90, 80, 86)  # archs where the launchers would take this path
    env: dict = field(default_factory=dict)
    quick: bool = True          # also in --quick (CI); False: the full sweep only (slow float32 compiles)


def _bhsd(B, H, S, D, dt, bshd):
    """(B, H, S, D) tensor; bshd: a transposed view of a (B, S, H, D) one, as HF BERT / GPT-2 pass."""
    return E(B, S, H, D, dtype=dt).transpose(1, 2) if bshd else E(B, H, S, D, dtype=dt)


def attention_case(*, B, H, S, D, dt, causal, p, mask=None, Hk=None, bshd=False, bwd=True):
    Hk = Hk or H

    def run():
        q, k, v = _bhsd(B, H, S, D, dt, bshd), _bhsd(B, Hk, S, D, dt, bshd), _bhsd(B, Hk, S, D, dt, bshd)
        attn_mask = E(B, 1, S, S, dtype=dt).expand(B, H, S, S) if mask == "additive" else None  # as ops/ expands
        kpm = E(B, S, dtype=torch.bool) if mask == "padding" else None
        seed = SEED if p > 0 else None
        out, lse = ATT.attention_fwd(q, k, v, attn_mask, kpm, p, causal, D ** -0.5, seed, 0)
        if bwd:
            ATT.attention_bwd(torch.empty_like(out), q, k, v, out, lse, attn_mask, kpm, p, causal, D ** -0.5, seed, 0)
    return run


def attention_varlen_case(*, n, S, H, D, dt, causal, p):
    def run():
        T = n * S
        q, k, v = E(T, H, D, dtype=dt), E(T, H, D, dtype=dt), E(T, H, D, dtype=dt)
        cu = torch.arange(0, T + 1, S, dtype=torch.int32)
        seed = SEED if p > 0 else None
        out, lse = ATT.attention_varlen_fwd(q, k, v, cu, cu, S, S, p, causal, D ** -0.5, seed, 0)
        ATT.attention_varlen_bwd(torch.empty_like(out), q, k, v, out, lse, cu, cu, S, S, p, causal, D ** -0.5,
                                 seed, 0)
    return run


def layer_norm_case(*, M, N, dt, wdt=None, residual=False, p=0.0, rms=False, bias=True):
    wdt = wdt or dt

    def run():
        x = E(M, N, dtype=dt)
        r = E(M, N, dtype=dt) if residual else None
        w = E(N, dtype=wdt)
        b = E(N, dtype=wdt) if bias and not rms else None
        seed = SEED if p > 0 else None
        y, h, mean, rstd = LN.layer_norm_fwd(x, r, w, b, 1e-12, p, seed, 0, rms)
        LN.layer_norm_bwd(torch.empty_like(y), None, h if h.numel() else x, w, mean, rstd, p, seed, 0, rms,
                          b is not None)
    return run


def gelu_ffn_case(*, M, C, F, dt, approximate, p):
    def run():
        x, w1, b1, w2, b2 = E(M, C, dtype=dt), E(F, C, dtype=dt), E(F, dtype=dt), E(C, F, dtype=dt), E(C, dtype=dt)
        seed = SEED if p > 0 else None
        y, pre = FFN.gelu_ffn_fwd(x, w1, b1, w2, b2, approximate, p, seed, 0)
        FFN.gelu_ffn_bwd(torch.empty_like(y), x, w1, w2, pre, approximate, p, seed, 0, True, True)
    return run


def _attn(name, *, dt, archs=(90, 80, 86), env=None, quick=True, **kw):
    return Case(name, "attention", dt, attention_case(dt=dt, **kw), archs=archs, env=env or {}, quick=quick)


# One case per code path the tables distinguish (arch x dtype x head-dim bucket, plus the flags that
# change register pressure): a second case that compiles the same specializations adds only time.
CASES = [
    # attention: BERT-base (B32 S512 H12 d64, HF layout, padding mask, dropout) and GPT-2 (causal)
    _attn("attn d64 bf16 bert pad+drop", B=32, H=12, S=512, D=64, dt=bf16, causal=False, p=0.1, mask="padding",
          bshd=True),
    _attn("attn d64 fp16 causal+drop", B=16, H=12, S=1024, D=64, dt=fp16, causal=True, p=0.1, bshd=True),
    _attn("attn d64 bf16 causal gqa2", B=32, H=12, Hk=6, S=512, D=64, dt=bf16, causal=True, p=0.0),
    # head dim 128: the 450 TFLOP/s target (non-causal, no dropout); causal; additive mask + dropout; GQA
    _attn("attn d128 bf16 plain", B=4, H=16, S=4096, D=128, dt=bf16, causal=False, p=0.0),
    _attn("attn d128 bf16 causal", B=4, H=16, S=4096, D=128, dt=bf16, causal=True, p=0.0),
    _attn("attn d128 fp16 addmask+drop", B=8, H=16, S=1024, D=128, dt=fp16, causal=False, p=0.1, mask="additive"),
    _attn("attn d128 bf16 gqa4 causal", B=4, H=32, Hk=8, S=2048, D=128, dt=bf16, causal=True, p=0.0),
    # head dim 256 (the maximum the launcher takes)
    _attn("attn d256 bf16 causal", B=4, H=8, S=2048, D=256, dt=bf16, causal=True, p=0.0),
    _attn("attn d256 fp16 pad+drop", B=4, H=8, S=2048, D=256, dt=fp16, causal=False, p=0.1, mask="padding"),
    # float32 (IEEE products on the FMA units, no TF32): the correctness path
    _attn("attn d64 fp32 plain", B=8, H=12, S=512, D=64, dt=fp32, causal=False, p=0.0),
    _attn("attn d128 fp32 causal+drop", B=2, H=8, S=1024, D=128, dt=fp32, causal=True, p=0.1, quick=False),
    _attn("attn d256 fp32 pad+drop", B=2, H=8, S=1024, D=256, dt=fp32, causal=False, p=0.1, mask="padding",
          quick=False),
    # varlen (packed, cu_seqlens), dropout: the per-element Philox path
    Case("attn-varlen d64 bf16 causal+drop", "attention", bf16,
         attention_varlen_case(n=32, S=512, H=12, D=64, dt=bf16, causal=True, p=0.1)),
    # the opt-in TMA forward (FUSEDFORMER_TRITON_TMA=1): Hopper only; older GPUs take the pointer path
    _attn("attn-tma d64 bf16 plain", B=32, H=12, S=512, D=64, dt=bf16, causal=False, p=0.0, bwd=False,
          archs=(90,), env={"FUSEDFORMER_TRITON_TMA": "1"}),
    _attn("attn-tma d128 bf16 causal+drop", B=4, H=16, S=4096, D=128, dt=bf16, causal=True, p=0.1, bwd=False,
          archs=(90,), env={"FUSEDFORMER_TRITON_TMA": "1"}),
    # layer_norm: BERT rows (16k x 768), 1024, 4096; residual + dropout (post-LN block); mixed weights;
    # RMSNorm; the chunked path for rows wider than ROWS_MAX_WIDTH
    Case("ln 768 bf16 res+drop", "layer_norm", bf16, layer_norm_case(M=16384, N=768, dt=bf16, residual=True, p=0.1)),
    Case("ln 768 fp16 plain", "layer_norm", fp16, layer_norm_case(M=16384, N=768, dt=fp16)),
    Case("ln 1024 bf16 w-fp32", "layer_norm", bf16, layer_norm_case(M=16384, N=1024, dt=bf16, wdt=fp32)),
    Case("ln 4096 bf16 res+drop", "layer_norm", bf16, layer_norm_case(M=16384, N=4096, dt=bf16, residual=True, p=0.1)),
    Case("ln 4096 fp16 rms", "layer_norm", fp16, layer_norm_case(M=16384, N=4096, dt=fp16, rms=True)),
    Case("ln 8192 bf16 res+drop", "layer_norm", bf16, layer_norm_case(M=8192, N=8192, dt=bf16, residual=True, p=0.1)),
    Case("ln 8192 fp32 plain", "layer_norm", fp32, layer_norm_case(M=8192, N=8192, dt=fp32)),
    Case("ln 16384 bf16 res+drop chunked", "layer_norm", bf16,
         layer_norm_case(M=4096, N=16384, dt=bf16, residual=True, p=0.1)),
    Case("ln 65536 fp16 plain chunked", "layer_norm", fp16, layer_norm_case(M=1024, N=65536, dt=fp16)),
    # gelu_ffn: BERT-base 768 -> 3072 -> 768 over 32 x 512 tokens
    Case("ffn bert bf16 erf+drop", "gelu_ffn", bf16,
         gelu_ffn_case(M=16384, C=768, F=3072, dt=bf16, approximate="none", p=0.1)),
    Case("ffn bert fp16 tanh", "gelu_ffn", fp16,
         gelu_ffn_case(M=16384, C=768, F=3072, dt=fp16, approximate="tanh", p=0.0)),
    Case("ffn bert fp32 erf", "gelu_ffn", fp32,
         gelu_ffn_case(M=4096, C=768, F=3072, dt=fp32, approximate="none", p=0.0)),
]


# ------------------------------------------------------------------------------------------------
# 3. launches -> compile jobs (specialized exactly as JITFunction.run does)
# ------------------------------------------------------------------------------------------------
@dataclass
class Job:
    key: str
    kernel: str
    config: str
    arch: int
    chosen: str                 # "default" (first kept: AUTOTUNE=0), "kept", "pruned", "fixed" (not autotuned)
    num_warps: int
    num_stages: int
    cases: list
    half: bool                  # a 16-bit case reaches it (its tl.dots must be wgmma on sm_90)
    fn: object = None
    src_args: tuple = None      # (signature, constexprs, attrs)
    options: dict = None


def _config_label(kwargs, opts):
    tiles = "x".join(str(kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_P", "BLOCK_Q", "BLOCK_R")
                     if k in kwargs)
    s = f"{tiles} " if tiles else ""
    return f"{s}w{opts.num_warps} s{opts.num_stages}"


_BINDERS = {}


def _specialize(fn, args, kwargs, arch):
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    b = _BINDERS.get((id(fn), arch))
    if b is None:
        b = _BINDERS[(id(fn), arch)] = _jit.create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", bool(fn.debug) or knobs.runtime.debug)
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, spec, opts = b(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return options, signature, constexprs, attrs


def _short_repr(v):
    return v.cache_key if hasattr(v, "cache_key") else repr(v)


@contextlib.contextmanager
def _env(update):
    old = {k: os.environ.get(k) for k in update}
    os.environ.update(update)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_jobs(cases, archs):
    """Per target: call every case's launchers under ``aot_target(arch)`` and turn each recorded
    launch x configuration into one compile job (identical specializations are compiled once)."""
    jobs: dict[str, Job] = {}
    order = []
    n_pruned = 0
    for arch in archs:
        for case in cases:
            if arch not in case.archs:
                continue
            RECORDED.clear()
            with CFG.aot_target(arch), _env(case.env):
                case.run()
                recorded = list(RECORDED)
                for kind, obj, args, kwargs in recorded:
                    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
                    if kind == "autotune":
                        fn = obj.fn
                        while not isinstance(fn, _jit.JITFunction):
                            fn = fn.fn
                        obj.nargs = dict(zip(obj.arg_names, args))
                        kept = obj.prune_configs(kwargs) if len(obj.configs) > 1 else list(obj.configs)
                        obj.nargs = None
                        variants = [(c, "default" if i == 0 else "kept") for i, c in enumerate(kept)]
                        if ARGS.quick:
                            variants = variants[:1]
                        pruned = [c for c in obj.configs if c not in kept]
                        n_pruned += len(pruned)
                        if ARGS.compile_pruned and not ARGS.quick:
                            variants += [(c, "pruned") for c in pruned]
                    else:
                        fn = obj
                        variants = [(None, "fixed")]
                    for c, chosen in variants:
                        call_kwargs = dict(kwargs)
                        if c is not None:
                            call_kwargs.update(c.all_kwargs())
                            if c.pre_hook is not None:       # e.g. the TMA descriptors' block shapes
                                c.pre_hook({**dict(zip(obj.arg_names, args)), **call_kwargs})
                        options, signature, constexprs, attrs = _specialize(fn, args, call_kwargs, arch)
                        label = _config_label(call_kwargs, options)
                        const_txt = ",".join(f"{fn.arg_names[k[0]]}={_short_repr(v)}"
                                             for k, v in sorted(constexprs.items()))
                        key = "|".join([fn.__module__, fn.__name__, str(arch), repr(sorted(signature.items())),
                                        const_txt, repr(sorted(attrs.items())), options.hash()])
                        rank = {"default": 0, "fixed": 0, "kept": 1, "pruned": 2}
                        if key in jobs:
                            j = jobs[key]
                            if case.name not in j.cases:
                                j.cases.append(case.name)
                            j.half = j.half or case.dtype != fp32
                            if rank[chosen] < rank[j.chosen]:
                                j.chosen = chosen
                            continue
                        jobs[key] = Job(key=key, kernel=fn.__name__, config=label, arch=arch, chosen=chosen,
                                        num_warps=options.num_warps, num_stages=options.num_stages,
                                        cases=[case.name], half=case.dtype != fp32, fn=fn,
                                        src_args=(signature, constexprs, attrs), options=options.__dict__)
                        order.append(key)
    return [jobs[k] for k in order], n_pruned


# ------------------------------------------------------------------------------------------------
# 4. compile one job and read what it costs
# ------------------------------------------------------------------------------------------------
_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


@contextlib.contextmanager
def _capture_fd2():
    """Capture what native code (MLIR diagnostics, ptxas) writes to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        box = {}
        try:
            yield box
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box["text"] = tmp.read().decode(errors="replace")


def _dot_kinds(ttgir: str):
    """Count the matrix products of the TTGIR by how they are lowered: wgmma (warp_group_dot,
    Hopper), mma.sync (tt.dot on an nvidia_mma v2 layout) or FMA (tt.dot on a blocked layout)."""
    enc = {}
    for m in re.finditer(r"^(#\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+)", ttgir, re.M):
        enc[m.group(1)] = int(m.group(2))
    wgmma = len(re.findall(r"= ttng\.warp_group_dot ", ttgir))
    mma = fma = 0
    for m in re.finditer(r"= tt\.dot .*-> tensor<[^,>]+, (#\w+)>", ttgir):
        v = enc.get(m.group(1))
        if v is None:
            fma += 1
        elif v >= 3:
            wgmma += 1
        else:
            mma += 1
    return wgmma, mma, fma


def _pipeline_buffers(ttgir: str) -> int:
    """Largest multi-buffered shared allocation (the software pipeline depth actually built)."""
    depths = [int(m.group(1)) for m in
              re.finditer(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    return max(depths, default=0)


def _occupancy(arch, shared, regs, num_warps):
    smem_block, smem_sm, regs_sm, warps_sm = LIMITS[arch]
    by_warps = warps_sm // num_warps
    by_smem = smem_sm // (shared + RESERVED_SMEM_PER_BLOCK) if shared else MAX_BLOCKS_PER_SM
    per_thread = -(-max(regs, 1) // 8) * 8                  # allocated per warp in units of 256 registers
    by_regs = (regs_sm // (per_thread * 32)) // num_warps
    return max(0, min(by_warps, by_smem, by_regs, MAX_BLOCKS_PER_SM))


def compile_job(job: Job) -> dict:
    signature, constexprs, attrs = job.src_args
    target = GPUTarget("cuda", job.arch, 32)
    row = dict(kernel=job.kernel, config=job.config, arch=job.arch, chosen=job.chosen, cases=job.cases,
               half=job.half, num_warps=job.num_warps, num_stages=job.num_stages,
               signature={k: str(v) for k, v in signature.items()},
               constexprs={job.fn.arg_names[k[0]]: _short_repr(v) for k, v in constexprs.items()})
    knobs.nvidia.dump_ptxas_log = True
    t0 = time.perf_counter()
    for attempt in range(2):
        out = io.StringIO()
        try:
            with _capture_fd2() as err, contextlib.redirect_stdout(out):
                ck = triton.compile(ASTSource(job.fn, signature, constexprs, attrs), target=target,
                                    options=job.options)
            break
        except Exception as e:     # the compiler's own error, whatever stage raised it
            # ptxas killed by a signal (error code -N: another process's kill, memory pressure)
            # is no verdict on the kernel: compile once more.
            if attempt == 0 and re.search(r"failed with error code -\d+", str(e)):
                continue
            row.update(status="FAIL", seconds=round(time.perf_counter() - t0, 2),
                       error=f"{type(e).__name__}: {e}".strip(),
                       compiler_stderr=err.get("text", "")[-20000:],
                       traceback=traceback.format_exc()[-4000:])
            return row
    row["seconds"] = round(time.perf_counter() - t0, 2)
    log = out.getvalue()
    for k, rx in _PTXAS_RE.items():
        m = rx.search(log)
        row[k] = int(m.group(1)) if m else None
    ttgir, ptx = ck.asm["ttgir"], ck.asm["ptx"]
    row["shared"] = int(ck.metadata.shared or 0)
    row["num_warps"] = int(ck.metadata.num_warps)
    row["wgmma"], row["mma_sync"], row["fma_dot"] = _dot_kinds(ttgir)
    row["ptx_wgmma"] = ptx.count("wgmma.mma_async")
    row["ptx_mma_sync"] = ptx.count("mma.sync")
    row["tma"] = ptx.count("cp.async.bulk.tensor")
    row["cp_async"] = len(re.findall(r"cp\.async\.c[ga]\.", ptx))
    row["buffers"] = _pipeline_buffers(ttgir)
    row["convert_layout"] = ttgir.count("ttg.convert_layout")
    row["occupancy"] = _occupancy(job.arch, row["shared"], row["regs"] or 0, row["num_warps"])
    problems = []
    if row["shared"] > LIMITS[job.arch][0]:
        problems.append("SMEM")
    if (row["spill_st"] or 0) > 0 or (row["spill_ld"] or 0) > 0:
        problems.append("SPILL")
    if row["regs"] is None:
        problems.append("NOLOG")
    if job.arch >= 90 and job.half and (row["mma_sync"] or row["fma_dot"]):
        problems.append("NOWGMMA")
    row["status"] = "+".join(problems) if problems else "OK"
    if ARGS.keep_ir:
        d = Path(ARGS.keep_ir)
        d.mkdir(parents=True, exist_ok=True)
        stem = f"{job.kernel}.sm{job.arch}.{hashlib.sha1(job.key.encode()).hexdigest()[:10]}"
        (d / f"{stem}.ttgir").write_text(ttgir)
        (d / f"{stem}.ptx").write_text(ptx)
        row["ir"] = str(d / stem)
    return row


_JOBS: list = []


def _compile_index(i):
    return i, compile_job(_JOBS[i])


def _cost(job: Job) -> float:
    """A rough compile-time guess, to start the longest compiles first (less idle tail with -j)."""
    c = dict((job.fn.arg_names[k[0]], v) for k, v in job.src_args[1].items())
    tile = 1
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_P", "BLOCK_Q"):
        tile *= int(c.get(k, 1)) if isinstance(c.get(k, 1), int) else 1
    width = int(c.get("BLOCK_D", 0) or 0) + int(c.get("BLOCK_DV", 0) or 0) + int(c.get("BLOCK_K", 0) or 0)
    return tile * max(width, 1)


def main():
    archs = [int(a) for a in ARGS.arch.split(",") if a.strip()]
    for a in archs:
        if a not in LIMITS:
            print(f"unknown arch {a}; known: {sorted(LIMITS)}", file=sys.stderr)
            return 2
    if ARGS.list:
        for c in CASES:
            print(f"{c.family:<11} {c.name:<36} {str(c.dtype).replace('torch.', ''):<9} "
                  f"archs={','.join(map(str, c.archs))}{'' if c.quick else '  (full sweep only)'}")
        return 0
    # --quick leaves out the full-sweep-only cases unless --cases names them
    cases = [c for c in CASES if re.search(ARGS.cases, c.name)] if ARGS.cases else \
        [c for c in CASES if c.quick or not ARGS.quick]
    if not cases:
        print("no case matches --cases", file=sys.stderr)
        return 2
    try:
        ptxas = knobs.nvidia.ptxas.path
    except Exception as e:      # a triton build without the NVIDIA backend (e.g. not Linux x86-64)
        print(f"no ptxas in this triton ({e}); install the Linux x86-64 triton wheel", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    jobs, n_pruned = build_jobs(cases, archs)
    print(f"triton {triton.__version__}, torch {torch.__version__}, kernels from {KERNELS_DIR}")
    print(f"{len(cases)} cases x sm_{'/'.join(map(str, archs))} -> {len(jobs)} (kernel, config, arch) compiles; "
          f"{n_pruned} (launch, configuration) pairs pruned for their target (ptxas: {ptxas})", flush=True)
    print(HEADER, flush=True)
    rows = [None] * len(jobs)
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))   # longest first
    if ARGS.jobs > 1:
        import multiprocessing as mp
        _JOBS[:] = jobs
        with mp.get_context("fork").Pool(ARGS.jobs) as pool:
            for i, r in pool.imap_unordered(_compile_index, order):
                rows[i] = r
                print(fmt_row(r), flush=True)
    else:
        for i in order:
            rows[i] = compile_job(jobs[i])
            print(fmt_row(rows[i]), flush=True)
    wall = time.perf_counter() - t_start
    ru_self, ru_child = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru_self.ru_utime + ru_self.ru_stime + ru_child.ru_utime + ru_child.ru_stime

    chosen = [r for r in rows if r["chosen"] != "pruned"]       # what the launchers can run
    fails = [r for r in chosen if r["status"] == "FAIL"]
    smem = [r for r in chosen if "SMEM" in r["status"]]
    nolog = [r for r in chosen if "NOLOG" in r["status"]]
    defaults = [r for r in chosen if r["chosen"] in ("default", "fixed")]
    spill_default = [r for r in defaults if "SPILL" in r["status"]]
    nowgmma = [r for r in defaults if "NOWGMMA" in r["status"]]
    spill_kept = [r for r in chosen if r["chosen"] == "kept" and "SPILL" in r["status"]]
    clean = [r for r in chosen if r["status"] == "OK"]
    print()
    print(f"{len(chosen)} compiled configurations the launchers can choose ({len(defaults)} defaults): "
          f"{len(clean)} OK, {len(fails)} FAIL, {len(smem)} over the shared-memory limit, {len(spill_default)} "
          f"defaults spilling, {len(nowgmma)} 16-bit sm_90 defaults without wgmma, {len(spill_kept)} non-default "
          f"spilling; wall {wall:.0f} s, CPU {cpu:.0f} s, -j {ARGS.jobs}")
    if ARGS.compile_pruned:
        extra = [r for r in rows if r["chosen"] == "pruned"]
        print(f"(also compiled {len(extra)} pruned configurations: "
              f"{sum(r['status'] == 'OK' for r in extra)} clean; never fatal)")
    for r in fails:
        print(f"\nFAIL sm_{r['arch']} {r['kernel']} [{r['config']}] ({'; '.join(r['cases'])}):\n  {r['error'][:3000]}")
        tail = r.get("compiler_stderr", "").strip()
        if tail:
            print("  compiler stderr (tail):\n    " + "\n    ".join(tail.splitlines()[-25:]))
    for title, bad in (("over the shared-memory limit", smem), ("default spilling", spill_default),
                       ("16-bit sm_90 default without wgmma", nowgmma), ("no ptxas log", nolog)):
        for r in bad:
            print(f"{title}: sm_{r['arch']} {r['kernel']} [{r['config']}] ({'; '.join(r['cases'])[:120]})")
    if spill_kept:
        print(f"note: {len(spill_kept)} non-default configurations spill (the autotuner may time them): "
              + ", ".join(sorted({f"{r['kernel']}[{r['config']}]/sm_{r['arch']}" for r in spill_kept}))[:2000])
    fma = [r for r in chosen if r["status"] != "FAIL" and r.get("fma_dot")]
    if fma:
        print(f"note: {len(fma)} rows lower some tl.dot to FMA (float32 inputs: IEEE products, no tensor cores): "
              + ", ".join(sorted({f"{r['kernel']}/sm_{r['arch']}" for r in fma}))[:2000])
    command = " ".join(["python3 scripts/triton_aot_check.py"] + sys.argv[1:])
    meta = dict(triton=triton.__version__, torch=torch.__version__, archs=archs, quick=ARGS.quick,
                wall_s=round(wall, 1), cpu_s=round(cpu, 1), jobs=ARGS.jobs,
                limits={str(k): v for k, v in LIMITS.items()}, command=command)
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    if ARGS.markdown:
        Path(ARGS.markdown).write_text(markdown_table(rows, meta))
    bad = fails or smem or nolog or spill_default or nowgmma or (spill_kept and ARGS.strict)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
