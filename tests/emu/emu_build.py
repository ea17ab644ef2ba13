"""Build test-only torch extensions that run CUDA kernels on the CPU through the SIMT emulator.

``load_emu(name, sources)`` compiles ``sources`` (paths relative to the repository root, or
absolute) with the host C++ compiler — no nvcc — using ``-std=c++20 -O1 -DFF_SIMT_EMULATION`` (C++20 because
torch's own headers require it; the emulation itself needs only C++17), with
``csrc/`` and the CUDA toolkit's ``include/`` directory (for cuda_fp16.h, cuda_bf16.h,
cuda_runtime_api.h) on the include path, and returns the loaded module. The sources include
``simt/simt.cuh``, which under ``FF_SIMT_EMULATION`` is the host emulation
``csrc/simt/simt_emu.h``; they export functions through pybind11 as
``PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)`` taking CPU tensors.

The build directory is ``build/emu/<name>`` in the repository (``build/`` is gitignored);
``torch.utils.cpp_extension.load`` reuses it, so only changed sources or headers are rebuilt.

When no C++ compiler or no CUDA headers are found, the calling test is skipped with the precise
reason (``pytest.skip``); a failing compilation is an error, never a skip.

Kernels may use plain CUDA next to simt.cuh; see the header comment of simt_emu.h for what the
emulation checks (barriers, warp collectives, cp.async, ldmatrix / mma layouts) and what it cannot.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # tests/emu/emu_build.py -> the repository
CSRC = ROOT / "csrc"
FLAGS = ["-std=c++20", "-O1", "-DFF_SIMT_EMULATION"]

_loaded: dict[str, object] = {}


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (holding cuda_fp16.h), or None."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    try:  # the headers of the pip CUDA runtime wheels, when there is no toolkit
        import nvidia

        for base in nvidia.__path__:
            candidates += sorted(Path(base).glob("cu*/include")) + [Path(base) / "cuda_runtime" / "include"]
    except ImportError:
        pass
    for c in candidates:
        if (c / "cuda_fp16.h").is_file() and (c / "cuda_runtime_api.h").is_file():
            return c
    return None


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx.split()[0]) if cxx else None


def load_emu(name: str, sources: list[str]):
    """Build (or reuse) and import the emulation extension ``name`` from ``sources``; skips the
    calling test when the toolchain is missing (see the module docstring)."""
    if name in _loaded:
        return _loaded[name]
    if sys.platform != "linux":
        pytest.skip(f"SIMT emulator: needs Linux (ucontext / x86-64 fibers, dladdr); this is {sys.platform}")
    if _compiler() is None:
        pytest.skip(f"SIMT emulator: no C++ compiler ({os.environ.get('CXX', 'c++')!r} is not on PATH)")
    inc = cuda_include_dir()
    if inc is None:
        pytest.skip("SIMT emulator: CUDA headers (cuda_fp16.h, cuda_runtime_api.h) not found; "
                    "set CUDA_HOME to a CUDA toolkit")
    from torch.utils import cpp_extension

    build_dir = ROOT / "build" / "emu" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    paths = [str(p if Path(p).is_absolute() else ROOT / p) for p in sources]
    module = cpp_extension.load(
        name=name,
        sources=paths,
        extra_cflags=FLAGS,
        extra_include_paths=[str(CSRC), str(inc)],
        build_directory=str(build_dir),
        with_cuda=False,
        verbose=False,
    )
    _loaded[name] = module
    return module
