"""Build fusedformer and its native extension ``fusedformer._C``.

What gets compiled is decided here and recorded in ``fusedformer/_build_info.json`` so that
``fusedformer.info()`` can tell users *why* a native backend is missing:

* C++ sources (``csrc/**/*.cpp``) whenever torch is importable and a C++ compiler is found;
* CUDA sources (``csrc/**/*.cu``) additionally when torch is a CUDA build and nvcc is found —
  also on machines without a GPU, so CI compiles and links every kernel.

Environment knobs: ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0+PTX``), ``MAX_JOBS`` (parallel
compile jobs, read by torch's ninja builder), ``FUSEDFORMER_NO_CUDA=1`` / ``FUSEDFORMER_NO_NATIVE=1``
to leave those parts out on purpose.

Build with ``pip install --no-build-isolation .``: the extension must be compiled against the
torch that will import it (see README, "Installing").
"""
import glob
import json
import os
import shutil
import sys
import time

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"  # PTX of the newest: GPUs after sm_90 JIT it instead of "no kernel image"


def _log(msg):
    print(f"[fusedformer build] {msg}", file=sys.stderr, flush=True)


def _point_cuda_home_at_nvcc():
    """torch guesses CUDA_HOME as the parent of nvcc's folder; when nvcc is a wrapper or a link
    (/usr/local/bin/nvcc) that guess misses the toolkit's libraries. Pick a folder that has both."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and glob.glob(os.path.join(home, "lib*", "libcudart.so*")):
            os.environ["CUDA_HOME"] = home
            return


def _plan():
    """Return (ext_modules, build_record) describing what this machine can compile."""
    record = {"cpu": False, "cuda": False, "cpu_reason": "", "cuda_reason": "", "cuda_archs": None}
    if os.environ.get("FUSEDFORMER_NO_NATIVE") == "1":
        record["cpu_reason"] = record["cuda_reason"] = "left out on purpose (FUSEDFORMER_NO_NATIVE=1)"
        return [], record
    _point_cuda_home_at_nvcc()
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - any import failure means no native build
        reason = (f"torch was not importable at build time ({exc.__class__.__name__}: {exc}); "
                  "install torch first, then `pip install --no-build-isolation .`")
        record["cpu_reason"] = record["cuda_reason"] = reason
        return [], record

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        reason = f"no C++ compiler found (looked for '{cxx}'; set CXX or install g++)"
        record["cpu_reason"] = record["cuda_reason"] = reason
        return [], record

    # csrc/tests/ holds standalone C++ test programs (CMake/ctest), not extension sources
    def sources(pattern):
        return sorted(p for p in glob.glob(pattern, recursive=True) if not p.startswith("csrc/tests/"))
    cpp_sources = sources("csrc/**/*.cpp")
    cu_sources = sources("csrc/**/*.cu")
    record["cpu"] = True
    record["torch_version"] = torch.__version__

    with_cuda = False
    if os.environ.get("FUSEDFORMER_NO_CUDA") == "1":
        record["cuda_reason"] = "left out on purpose (FUSEDFORMER_NO_CUDA=1)"
    elif torch.version.cuda is None:
        record["cuda_reason"] = f"torch {torch.__version__} is a CPU-only build"
    elif cpp_extension.CUDA_HOME is None or not os.path.exists(
            os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        record["cuda_reason"] = "nvcc not found (set CUDA_HOME or put nvcc on the PATH)"
    else:
        with_cuda = True
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        record["cuda"] = True
        record["cuda_archs"] = os.environ["TORCH_CUDA_ARCH_LIST"]
        record["cuda_version"] = torch.version.cuda

    cxx_flags = ["-O3", "-fopenmp"]
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                  # keep fp16/bf16 operators available (torch disables them by default)
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
    if with_cuda:
        cxx_flags.append("-DFF_WITH_CUDA")
        nvcc_flags.append("-DFF_WITH_CUDA")
        ext = cpp_extension.CUDAExtension(
            "fusedformer._C", cpp_sources + cu_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])
    else:  # the *_cuda.cpp launchers need the CUDA runtime headers: CPU kernels only
        cpp_sources = [p for p in cpp_sources if not p.endswith("_cuda.cpp")]
        ext = cpp_extension.CppExtension(
            "fusedformer._C", cpp_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    record["sources"] = len(cpp_sources) + (len(cu_sources) if with_cuda else 0)
    return [ext], record


EXT_MODULES, BUILD_RECORD = _plan()


def _write_record(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "_build_info.json"), "w") as f:
        json.dump(BUILD_RECORD, f, indent=2, sort_keys=True)


# Written before the build so that the pure-Python install carries it too; build_ext adds the time.
_write_record(os.path.join(ROOT, "python", "fusedformer"))


class TimedBuildExt(build_ext):
    """torch's BuildExtension (ninja, parallel) plus a build timer and the build record."""

    def run(self):
        start = time.time()
        if self.extensions:
            from torch.utils.cpp_extension import BuildExtension
            inner = BuildExtension.with_options(use_ninja=True)(self.distribution)
            for attr in ("inplace", "build_lib", "build_temp", "debug", "force", "parallel"):
                setattr(inner, attr, getattr(self, attr))
            inner.ensure_finalized()
            inner.run()
        elapsed = time.time() - start
        BUILD_RECORD["build_seconds"] = round(elapsed, 1)
        self._write_record()
        parts = []
        parts.append("cpu kernels: " + ("built" if BUILD_RECORD["cpu"] else
                                         "LEFT OUT - " + BUILD_RECORD["cpu_reason"]))
        parts.append("cuda kernels: " + (f"built for {BUILD_RECORD['cuda_archs']}" if BUILD_RECORD["cuda"]
                                          else "LEFT OUT - " + BUILD_RECORD["cuda_reason"]))
        _log(f"native build finished in {elapsed:.1f} s; " + "; ".join(parts))

    def _write_record(self):
        _write_record(os.path.join(ROOT, "python", "fusedformer"))
        if not self.inplace:
            _write_record(os.path.join(self.build_lib, "fusedformer"))


if not EXT_MODULES:
    _log("native extension LEFT OUT: " + BUILD_RECORD["cpu_reason"])
    _log("installing the pure-Python parts only (reference and triton backends)")

setup(
    ext_modules=EXT_MODULES,
    cmdclass={"build_ext": TimedBuildExt},
    package_data={"fusedformer": ["_build_info.json"]},
)
