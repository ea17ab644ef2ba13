"""Static SASS counts of the CUDA attention kernels, without a GPU (the table in docs/cuda_kernels.md).

Compiles csrc/attention/attention_cuda.cuh for one architecture with nvcc (the extension's flags),
reads the SASS with ``cuobjdump -sass`` and reports, per kernel instantiation:
  * registers, shared memory, stack frame (``--dump-resource-usage``);
  * ``loop``: the static instruction count of the per-tile loop — the smallest loop (a backward
    branch's span) that holds every tensor-core instruction (HMMA) of the kernel: the K/V-tile loop of
    the forward and the deterministic dQ kernel, the query-tile loop of the dK/dV kernel;
  * ``per elem``: ``loop`` divided by the score elements one thread owns per tile;
  * ``hmma``, ``ldsm``: mma and ldmatrix instructions in that loop, and ``mufu`` (exp2 and friends).
The per-path rows come from probe instantiations that force every tile through one path
(``TilePath::kPlain`` — no mask, padding, causal or bounds work on the tile — or ``TilePath::kMasked``,
the general path), with and without dropout, compiled with FF_ATTENTION_COUNT_SHARED_DRAWS: the
dropout draws of the common case (offset and Sk multiples of 8, Philox blocks shared between lanes)
without the general fallback; and FF_ATTENTION_COUNT_MASK_TILE: the DP 128 forward's attn_mask from
its shared-memory tile, without the global-memory reads it falls back to where the tile does not fit
(a float32 mask on sm_86 / sm_89). The kernels nvcc builds into fusedformer._C (``--built``) decide the
path per tile at run time (``TilePath::kAuto``) and hold every path. Static counts are compiler
facts, not speed: a loop's instructions are counted once however often a path runs them.

    python3 scripts/attention_sass.py [--arch sm_90] [--dtype __half|__nv_bfloat16] [--built] [--markdown]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from check_cubins import demangle, find_cuobjdump  # noqa: E402

# Score elements per thread per tile: fwd / dq BQ x BK, bwd BKb x BQb over 4 warps of 32 threads
# (the forward at DP 128: 128 rows over 8 warps, Tiles::kFwdWarps).
ELEMS = {("fwd", 64): 64 * 64 // 128, ("fwd", 128): 128 * 64 // 256, ("fwd", 256): 64 * 32 // 128,
         ("dq", 64): 64 * 64 // 128, ("dq", 128): 64 * 64 // 128, ("dq", 256): 64 * 32 // 128,
         ("bwd", 64): 64 * 64 // 128, ("bwd", 128): 64 * 32 // 128, ("bwd", 256): 64 * 32 // 128}

PROBE = """\
#include "attention/attention_cuda.cuh"
namespace ff::attention::gpu {{
{lines}
}}
"""


def probe_source(dtype: str, probes: bool) -> str:
    """The instantiations to compile: the built ones (kAuto) and, with probes, the forced paths."""
    lines = []
    if not probes:  # the source as it is built into _C (whatever its template signature)
        return '#include "attention/attention_cuda.cuh"\n' \
               "namespace ff::attention::gpu {\n" \
               f"template void launch_fwd_any<{dtype}>(const FwdParams&, cudaStream_t);\n" \
               f"template void launch_bwd_any<{dtype}>(const BwdParams&, float*, float*, cudaStream_t);\n}}\n"
    for dp in (64, 128, 256):
        for path in ("kPlain", "kMasked"):
            for drop in ("false", "true"):
                args = f"{dtype}, {dp}, {drop}, TilePath::{path}"
                lines.append(f"template __global__ void fwd_kernel<{args}>(const FwdParams);")
                lines.append(f"template __global__ void bwd_kernel<{args}>(const BwdParams, const float*, float*);")
                lines.append(f"template __global__ void bwd_dq_kernel<{args}>(const BwdParams, const float*);")
    return PROBE.format(lines="\n".join(lines))


def compile_cubin(src: str, arch: str, workdir: str, defines: tuple[str, ...] = ()) -> str:
    import torch.utils.cpp_extension as ce

    cu = os.path.join(workdir, "probe.cu")
    with open(cu, "w") as f:
        f.write(src)
    out = os.path.join(workdir, "probe.cubin")
    cmd = ["nvcc", "-cubin", f"-arch={arch}", "-std=c++17", "-O3", "--use_fast_math", "--expt-relaxed-constexpr",
           "-DFF_WITH_CUDA", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
           "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
           *[f"-D{d}" for d in defines], "-I", os.path.join(ROOT, "csrc"), *[f"-I{p}" for p in ce.include_paths()], cu, "-o", out]
    subprocess.run(cmd, check=True)
    return out


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRA = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+)")


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """Mangled kernel name -> [(address, instruction)]."""
    kernels: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = kernels.setdefault(m.group(1), [])
            continue
        m = _INSN.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return kernels


def tile_loop(insns: list[tuple[int, str]]) -> tuple[int, int] | None:
    """(first, last) address of the smallest loop holding every HMMA, or None."""
    hmma = [a for a, op in insns if "HMMA" in op]
    if not hmma:
        return None
    loops = []
    for a, op in insns:
        m = _BRA.search(op)
        if m and int(m.group(1), 16) <= a:
            loops.append((int(m.group(1), 16), a))
    inside = [(lo, hi) for lo, hi in loops if lo <= min(hmma) and max(hmma) <= hi]
    return min(inside, key=lambda r: r[1] - r[0]) if inside else None


def resources(tool: str, cubin: str) -> dict[str, dict]:
    text = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and cur:
            out[cur] = dict(reg=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(4)))
    return out


def describe(demangled: str) -> tuple[str, int, str] | None:
    """(kernel, head-dim bucket, path) of a demangled fwd / bwd / dq kernel name, else None."""
    m = re.search(r"gpu::(fwd|bwd|bwd_dq)_kernel<([^,>]+), (\d+)(.*?)>\(", demangled)
    if not m:
        return None
    kind = {"fwd": "fwd", "bwd": "bwd", "bwd_dq": "dq"}[m.group(1)]
    rest = m.group(4)
    tp = re.search(r"TilePath\)(\d)", rest)
    path = {None: "built", "0": "built", "1": "plain", "2": "masked"}[tp.group(1) if tp else None]
    return kind, int(m.group(3)), path + (" +dropout" if re.match(r", true", rest) else "")


def table(arch: str, dtype: str, probes: bool) -> list[dict]:
    tool = find_cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        # Probes count the dropout draws of the common case alone (offset and Sk multiples of 4:
        # Philox blocks shared between lanes); the built kernels also hold the general fallback.
        defines = ("FF_ATTENTION_COUNT_SHARED_DRAWS", "FF_ATTENTION_COUNT_MASK_TILE") if probes else ()
        cubin = compile_cubin(probe_source(dtype, probes), arch, tmp, defines)
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        res = resources(tool, cubin)
    kernels = parse_sass(sass)
    names = demangle(list(kernels))
    rows = []
    for mangled, insns in kernels.items():
        d = describe(names[mangled])
        if d is None:
            continue
        kind, dp, path = d
        loop = tile_loop(insns)
        body = [op for a, op in insns if loop and loop[0] <= a <= loop[1]]
        r = res.get(mangled, {})
        rows.append(dict(kernel=kind, dp=dp, path=path, reg=r.get("reg"), stack=r.get("stack"), loop=len(body),
                         per_elem=len(body) / ELEMS[(kind, dp)], hmma=sum("HMMA" in op for op in body),
                         ldsm=sum("LDSM" in op for op in body), mufu=sum("MUFU" in op for op in body),
                         total=len(insns)))
    order = {"fwd": 0, "bwd": 1, "dq": 2}
    rows.sort(key=lambda r: (order[r["kernel"]], r["dp"], r["path"]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--dtype", default="__half", choices=["__half", "__nv_bfloat16"])
    ap.add_argument("--built", action="store_true", help="only the instantiations built into _C (no probes)")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    rows = table(a.arch, a.dtype, probes=not a.built)
    cols = ["kernel", "dp", "path", "reg", "stack", "loop", "per_elem", "hmma", "ldsm", "mufu", "total"]
    if a.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
    for r in rows:
        vals = [f"{r[c]:.1f}" if c == "per_elem" else str(r[c]) for c in cols]
        print(("| " + " | ".join(vals) + " |") if a.markdown else "  ".join(f"{v:>8}" for v in vals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
