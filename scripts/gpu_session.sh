#!/usr/bin/env bash
# One batched call on a lent GPU machine (device tool): build, test on the GPU, benchmark.
# Writes everything under $OUT (or ./gpu-out): nvidia-smi, info, test logs, benchmark CSV/PNG.
#   run: bash scripts/gpu_session.sh [tests|bench|all]      (default: all)
# The device image has torch, triton, pytest, transformers and no internet: nothing is installed
# from the network; the package is installed editable without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
what=${1:-all}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
sha=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "git $sha, $(date -u +%FT%TZ)" | tee "$OUT/session.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

start=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/session.txt"
python3 -m fusedformer info | tee "$OUT/info.txt"

if [ "$what" = tests ] || [ "$what" = all ]; then
  # the whole suite on the GPU (GPU-marked tests included), then the CUDA kernels under compute-sanitizer
  python3 -m pytest tests -q -x -p no:cacheprovider --timeout=900 2>&1 | tee "$OUT/tests.txt" | tail -25
  # every CUDA kernel on a small sweep of awkward shapes under compute-sanitizer (memcheck, racecheck)
  if command -v compute-sanitizer > /dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_sweep.py \
      > "$OUT/memcheck.txt" 2>&1; echo "memcheck exit $?" | tee -a "$OUT/memcheck.txt"; tail -6 "$OUT/memcheck.txt"
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitize_sweep.py --quick \
      > "$OUT/racecheck.txt" 2>&1; echo "racecheck exit $?" | tee -a "$OUT/racecheck.txt"; tail -6 "$OUT/racecheck.txt"
  else
    echo "compute-sanitizer not found: memcheck / racecheck not run" | tee -a "$OUT/session.txt"
  fi
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  if python3 -c "import fusedformer.bench" 2> /dev/null; then
    python3 -m fusedformer.bench.cli --full --device cuda --results "$OUT" 2>&1 | tee "$OUT/bench.txt" | tail -60
  fi
fi
