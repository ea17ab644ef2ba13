#!/usr/bin/env bash
# The one prepared call on a lent GPU machine (issue 20): correctness and speed in one command that
# fits the machine's limits (about 15 minutes of device time in all, 10 minutes a command, 8 files
# back from $OUT). Every step runs under its own cap (`timeout`) inside a global deadline and writes
# its results as it goes, so a run cut short still returns everything before the cut.
#
#   OUT=dir bash scripts/gpu_session.sh              # on the GPU machine
#   OUT=dir bash scripts/gpu_session.sh --dry-run    # on a CPU (CI): the same steps and drivers, tiny
#                                                    # shapes, the cpu backend and the Triton interpreter
# Steps, in order (what each writes to $OUT):
#   1. machine facts: nvidia-smi -L, versions, date, git sha                       session.log
#   2. build on the device (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0), capped; `fusedformer info`;
#      the cubins in _C; on a build failure the log's tail, then stop               session.log
#   3. correctness smoke, one process per op (scripts/gpu_smoke.py), cuda + triton
#      against the float64 reference by the 2x rule, one JSON line per case        smoke.jsonl
#   4. focused speed (scripts/gpu_bench.py) with the ceilings of the same run      bench.csv
#   5. pytest -n 8 --timeout 60 over the op test files' GPU tests                  pytest.txt
#   6. compute-sanitizer: a probe on one tiny case, then memcheck / racecheck on
#      scripts/sanitize_sweep.py, filtered to the project's kernels, with the time left  sanitizer.txt
# The dry run skips nvidia-smi, the build and the sanitizer (each with a line saying so) and only
# collects the tests (the CI suite runs them on the CPU).
#
# Knobs (environment): GPU_SESSION_DEADLINE_S (570; the dry run 290), GPU_SESSION_CAP_{BUILD,SMOKE,
# BENCH,PYTEST,SANITIZER} (seconds per step), GPU_SESSION_TRITON_AUTOTUNE (0: each Triton kernel
# takes its first fitting configuration; 1 autotunes, minutes of compiling), GPU_SESSION_GIT_SHA
# (recorded when the copy on the device has no .git), GPU_SESSION_SKIP_BUILD=1 (a second call on a
# machine that still has the build), MAX_JOBS, TORCH_CUDA_ARCH_LIST, PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: OUT=dir bash scripts/gpu_session.sh [--dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/session.log
rm -f "$OUT"/{session.log,smoke.jsonl,bench.csv,pytest.txt,sanitizer.txt}   # this run's files only
: > "$LOG"
if [ "$DRY" = 1 ]; then DEADLINE_S=${GPU_SESSION_DEADLINE_S:-290}; else DEADLINE_S=${GPU_SESSION_DEADLINE_S:-570}; fi
CAP_BUILD=${GPU_SESSION_CAP_BUILD:-300}
CAP_SMOKE=${GPU_SESSION_CAP_SMOKE:-150}
CAP_BENCH=${GPU_SESSION_CAP_BENCH:-150}
CAP_PYTEST=${GPU_SESSION_CAP_PYTEST:-120}
CAP_SANITIZER=${GPU_SESSION_CAP_SANITIZER:-300}
MIN_STEP=20                     # a step with less than this left is skipped (with a line)
T0=$(date +%s)
END=$((T0 + DEADLINE_S))
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu-session.XXXXXX")   # build log and per-op stdout: folded into session.log
trap 'rm -rf "$SCRATCH"' EXIT
FAILED=()

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export FUSEDFORMER_TRITON_AUTOTUNE=${GPU_SESSION_TRITON_AUTOTUNE:-0}
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; fi
DRYFLAG=(); [ "$DRY" = 1 ] && DRYFLAG=(--dry-run)

log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( END - $(date +%s) )); }
cap() { local want=$1 l; l=$(left); echo $(( want < l ? want : l )); }   # a step's cap within the deadline
enough() {  # enough NAME SECONDS: whether a step with that cap may start (else a line saying why not)
  if (( $2 < MIN_STEP )); then log "$1: skipped: it would have $2 s (under $MIN_STEP s), $(left) s left before the session's deadline"; return 1; fi
}
ended() {  # ended NAME RC START CAP: one line for how a step ended
  if (( $2 == 124 || $2 == 137 )); then log "$1: cut at its cap of $4 s (timeout)"
  else log "$1: exit $2 after $(( $(date +%s) - $3 )) s"; fi
}

# ------------------------------------------------------------------------------------------------
# 1. machine facts
# ------------------------------------------------------------------------------------------------
sha=$(git rev-parse HEAD 2>/dev/null || true)
if [ -n "$sha" ]; then
  git diff --quiet HEAD -- . ':(exclude)bench/results' 2>/dev/null || sha="$sha+dirty"
else
  sha="${GPU_SESSION_GIT_SHA:-unknown (no .git here; pass GPU_SESSION_GIT_SHA)}"
fi
log "gpu_session$( [ "$DRY" = 1 ] && echo ' --dry-run'): $(date -u +%FT%TZ), git $sha, deadline ${DEADLINE_S} s"
{
  echo "host: $(uname -srm), $(nproc) CPUs, $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB RAM"}')"
  $PY -c "
import sys, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = 'not installed'
print(f'python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, '
      f'cuda available: {torch.cuda.is_available()}')" 2>&1
  command -v nvcc > /dev/null && echo "nvcc: $(nvcc --version | tail -2 | head -1)"
} | tee -a "$LOG"
if [ "$DRY" = 1 ]; then
  log "dry run: nvidia-smi skipped (no GPU here)"
elif command -v nvidia-smi > /dev/null; then
  { nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv; } 2>&1 | tee -a "$LOG"
else
  log "nvidia-smi not found"
fi

# ------------------------------------------------------------------------------------------------
# 2. build on the device, then what was built
# ------------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  log "dry run: build skipped (the installed package is used)"
elif [ "${GPU_SESSION_SKIP_BUILD:-0}" = 1 ]; then  # a second call on the same warm machine
  log "build skipped (GPU_SESSION_SKIP_BUILD=1): the package installed here is used"
else
  c=$(cap "$CAP_BUILD")
  if enough build "$c"; then
    s=$(date +%s)
    log "build: MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} pip install -e . (cap $c s)"
    MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} timeout -k 10 "$c" \
      $PY -m pip install --no-build-isolation --no-deps --no-index -e . > "$SCRATCH/build.log" 2>&1
    rc=$?
    ended build "$rc" "$s" "$c"
    if (( rc != 0 )); then
      { echo "---- build log, last 60 lines ----"; tail -60 "$SCRATCH/build.log"; } | tee -a "$LOG"
      log "stopping: the build failed, nothing else can run"
      exit 1
    fi
    { echo "---- build log, last 6 lines ----"; tail -6 "$SCRATCH/build.log"; } >> "$LOG"
  else
    log "stopping: no time to build"; exit 1
  fi
fi
# `fusedformer info`, then where _C is and the cuobjdump Triton's wheel carries (one Python start)
timeout 120 $PY - > "$SCRATCH/info.txt" 2>&1 <<'PY'
import os
from fusedformer.info import info
info()
try:
    import fusedformer._C as ext
    print(f"@ext {ext.__file__}")
except ImportError as exc:
    print(f"fusedformer._C does not import: {exc}")
try:
    import triton
    print(f"@cuobjdump {os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')}")
except ImportError:
    pass
PY
grep -v "^@" "$SCRATCH/info.txt" | tee -a "$LOG"
ext=$(sed -n 's/^@ext //p' "$SCRATCH/info.txt")
cuobjdump=$(command -v cuobjdump || true)
[ -z "$cuobjdump" ] && [ -x /usr/local/cuda/bin/cuobjdump ] && cuobjdump=/usr/local/cuda/bin/cuobjdump
[ -z "$cuobjdump" ] && cuobjdump=$(sed -n 's/^@cuobjdump //p' "$SCRATCH/info.txt")
if [ -n "$ext" ] && [ -x "$cuobjdump" ]; then
  { echo "cubins in $(basename "$ext"):"; "$cuobjdump" --list-elf "$ext" 2>&1
    # per architecture: kernels, stack frames (spills go there), the most registers
    "$cuobjdump" --dump-resource-usage "$ext" 2>/dev/null | awk '
      /^arch = / {arch = $3}
      /REG:/ { n[arch]++; split($1, r, ":"); split($2, st, ":"); if (r[2] > reg[arch]) reg[arch] = r[2]
               if (st[2] > 0) { stk[arch]++; if (st[2] > mx[arch]) mx[arch] = st[2] } }
      END { for (a in n) printf "  %s: %d kernels, %d with a stack frame (largest %d B), most registers %d\n",
                                 a, n[a], stk[a], mx[a], reg[a] }'
  } 2>&1 | tee -a "$LOG"
else
  log "cubins: not listed (extension: ${ext:-not importable}; cuobjdump: ${cuobjdump:-not found})"
fi

# ------------------------------------------------------------------------------------------------
# 3. correctness smoke: one process per op (a sticky CUDA error cannot hide the other ops), in parallel
# ------------------------------------------------------------------------------------------------
SMOKE=$OUT/smoke.jsonl
: > "$SMOKE"
c=$(cap "$CAP_SMOKE")
if enough smoke "$c"; then
  s=$(date +%s)
  log "smoke: attention, gelu_ffn, layer_norm in parallel (cap $c s; Triton autotune $FUSEDFORMER_TRITON_AUTOTUNE)"
  pids=()
  for op in attention gelu_ffn layer_norm; do
    timeout -k 10 "$c" $PY scripts/gpu_smoke.py --op "$op" --out "$SMOKE" --deadline $(( s + c - 25 )) \
      "${DRYFLAG[@]}" > "$SCRATCH/smoke-$op.txt" 2>&1 &
    pids+=($!)
  done
  i=0
  for op in attention gelu_ffn layer_norm; do
    wait "${pids[$i]}"; rc=$?; i=$((i + 1))
    { echo "---- smoke $op ----"; cat "$SCRATCH/smoke-$op.txt"; } >> "$LOG"
    if (( rc != 0 && rc != 1 )); then  # killed, crashed, or could not start: say so in the JSON too
      why="exit $rc"; (( rc == 124 || rc == 137 )) && why="cut at the step's cap of $c s"
      printf '{"op": "%s", "case": "(process)", "backend": "-", "dtype": "-", "shape": {}, "status": "error", %s}\n' \
        "$op" "\"passed\": false, \"device\": \"-\", \"detail\": \"the $op process ended: $why; its cases without a line did not run\"" \
        >> "$SMOKE"
    fi
    (( rc != 0 )) && FAILED+=("smoke:$op")
  done
  $PY - "$SMOKE" <<'PY' 2>&1 | tee -a "$LOG"
import collections, json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = collections.Counter((r["op"], r["status"]) for r in recs)
for op in sorted({r["op"] for r in recs}):
    print(f"smoke {op}: " + ", ".join(f"{n} {st}" for (o, st), n in sorted(by.items()) if o == op))
for r in recs:
    if not r.get("passed"):
        print(f"  NOT PASSED {r['op']} {r['case']} {r.get('dtype')} [{r['backend']}] {r['status']}: {r.get('detail', '')[:300]}")
PY
  log "smoke: done after $(( $(date +%s) - s )) s"
else
  FAILED+=("smoke")
fi

# ------------------------------------------------------------------------------------------------
# 4. focused speed
# ------------------------------------------------------------------------------------------------
BENCH=$OUT/bench.csv
c=$(cap "$CAP_BENCH")
if enough bench "$c"; then
  s=$(date +%s)
  log "bench: scripts/gpu_bench.py (cap $c s)"
  timeout -k 10 "$c" $PY scripts/gpu_bench.py --out "$BENCH" --deadline $(( s + c - 30 )) "${DRYFLAG[@]}" >> "$LOG" 2>&1
  rc=$?; ended bench "$rc" "$s" "$c"; (( rc != 0 )) && FAILED+=("bench")
else
  FAILED+=("bench")
fi

# ------------------------------------------------------------------------------------------------
# 5. the op test files' GPU tests
# ------------------------------------------------------------------------------------------------
PYTEST_FILES=(tests/test_attention.py tests/test_attention_varlen.py tests/test_layer_norm.py tests/test_gelu_ffn.py
              tests/triton/test_triton.py)
PYTEST_ARGS=(-q -p no:cacheprovider -rfE --tb=short -k "cuda or triton or gpu")
c=$(cap "$CAP_PYTEST")
if enough pytest "$c"; then
  s=$(date +%s)
  plugins=()
  if $PY -c "import xdist, pytest_timeout" 2> /dev/null; then plugins=(-n 8 --timeout 60)
  else log "pytest: pytest-xdist / pytest-timeout not installed here: running without -n 8 --timeout 60"; fi
  if [ "$DRY" = 1 ]; then
    log "dry run: pytest only collects its selection (the CI suite runs the tests on the CPU)"
    timeout -k 10 "$c" $PY -m pytest --collect-only "${PYTEST_ARGS[@]}" "${PYTEST_FILES[@]}" > "$OUT/pytest.txt" 2>&1
  else
    log "pytest: ${plugins[*]} ${PYTEST_ARGS[*]} (cap $c s)"
    timeout -k 10 "$c" $PY -m pytest "${plugins[@]}" "${PYTEST_ARGS[@]}" "${PYTEST_FILES[@]}" > "$OUT/pytest.txt" 2>&1
  fi
  rc=$?; ended pytest "$rc" "$s" "$c"; (( rc != 0 )) && FAILED+=("pytest")
  tail -3 "$OUT/pytest.txt" | tee -a "$LOG"
else
  FAILED+=("pytest")
fi

# ------------------------------------------------------------------------------------------------
# 6. compute-sanitizer: probe, then memcheck and racecheck on the sweep with the time left
# ------------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  log "dry run: compute-sanitizer skipped (needs a GPU)"
else
  SAN_OUT=$OUT/sanitizer.txt
  : > "$SAN_OUT"
  san=$(command -v compute-sanitizer || true)
  [ -z "$san" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && san=/usr/local/cuda/bin/compute-sanitizer
  # the project's kernels: every one lives in namespace ff:: (mangled names begin _ZN2ff)
  FILTER=(--kernel-name kns=_ZN2ff --print-limit 30 --error-exitcode 3)
  PROBE='import torch, fusedformer as ff
x = torch.randn(4, 64, device="cuda", requires_grad=True)
w = torch.randn(64, device="cuda", requires_grad=True)
ff.layer_norm(x, 64, w, None, backend="cuda").sum().backward()
torch.cuda.synchronize()
print("sanitizer probe " + "ran: layer_norm fwd + bwd on the cuda backend")'
  run_san() {  # run_san NAME CAP ARGS...: one compute-sanitizer run appended to sanitizer.txt
    local name=$1 c=$2 s rc n0; shift 2
    s=$(date +%s); n0=$(wc -l < "$SAN_OUT")
    echo "==== $name: compute-sanitizer $(echo "$*" | tr '\n' ' ' | cut -c1-240) (cap $c s)" >> "$SAN_OUT"
    timeout -k 10 "$c" "$san" "$@" >> "$SAN_OUT" 2>&1; rc=$?
    ended "$name" "$rc" "$s" "$c"
    tail -n +$((n0 + 2)) "$SAN_OUT" | grep -iE "ERROR SUMMARY|RACECHECK SUMMARY|not supported" | tail -1 \
      | sed "s/^/  $name: /" | tee -a "$LOG"
    return $rc
  }
  c=$(cap "$CAP_SANITIZER")
  if [ -z "$san" ]; then
    log "compute-sanitizer: not found on this machine: memcheck / racecheck not run"
  elif enough sanitizer "$c"; then
    san_end=$(( $(date +%s) + c ))
    run_san "sanitizer probe" $(( c < 90 ? c : 90 )) --tool memcheck "${FILTER[@]}" $PY -c "$PROBE"
    rc=$?
    if grep -qiE "device not supported|not supported on this device|unsupported device" "$SAN_OUT"; then
      log "compute-sanitizer refused this machine (see sanitizer.txt): memcheck / racecheck not run"
    elif ! grep -q "sanitizer probe ran" "$SAN_OUT"; then
      log "compute-sanitizer probe did not run the tiny case (exit $rc; see sanitizer.txt): sweep not run"
      FAILED+=("sanitizer")
    else
      (( rc != 0 )) && FAILED+=("sanitizer probe")
      for tool_args in "memcheck --quick" "racecheck --quick" "memcheck"; do
        set -- $tool_args
        c2=$(( san_end - $(date +%s) )); l=$(left); (( l < c2 )) && c2=$l
        enough "sanitizer $tool_args" "$c2" || break
        if [ "$1" = memcheck ]; then  # no caching allocator: out-of-bounds reads land outside any block
          PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_san "$tool_args" "$c2" --tool "$1" "${FILTER[@]}" \
            $PY scripts/sanitize_sweep.py ${2:-}
        else
          run_san "$tool_args" "$c2" --tool "$1" "${FILTER[@]}" $PY scripts/sanitize_sweep.py ${2:-}
        fi
        (( $? != 0 )) && FAILED+=("sanitizer $tool_args")
      done
    fi
  fi
fi

# ------------------------------------------------------------------------------------------------
log "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
if (( ${#FAILED[@]} )); then
  log "done in $(( $(date +%s) - T0 )) s; not passed: ${FAILED[*]}"
  exit 1
fi
log "done in $(( $(date +%s) - T0 )) s; every step passed"
