#!/usr/bin/env bash
# The one script for a lent GPU machine (see ../shared/DESIGN.md, "GPU work without a GPU"). Run blind,
# once, from the repository root:
#
#     bash benchmarks/gpu_check.sh                 # logs and JSON under $OUT (default ./gpu_out)
#     GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # no GPU: build in place, collect, print the plan
#
# Steps, each under `timeout`, each continuing to the next after a failure (except a failed build):
#   env        nvidia-smi, torch, compute-sanitizer versions
#   build      SIMCLR_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 pip install --no-build-isolation --no-deps -e .
#              (falls back to setup.py build_ext --inplace if pip cannot do an editable install)
#   memcheck   the small CUDA parity tests once under compute-sanitizer --tool memcheck (memory errors;
#              CUDA API errors are left to the kernels' own launch checks, torch probes some on purpose)
#   racecheck  a few of them under --tool racecheck (shared-memory hazards)
#   pytest     every test marked cuda (junit XML)
#   bench      benchmarks/bench_ntxent_cuda.py (table + JSON)
#   augment    benchmarks/bench_augment.py --device cuda, if that file exists
# The whole run stays under 8 minutes: later steps get what is left of the budget. A summary table
# (step, status, seconds, key numbers) is printed last and appended to $OUT/summary.txt, which starts
# with the environment.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
DRY=${GPU_CHECK_DRY_RUN:-0}
BUDGET_S=${GPU_CHECK_BUDGET_S:-460}   # leaves ~20 s of the 8 minutes for start-up and the summary
PY=${PYTHON:-python3}
START=$(date +%s)
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

declare -a SUMMARY=()
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }

# record STEP STATUS SECONDS NOTE
record() {
  SUMMARY+=("$(printf '%-10s %-8s %5ss  %s' "$1" "$2" "$3" "$4")")
  [ "$2" = "FAILED" ] && FAILED=1
  echo "=== $1: $2 (${3}s) $4"
}

# run_step NAME LOG TIMEOUT_S CMD...: runs CMD with its output in LOG; returns CMD's status
run_step() {
  local name=$1 log=$2 limit=$3
  shift 3
  local t0 rc
  t0=$(date +%s)
  echo "=== $name: $* (limit ${limit}s, log $log)"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  STEP_S=$(( $(date +%s) - t0 ))
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "--- $name timed out after ${limit}s; last lines of $log:"
    tail -n 15 "$log"
  elif [ $rc -ne 0 ]; then
    echo "--- $name failed (exit $rc); first failure in $log:"
    first_failure "$log"
  fi
  return $rc
}

# The first error worth reading: a sanitizer report, a pytest failure, or the log's end.
first_failure() {
  local log=$1
  if grep -q "========= " "$log" && grep -qE "========= (Invalid|Race|Error|Program hit|Warning)" "$log"; then
    grep -m1 -A25 -E "========= (Invalid|Race|Error|Program hit|Warning)" "$log"
  elif grep -qE "^(FAILED|ERROR) |^E  " "$log"; then
    grep -m1 -B5 -A30 -E "^_{3,} .* _{3,}$" "$log" | head -n 60
    grep -E "^(FAILED|ERROR) " "$log" | head -n 20
  else
    tail -n 30 "$log"
  fi
}

# Limit of a step: its own cap, or what is left of the budget if that is less (at least 10 s).
cap() {
  local want=$1 l
  l=$(left)
  [ "$l" -lt "$want" ] && want=$l
  [ "$want" -lt 10 ] && want=10
  echo "$want"
}

pytest_counts() {  # the last "N passed, M failed ..." line of a pytest log
  grep -E "[0-9]+ (passed|failed|error|skipped)" "$1" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//'
}

# ---------------------------------------------------------------------------------------------- env
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S') UTC   host: $(hostname)   dry run: $DRY"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not available"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2 || echo "compute-sanitizer: not found"
  nproc
} >"$OUT/summary.txt" 2>&1   # the environment heads the summary file (few files come back)
cat "$OUT/summary.txt"
record env ok "$(elapsed)" "$(grep -m1 -E 'H100|H200|A100|NVIDIA' "$OUT/summary.txt" | cut -c1-60)"

# -------------------------------------------------------------------------------------------- build
if [ "$DRY" = "1" ]; then
  # No editable install here: it would repoint a shared Python environment. Build in place instead.
  run_step build "$OUT/build.log" "$(cap 900)" env SIMCLR_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" \
    MAX_JOBS="${MAX_JOBS:-1}" SIMCLR_EXT_WERROR=1 $PY setup.py build_ext --inplace
  rc=$?
else
  run_step build "$OUT/build.log" "$(cap 300)" env SIMCLR_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    SIMCLR_EXT_WERROR=1 SIMCLR_EXT_PTXAS_VERBOSE=1 $PY -m pip install --no-build-isolation --no-deps -v -e .
  rc=$?
  if [ $rc -eq 0 ] && ! ls simclr_ext/_C*.so >/dev/null 2>&1; then
    # The tests import simclr_ext from this tree (PYTHONPATH): the extension must sit in simclr_ext/.
    echo "--- the editable install left no simclr_ext/_C*.so in the tree: building in place as well"
    rc=1
  fi
  if [ $rc -ne 0 ] && ! grep -qE "\.(cu|cpp|h|cuh)[(:][0-9]+.*error" "$OUT/build.log"; then
    echo "--- pip could not do the editable install (no compiler error in its log): building in place instead"
    mv "$OUT/build.log" "$OUT/build_pip.log"
    run_step build "$OUT/build.log" "$(cap 300)" env SIMCLR_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
      SIMCLR_EXT_WERROR=1 SIMCLR_EXT_PTXAS_VERBOSE=1 $PY setup.py build_ext --inplace
    rc=$?
  fi
fi
BUILD_S=$STEP_S
if [ $rc -ne 0 ]; then
  record build FAILED "$BUILD_S" "see build.log: nothing else can run"
else
  INFO=$($PY -c "import simclr_ext; i = simclr_ext.info(); print(i['cuda_compiled'], '+'.join(i['cuda_archs']))" 2>&1 | tail -n 1)
  SPILLS=$(grep -cE "[1-9][0-9]* bytes spill" "$OUT/build.log" || true)
  if [ "${INFO%% *}" = "True" ]; then
    record build ok "$BUILD_S" "cuda_compiled archs=${INFO#* } ptxas spill lines=$SPILLS"
  else
    record build FAILED "$BUILD_S" "simclr_ext.info() says: $INFO"
    rc=1
  fi
fi

if [ $rc -eq 0 ]; then
  PYTEST=($PY -m pytest -p no:cacheprovider -q)
  # ------------------------------------------------------------------------------------- sanitizer
  SMALL=(tests/test_ntxent_cuda.py -k "test_matches_reference and small")
  RACE=(tests/test_ntxent_cuda.py -k "test_matches_reference and (small-slice or small-bank)")
  if [ "$DRY" = "1" ]; then
    run_step memcheck "$OUT/sanitizer.log" 120 "${PYTEST[@]}" --collect-only "${SMALL[@]}"
    record memcheck "$([ $? -eq 0 ] && echo dry || echo FAILED)" "$STEP_S" "collected $(grep -c '::' "$OUT/sanitizer.log") tests"
  elif ! command -v compute-sanitizer >/dev/null; then
    record memcheck SKIPPED 0 "compute-sanitizer not on PATH"
  else
    run_step memcheck "$OUT/sanitizer.log" "$(cap 90)" compute-sanitizer --tool memcheck --error-exitcode 99 \
      --report-api-errors no --print-limit 20 "${PYTEST[@]}" -x "${SMALL[@]}"
    rc_m=$?
    record memcheck "$([ $rc_m -eq 0 ] && echo ok || echo FAILED)" "$STEP_S" \
      "$(grep -m1 -E 'ERROR SUMMARY' "$OUT/sanitizer.log") $(pytest_counts "$OUT/sanitizer.log")"
    run_step racecheck "$OUT/racecheck.log" "$(cap 60)" compute-sanitizer --tool racecheck --error-exitcode 99 \
      --print-limit 20 "${PYTEST[@]}" -x "${RACE[@]}"
    rc_r=$?
    cat "$OUT/racecheck.log" >>"$OUT/sanitizer.log" && rm -f "$OUT/racecheck.log"
    record racecheck "$([ $rc_r -eq 0 ] && echo ok || echo FAILED)" "$STEP_S" \
      "$(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/sanitizer.log" | tail -n 1)"
  fi

  # ----------------------------------------------------------------------------------------- pytest
  if [ "$DRY" = "1" ]; then  # the host-side checks run; the cuda-marked tests must report as skipped
    run_step pytest "$OUT/pytest_cuda.log" 300 "${PYTEST[@]}" tests/test_ntxent_cuda_host.py tests/test_ntxent_cuda.py \
      --junitxml="$OUT/pytest_cuda.xml"
    rc_p=$?
    record pytest "$([ $rc_p -eq 0 ] && echo dry || echo FAILED)" "$STEP_S" "$(pytest_counts "$OUT/pytest_cuda.log")"
  else
    run_step pytest "$OUT/pytest_cuda.log" "$(cap 200)" "${PYTEST[@]}" -m cuda tests --junitxml="$OUT/pytest_cuda.xml"
    rc_p=$?
    COUNTS=$(pytest_counts "$OUT/pytest_cuda.log")
    if [ $rc_p -eq 0 ] && [[ "$COUNTS" == *skipped* ]]; then
      # On the GPU machine a skipped cuda test hides something (no GPU seen, a missing feature): say so.
      grep -E "^SKIPPED" "$OUT/pytest_cuda.log" | head -n 5
      record pytest FAILED "$STEP_S" "cuda tests were skipped on the GPU machine: $COUNTS"
    else
      record pytest "$([ $rc_p -eq 0 ] && echo ok || echo FAILED)" "$STEP_S" "$COUNTS"
    fi
  fi

  # ------------------------------------------------------------------------------------------ bench
  if [ "$DRY" = "1" ]; then
    run_step bench "$OUT/bench.log" 60 $PY benchmarks/bench_ntxent_cuda.py --help
    record bench "$([ $? -eq 0 ] && echo dry || echo FAILED)" "$STEP_S" "parsed its arguments"
  else
    B=$(cap 200)
    run_step bench "$OUT/bench.log" "$B" $PY benchmarks/bench_ntxent_cuda.py --out "$OUT" --max-seconds $(( B - 50 ))
    rc_b=$?
    KEY=$($PY - "$OUT/bench_ntxent_cuda.json" <<'EOF' 2>/dev/null
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
out = []
for r in rows:
    if r["dtype"] == "bfloat16" and r["d"] == 128 and r["mode"] == "both" and r["n2"] in (16384, 65536):
        f = r.get("fused")
        if isinstance(f, dict):
            out.append(f"2N={r['n2']}: {f['median_ms']:.2f} ms, x{r.get('speedup_vs_reference', float('nan')):.1f} vs ref, "
                       f"{r['fused_over_floor']:.2f}x GEMM, mem {100 * r.get('memory_vs_reference', float('nan')):.3f}% of ref")
print("; ".join(out) or "no bf16 D=128 rows")
EOF
)
    record bench "$([ $rc_b -eq 0 ] && echo ok || echo FAILED)" "$STEP_S" "${KEY:-no JSON}"
  fi

  # ---------------------------------------------------------------------------------------- augment
  if [ -f benchmarks/bench_augment.py ] && [ "$DRY" != "1" ]; then
    mkdir -p "$OUT/augment"
    run_step augment "$OUT/augment/bench_augment.log" "$(cap 60)" $PY benchmarks/bench_augment.py --device cuda \
      --out "$OUT/augment"
    record augment "$([ $? -eq 0 ] && echo ok || echo FAILED)" "$STEP_S" "output in augment/"
  else
    record augment SKIPPED 0 "$([ -f benchmarks/bench_augment.py ] && echo 'dry run' || echo 'benchmarks/bench_augment.py not present')"
  fi
fi

# ---------------------------------------------------------------------------------------- summary
{
  echo
  echo "gpu_check summary ($(date -u '+%Y-%m-%d %H:%M') UTC, $(elapsed) s, logs in $OUT)"
  printf '%s\n' "${SUMMARY[@]}"
  if [ -f "$OUT/bench_ntxent_cuda.md" ]; then
    echo
    grep -E "^\| (2N|[0-9]+ \| 128 \| bfloat16 \| both|16384 \| 128)" "$OUT/bench_ntxent_cuda.md" | head -n 8
  fi
} | tee -a "$OUT/summary.txt"
exit $FAILED
