"""Correctness smoke of one op for the GPU session (``scripts/gpu_session.sh``): the ``cuda`` and
``triton`` backends against the float64 reference by the project's 2x rule, one JSON line per
(case, backend), appended to ``--out`` as each case finishes (a run cut short keeps every line
before the cut).

    python scripts/gpu_smoke.py --op attention --out smoke.jsonl            # on a GPU
    python scripts/gpu_smoke.py --op attention --out smoke.jsonl --dry-run  # on a CPU: cpu + Triton
                                                                            # interpreter, tiny shapes

The session runs one process per op, so that a sticky CUDA error (an illegal address poisons the
context) cannot hide the other ops; within a process, a sticky error ends the run and the cases
left are written as ``not run``.

Each case runs the backend in the case's dtype on the device, the reference in that dtype
(``base``) and in float64 (``ref64``) — on the device too by default (``--ref-device cpu`` for the
CPU: a host without AVX-512 takes minutes for a bfloat16 matmul, and the 16k sequence's float64
scores are 2 GiB a head; on the GPU the reference's 16-bit matmuls are told to accumulate in full
precision, as on a CPU) — and holds the outputs and every gradient to the project's rule
(``fusedformer.testing.check_2x``, which the tests and the benchmarks' check before timing use too,
with its one tolerance table):

    max|out - ref64| <= 2 * max|base - ref64| + atol[op][dtype]

A JSON line: ``op, case, backend, dtype, shape, status (pass | fail | error | unsupported |
not run), passed, worst (the largest err / bound), worst_tensor, seconds, detail, device``.
Exit status 0 when every line passed.
"""
from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # before anything imports triton: the kernels run in its CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, if anything uses it

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

import fusedformer as ff  # noqa: E402
from fusedformer.backends import BackendError  # noqa: E402
from fusedformer.testing import check_2x as rule_2x  # noqa: E402  (the 2x rule, its one tolerance table)
from fusedformer.testing import attention_inputs, gelu_ffn_inputs  # noqa: E402

OPS = ("attention", "gelu_ffn", "layer_norm")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
DTYPE_NAMES = {BF16: "bfloat16", FP16: "float16", FP32: "float32"}
SEED = 2**40 + 17   # dropout seed (a high word, as the tests use)


@dataclass
class Case:
    """One smoke case: ``params`` on a GPU, ``params | tiny`` in the dry run."""
    name: str
    dtype: torch.dtype
    params: dict
    tiny: dict = field(default_factory=dict)

    def shape(self, dry: bool) -> dict:
        return {**self.params, **self.tiny} if dry else dict(self.params)


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------
def _attn(name, dtype, B, H, Hk, Sq, Sk, D, Dv=None, *, tiny=None, **flags) -> Case:
    p = dict(B=B, H=H, Hk=Hk, Sq=Sq, Sk=Sk, D=D, Dv=Dv or D, causal=False, transposed=False, padding=False,
             mask_row_min=False, dropout_p=0.0, deterministic=False, lse=True)
    p.update(flags)
    small = dict(B=min(B, 2), H=min(H, 2 * max(1, H // Hk)), Hk=min(Hk, 2), Sq=min(Sq, 9), Sk=min(Sk, 13))
    small["H"] = small["Hk"] * (H // Hk)
    small.update(tiny or {})
    return Case(name, dtype, p, small)


ATTENTION = [
    _attn("d64", BF16, 2, 4, 4, 257, 257, 64),
    _attn("d64-causal", FP16, 2, 4, 4, 257, 257, 64, causal=True),
    _attn("d80-causal-sq<sk", BF16, 2, 3, 3, 200, 311, 80, causal=True),
    _attn("d128-transposed", BF16, 2, 4, 4, 384, 384, 128, transposed=True),
    _attn("d128-causal", FP16, 1, 4, 4, 513, 513, 128, causal=True),
    _attn("d256", BF16, 1, 2, 2, 300, 300, 256),
    _attn("d256-causal-sq<sk", FP16, 1, 2, 2, 130, 260, 256, causal=True),
    _attn("dv128!=d64", BF16, 2, 2, 2, 150, 170, 64, 128),
    _attn("dv64!=d128-causal", FP16, 2, 2, 2, 170, 150, 128, 64, causal=True),
    _attn("key-padding-fully-padded-row", BF16, 3, 2, 2, 100, 300, 64, padding=True, tiny=dict(B=3)),
    _attn("key-padding-fully-padded-row-causal", FP16, 3, 2, 2, 100, 300, 64, padding=True, causal=True,
          tiny=dict(B=3)),
    _attn("mask-row-finfo-min", BF16, 2, 3, 3, 130, 200, 64, mask_row_min=True, lse=False),
    _attn("mask-row-finfo-min", FP16, 2, 3, 3, 130, 200, 64, mask_row_min=True, lse=False),
    _attn("dropout-same-seed", BF16, 2, 3, 3, 257, 257, 64, dropout_p=0.2),
    _attn("dropout-same-seed-padding-causal", FP16, 2, 3, 3, 200, 231, 128, dropout_p=0.15, padding=True,
          causal=True),
    _attn("gqa-8:2", BF16, 2, 8, 2, 300, 300, 128, causal=True),
    _attn("mqa-4:1", FP16, 1, 4, 1, 257, 400, 64),
    _attn("deterministic-bwd-twice", BF16, 1, 4, 1, 500, 500, 64, causal=True, dropout_p=0.1, deterministic=True),
    _attn("seq16k", BF16, 1, 1, 1, 16384, 16384, 128, tiny=dict(Sq=48, Sk=48)),
]


def attention_problem(p: dict, dtype: torch.dtype):
    """float64 masters (a bool padding mask passes through), the call, the gradient leaves."""
    g = torch.Generator().manual_seed(p["Sq"] * 7 + p["D"] + p["Sk"])
    B, H, Hk, Sq, Sk, D, Dv = (p[k] for k in ("B", "H", "Hk", "Sq", "Sk", "D", "Dv"))
    # transposed: (B, S, H, D) storage seen as (B, H, S, D)
    t = attention_inputs(g, B, H, Hk, Sq, Sk, D, Dv, transposed=p["transposed"])
    if p["padding"]:
        kpm = torch.rand(B, Sk, generator=g) < 0.3
        kpm[1 % B] = True               # a batch row with every key padded: its queries see nothing
        if B > 2:
            kpm[2, : (Sk * 5) // 6] = True  # and one with whole key tiles of padding
        t["kpm"] = kpm
    if p["mask_row_min"]:
        mask = torch.randn(B, H, Sq, Sk, generator=g, dtype=torch.float64)
        mask[0, H - 1, Sq // 2] = torch.finfo(dtype).min   # one query row whose every key is at finfo.min
        mask[B - 1, 0, Sq - 1] = torch.finfo(dtype).min    # and the last row of a tile
        t["attn_mask"] = mask
    gqa = H != Hk

    def fn(t, backend):
        out = ff.attention(t["q"], t["k"], t["v"], t.get("attn_mask"), p["dropout_p"], p["causal"], None,
                           enable_gqa=gqa, key_padding_mask=t.get("kpm"), seed=SEED, offset=1001,
                           return_lse=p["lse"], backend=backend)
        if p["lse"]:
            return out[0], out[1].detach()
        return (out,)
    return t, fn, ("q", "k", "v")


# ------------------------------------------------------------------------------------------------
# gelu_ffn
# ------------------------------------------------------------------------------------------------
def _ffn(name, dtype, M, C, F, approximate, dropout_p=0.0, tiny=None) -> Case:
    return Case(name, dtype, dict(M=M, C=C, F=F, approximate=approximate, dropout_p=dropout_p),
                tiny or dict(M=min(M, 13), C=24, F=40))


GELU_FFN = [
    _ffn("bert-base-erf", BF16, 1031, 768, 3072, "none"),
    _ffn("gpt2-medium-tanh", BF16, 517, 1024, 4096, "tanh"),
    _ffn("erf", FP16, 640, 512, 2048, "none"),
    _ffn("tanh-dropout", BF16, 300, 512, 2048, "tanh", 0.1),
    _ffn("erf-dropout", FP16, 300, 384, 1536, "none", 0.2),
    _ffn("ragged-m77", BF16, 77, 384, 1536, "tanh", tiny=dict(M=7, C=24, F=40)),
    _ffn("ragged-m1", BF16, 1, 256, 1024, "none", tiny=dict(M=1, C=16, F=24)),
]


def gelu_ffn_problem(p: dict, dtype: torch.dtype):
    t = gelu_ffn_inputs(torch.Generator().manual_seed(p["M"] + p["C"]), (p["M"],), p["C"], p["F"])

    def fn(t, backend):
        return ff.gelu_ffn(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], p["approximate"], p["dropout_p"],
                           seed=SEED, offset=3, backend=backend)
    return t, fn, tuple(t)


# ------------------------------------------------------------------------------------------------
# layer_norm
# ------------------------------------------------------------------------------------------------
def _ln(name, dtype, M, N, dropout_p=0.0, tiny=None) -> Case:
    return Case(name, dtype, dict(M=M, N=N, dropout_p=dropout_p), tiny or dict(M=3))


LAYER_NORM = [
    _ln(f"w{n}-residual{'-dropout' if drop else ''}", dtype, 67, n, drop,
        # the interpreter takes ~10 s a call on a 20000-wide row: the dry run keeps the chunked path
        # (wider than kernels/layer_norm.py's ROWS_MAX_WIDTH = 8192) on one 8197-wide row
        tiny=dict(M=1, N=8197) if n > 8192 else None)
    for n in (768, 1023, 4096, 20000) for dtype in (FP32, BF16) for drop in ((0.0, 0.1) if n == 1023 else (0.0,))
]


def layer_norm_problem(p: dict, dtype: torch.dtype):
    g = torch.Generator().manual_seed(p["N"])
    M, N = p["M"], p["N"]
    t = {"x": torch.randn(M, N, generator=g, dtype=torch.float64) * 2 + 0.5,
         "residual": torch.randn(M, N, generator=g, dtype=torch.float64),
         "weight": torch.randn(N, generator=g, dtype=torch.float64),
         "bias": torch.randn(N, generator=g, dtype=torch.float64)}

    def fn(t, backend):
        return ff.layer_norm(t["x"], N, t["weight"], t["bias"], 1e-5, residual=t["residual"],
                             dropout_p=p["dropout_p"], seed=SEED, offset=5, return_residual=True,
                             backend=backend)
    return t, fn, ("x", "residual", "weight", "bias")


SUITES: dict[str, tuple[list[Case], Callable]] = {
    "attention": (ATTENTION, attention_problem),
    "gelu_ffn": (GELU_FFN, gelu_ffn_problem),
    "layer_norm": (LAYER_NORM, layer_norm_problem),
}


# ------------------------------------------------------------------------------------------------
# running one case
# ------------------------------------------------------------------------------------------------
def _materialize(masters: dict, dtype: torch.dtype, device: torch.device, leaves) -> dict:
    """Float masters cast to ``dtype`` on ``device`` (the same strided layout); others moved."""
    out = {}
    for k, v in masters.items():
        if v.is_floating_point():
            t = torch.empty_strided(v.shape, v.stride(), dtype=dtype, device=device).copy_(v)
            out[k] = t.requires_grad_(k in leaves)
        else:
            out[k] = v.to(device)
    return out


def _run(fn, masters, leaves, backend, dtype, device):
    """Outputs and the gradients of ``leaves`` for fixed random upstream gradients."""
    t = _materialize(masters, dtype, device, leaves)
    outs = fn(t, backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(1234)
    loss = 0
    for o in outs:
        if o.requires_grad:
            loss = loss + (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)).sum()
    grads = list(torch.autograd.grad(loss, [t[n] for n in leaves], allow_unused=True))
    return [o.detach() for o in outs], grads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(op: str, case: Case, problem, backend: str, device: torch.device, dry: bool,
             ref_device: torch.device = torch.device("cpu")) -> dict:
    """Run one case on one backend and judge it; returns the JSON record (never raises for a
    numerical or backend failure; a CUDA error propagates so the caller can tell if it is sticky)."""
    p = case.shape(dry)
    masters, fn, leaves = problem(p, case.dtype)
    rec = {"op": op, "case": case.name, "backend": backend, "dtype": DTYPE_NAMES[case.dtype], "shape": p}
    t0 = time.perf_counter()
    try:
        if p.get("deterministic"):
            was = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)
            try:
                outs, grads = _run(fn, masters, leaves, backend, case.dtype, device)
                outs2, grads2 = _run(fn, masters, leaves, backend, case.dtype, device)
                _sync(device)
            finally:
                torch.use_deterministic_algorithms(was)
        else:
            outs, grads = _run(fn, masters, leaves, backend, case.dtype, device)
            _sync(device)
    except BackendError as exc:
        rec.update(status="unsupported", passed=False, detail=str(exc).strip().replace("\n", " | ")[:600])
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        return rec
    base_outs, base_grads = _run(fn, masters, leaves, "reference", case.dtype, ref_device)
    ref_outs, ref_grads = _run(fn, masters, leaves, "reference", torch.float64, ref_device)
    names = [f"out{i}" for i in range(len(outs))] + [f"d{n}" for n in leaves]
    failures, worst, worst_name = [], 0.0, ""
    for name, o, r, b in zip(names, outs + grads, ref_outs + ref_grads, base_outs + base_grads):
        if r is None or o is None:
            if (r is None) != (o is None):
                failures.append(f"{name}: gradient missing on one side")
            continue
        if o.dtype != b.dtype:
            failures.append(f"{name}: dtype {o.dtype} != the reference's {b.dtype}")
            continue
        failure, err, bound = rule_2x(name, op, o, r, b, case.dtype)
        if failure:
            failures.append(failure)
        ratio = err / bound if bound > 0 else (0.0 if err == 0 else math.inf)
        if ratio >= worst:
            worst, worst_name = ratio, name
    if p.get("deterministic"):
        differ = [n for n, a, b in zip(names, outs + grads, outs2 + grads2)
                  if (a is None) != (b is None) or (a is not None and not torch.equal(a, b))]
        rec["bitwise_equal"] = not differ
        if differ:
            failures.append(f"second run not bitwise equal in {', '.join(differ)}")
    rec.update(status="fail" if failures else "pass", passed=not failures, worst=round(worst, 4),
               worst_tensor=worst_name, detail="; ".join(failures)[:600])
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def _is_cuda_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("CUDA error", "AcceleratorError", "illegal memory access",
                                   "misaligned address", "unspecified launch failure", "device-side assert"))


def _context_alive(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device=device).add_(1).item()
        return True
    except Exception:  # the context is poisoned: every later launch fails the same way
        return False


class Writer:
    """Appends one JSON line per call with a single O_APPEND write (the op processes share the file)."""

    def __init__(self, path: str, device_name: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.device_name = device_name
        self.passed = self.total = 0

    def write(self, rec: dict) -> None:
        rec["device"] = self.device_name
        os.write(self.fd, (json.dumps(rec, sort_keys=False) + "\n").encode())
        self.total += 1
        self.passed += bool(rec.get("passed"))
        worst = f" worst {rec['worst']:.2f} of bound ({rec.get('worst_tensor')})" if "worst" in rec else ""
        detail = f": {rec['detail']}" if rec.get("detail") else ""
        print(f"  {rec['status']:>11}  {rec['op']} {rec['case']} {rec['dtype']} [{rec['backend']}]"
              f"{worst} {rec.get('seconds', 0):.1f} s{detail}"[:400], flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", required=True, choices=OPS)
    ap.add_argument("--out", required=True, help="JSON-lines file the records are appended to")
    ap.add_argument("--backends", default=None,
                    help="comma-separated (default: cuda,triton; with --dry-run cpu,triton)")
    ap.add_argument("--dry-run", action="store_true",
                    help="on the CPU: the cpu backend and the Triton interpreter, tiny shapes")
    ap.add_argument("--deadline", type=float, default=None,
                    help="Unix time after which no case starts (the rest are written as not run)")
    ap.add_argument("--ref-device", default="device", choices=("device", "cpu"),
                    help="where the reference runs (base and float64; default: the backend's device)")
    ap.add_argument("--cases", default=None, help="only cases whose name contains one of these (comma-separated)")
    args = ap.parse_args(argv)

    backends = (args.backends or ("cpu,triton" if args.dry_run else "cuda,triton")).split(",")
    if args.dry_run:
        device = torch.device("cpu")
        device_name = "cpu (dry run)"
    else:
        if not torch.cuda.is_available():
            print("gpu_smoke: no CUDA GPU is visible to torch (use --dry-run on a CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        device_name = torch.cuda.get_device_name(0)
        # the reference's 16-bit matmuls (base) accumulate in full precision, as on the CPU
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ref_device = device if args.ref_device == "device" else torch.device("cpu")
    cases, problem = SUITES[args.op]
    if args.cases:
        wanted = args.cases.split(",")
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    w = Writer(args.out, device_name)
    from importlib import import_module
    op_module = import_module(f"fusedformer.ops.{args.op}")
    unavailable = {}
    for b in backends:
        why = ff.backends.why_unavailable(op_module, b, device)
        if why:
            unavailable[b] = "; ".join(why)
    print(f"gpu_smoke {args.op}: {len(cases)} cases x {backends} on {device_name}", flush=True)
    stop = None  # why the remaining cases are not run
    for case in cases:
        for b in backends:
            rec = {"op": args.op, "case": case.name, "backend": b, "dtype": DTYPE_NAMES[case.dtype],
                   "shape": case.shape(args.dry_run)}
            if stop is None and args.deadline is not None and time.time() > args.deadline:
                stop = "the session's deadline for this step passed"
            if stop:
                w.write({**rec, "status": "not run", "passed": False, "detail": stop})
                continue
            if b in unavailable:
                w.write({**rec, "status": "unsupported", "passed": False,
                         "detail": f"backend unavailable: {unavailable[b]}"})
                continue
            try:
                w.write(run_case(args.op, case, problem, b, device, args.dry_run, ref_device))
            except Exception as exc:  # an error in the backend (or a poisoned context)
                msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                w.write({**rec, "status": "error", "passed": False, "detail": msg[:600]})
                if _is_cuda_error(exc) and not _context_alive(device):
                    stop = f"sticky CUDA error in {case.name} [{b}]: {msg[:200]}"
    print(f"gpu_smoke {args.op}: {w.passed}/{w.total} passed", flush=True)
    return 0 if w.passed == w.total else 1


if __name__ == "__main__":
    sys.exit(main())
