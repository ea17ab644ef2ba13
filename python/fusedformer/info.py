"""``fusedformer.info()`` / ``python -m fusedformer info``: versions, the GPU, what was built, and
for every op which backends are available here — with the reason for each that is not."""
from __future__ import annotations

import platform
import sys

import torch

from . import backends


def _versions() -> list[tuple[str, str]]:
    from . import __version__
    rows = [("fusedformer", __version__), ("python", platform.python_version()), ("torch", torch.__version__),
            ("torch CUDA", torch.version.cuda or "none (CPU build)")]
    try:
        import triton
        rows.append(("triton", triton.__version__))
        # What float32 means on the Triton backend (docs/triton_kernels.md, "float32").
        rows.append(("triton fp32", "correctness path: tl.dot as IEEE float32 FMA (no tensor cores, no TF32); "
                                    "float16/bfloat16 use tensor cores"))
    except ImportError:
        rows.append(("triton", "not installed"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"GPU {i}", f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"))
    else:
        rows.append(("GPU", "none visible to torch"))
    rec = backends.build_record()
    if rec:
        built = []
        built.append("cpu: " + ("yes" if rec.get("cpu") else f"no ({rec.get('cpu_reason')})"))
        built.append("cuda: " + (f"yes, archs {rec.get('cuda_archs')}" if rec.get("cuda")
                                 else f"no ({rec.get('cuda_reason')})"))
        if "build_seconds" in rec:
            built.append(f"{rec['build_seconds']} s")
        rows.append(("native build", "; ".join(built)))
    else:
        rows.append(("native build", "no build record (running from a source tree that was never built?)"))
    return rows


def report() -> str:
    from .ops import attention, gelu_ffn, layer_norm
    op_modules = [attention, layer_norm, gelu_ffn]
    lines = ["fusedformer info", ""]
    for k, v in _versions():
        lines.append(f"  {k:<14} {v}")
    from . import cpu_caps
    lines.append(f"  {'CPU':<14} {cpu_caps.describe()}")
    cpu_paths = cpu_caps.paths()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for mod in op_modules:
        for dev in devices:
            lines.append("")
            lines.append(f"{mod.OP} on {dev.type} tensors:")
            for name, why in backends.availability(mod.OP, dev).items():
                lines.append(f"  {name:<10} " + ("available" if not why else "unavailable: " + "; ".join(why)))
                if name == "cpu" and not why:  # which GEMMs low precision takes on this CPU, and why
                    lines.append(f"  {'':<10} low precision: {cpu_paths[mod.OP]}")
    return "\n".join(lines)


def info(file=None) -> None:
    """Print versions, the GPU, the native build and each backend's availability with reasons."""
    print(report(), file=file or sys.stdout)
