"""Static checks of the GPU code compiled into fusedformer._C, without a GPU (CI runs this).

Reads the extension with ``cuobjdump`` (the CUDA toolkit's, or the one Triton's wheel carries):
  * ``--list-elf``: the architectures with SASS;
  * ``--list-ptx``: PTX for the newest architecture built, so that newer GPUs can JIT it;
  * ``--dump-resource-usage``: per kernel and architecture, registers, stack frame, local memory and
    shared memory. No project kernel may have a stack frame or local memory (register spills or a
    run-time indexed array), except the ones listed in ``KNOWN`` with the reason they are there.

Prints one line per kernel variant that is not clean and a summary; exits 1 on a new stack frame,
missing PTX or no SASS at all. These are compiler facts, not speed.

    python3 scripts/check_cubins.py [path/to/_C.so] [--table]   # --table: every kernel, for the docs
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

# Kernels allowed a stack frame today, by a regular expression over the demangled name, with why.
KNOWN: dict[str, str] = {}


def find_cuobjdump() -> str:
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    tool = next((c for c in candidates if c and os.path.exists(c)), None)
    if tool is None:
        raise SystemExit("cuobjdump not found (CUDA toolkit or the triton wheel): cannot read fusedformer._C")
    return tool


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if filt is None:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def resource_usage(tool: str, lib: str) -> list[dict]:
    text = subprocess.run([tool, "--dump-resource-usage", lib], capture_output=True, text=True).stdout
    rows, arch, fn = [], None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            fn = m.group(1)
        elif (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)) and fn:
            reg, stack, shared, local = map(int, m.groups())
            rows.append({"arch": arch, "mangled": fn, "reg": reg, "stack": stack, "shared": shared, "local": local})
            fn = None
    names = demangle(sorted({r["mangled"] for r in rows}))
    for r in rows:
        r["name"] = names[r["mangled"]]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("lib", nargs="?", help="the extension (default: the installed fusedformer._C)")
    ap.add_argument("--table", action="store_true", help="print every kernel's resource usage")
    args = ap.parse_args()
    lib = args.lib
    if lib is None:
        import fusedformer._C as ext
        lib = ext.__file__
    tool = find_cuobjdump()
    elf = subprocess.run([tool, "--list-elf", lib], capture_output=True, text=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", lib], capture_output=True, text=True).stdout
    sass_archs = sorted({int(a) for a in re.findall(r"\.sm_(\d+)\.", elf)})
    ptx_archs = sorted({int(a) for a in re.findall(r"\.sm_(\d+)\.", ptx)})
    failures = []
    if not sass_archs:
        failures.append("no SASS in the extension")
    elif not ptx_archs or max(ptx_archs) < max(sass_archs):
        failures.append(f"no PTX for sm_{max(sass_archs)} (embedded PTX: {ptx_archs or 'none'}): GPUs newer "
                        "than the newest built would get 'no kernel image'; build with TORCH_CUDA_ARCH_LIST=...+PTX")
    rows = resource_usage(tool, lib)
    project = [r for r in rows if r["name"].startswith(("void ff::", "ff::"))]
    unclean = [r for r in project if r["stack"] or r["local"]]
    print(f"{len(project)} kernel variants (SASS for {', '.join(f'sm_{a}' for a in sass_archs)}; "
          f"PTX for {', '.join(f'sm_{a}' for a in ptx_archs) or 'nothing'})")
    if args.table:
        for r in sorted(project, key=lambda r: (r["name"], r["arch"])):
            print(f"  {r['arch']}  REG {r['reg']:3d}  STACK {r['stack']:4d}  LOCAL {r['local']:4d}  "
                  f"SHARED {r['shared']:6d}  {r['name'][:140]}")
    for r in unclean:
        why = next((w for pat, w in KNOWN.items() if re.search(pat, r["name"])), None)
        tag = f"known: {why}" if why else "NEW"
        print(f"  {r['arch']} STACK {r['stack']} LOCAL {r['local']} REG {r['reg']}  {r['name'][:120]}  [{tag}]")
        if why is None:
            failures.append(f"{r['name']} ({r['arch']}) has a {r['stack']}-byte stack frame / {r['local']} bytes "
                            "of local memory")
    print(f"{len(unclean)} with a stack frame or local memory, "
          f"{sum(1 for r in unclean if not any(re.search(p, r['name']) for p in KNOWN))} of them new")
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
