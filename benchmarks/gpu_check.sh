#!/usr/bin/env bash
# The one script for a lent GPU machine (README "GPU check"; docs/DESIGN.md "GPU work without a GPU").
# Run blind, once, from anywhere in the repository, as ONE device command (the device ends a command
# at 600 s; this script plans for GPU_CHECK_BUDGET_S = 540 s and ends by itself):
#
#     bash benchmarks/gpu_check.sh                        # on the GPU machine: $OUT is set there
#     GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh    # here, no GPU: every step's logic, no GPU work
#
# Steps, in this order. Each has a floor and a wish (seconds); its cap is its wish, cut to what is left
# after the floors of the steps still to come are set aside, never under its own floor. A failing or
# timed-out step never stops a later one; only steps that need our build are skipped when it fails.
#   env        card, driver, torch, nvcc, tools (always first: the summary's header)
#   wheels     .whl/*.whl (kornia + kornia_rs, `make gpu-wheels`) into /tmp/site, on PYTHONPATH
#   build      setup.py build_ext --inplace, CUDA, arch 9.0, MAX_JOBS=16, nvcc --split-compile, no -Werror
#              (another toolchain there; CI keeps the warnings gate), ptxas -v for spills
#   probe      (during the build, on the idle GPU) can compute-sanitizer and ncu run on this runtime?
#              (gVisor refuses both: a refusal costs seconds, not the run)
#   pytest     every `cuda` test, per-test limits by benchmarks/gpu_check_guard.py (no plugin needed);
#              a test that hangs or crashes the process is named, and the rest are run after it
#   memcheck   small parity tests under compute-sanitizer memcheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1
#              (so an out-of-bounds access inside a cached block is seen)
#   racecheck  a few under racecheck, --report-api-errors no (torch probes some APIs on purpose)
#   bench_loss benchmarks/bench_ntxent.py --device cuda, --max-seconds from its cap
#   bench_aug  benchmarks/bench_augment.py --device cuda (kornia when the wheels were carried)
#   ncu        (optional, when time is left and ncu runs here) the fused forward + backward kernels:
#              duration, model FLOP/s, SM and memory throughput, occupancy
# Why this order: correctness first, and what loses least when time runs short. The build can take
# minutes on an unknown toolchain; the tests decide whether anything else means anything, so they come
# right after it. The sanitizers come before any timing (docs/DESIGN.md, "GPU work without a GPU"): a
# memory error or a race makes the numbers void, and they are short and capped. The benchmarks are elastic (--max-seconds, --reps
# follow the cap), so a slow build costs table rows, not whole checks; ncu is an extra, last.
#
# Output: $OUT/summary.txt (also printed last: the device returns the end of the output) and ONE archive,
# $OUT/gpu_check.tar.gz, holding every log, the junit file, the test records, the benchmark JSON/MD and
# the ncu report (the device returns at most 8 files). The archive is rewritten after every step, so a
# run killed from outside still returns what it had.
#
# Environment: GPU_CHECK_REV (the commit, for the summary: the device's copy has no .git),
# GPU_CHECK_BUDGET_S (540), GPU_CHECK_STEPS (all, or a comma list such as pytest,memcheck:
# `build` is added when another step needs it), GPU_CHECK_LOGDIR (/tmp/gpu_check), OUT (./gpu_out),
# PYTHON (python3). For tests of this script only: GPU_CHECK_TIME_SCALE scales every time (budget,
# floors, wishes); GPU_CHECK_FAKE_DIR holds executables named after steps that replace their commands.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
MODE=run
[ "${GPU_CHECK_DRY_RUN:-0}" = "1" ] && MODE=dry
OUT=${OUT:-$ROOT/gpu_out}
LOGDIR=${GPU_CHECK_LOGDIR:-/tmp/gpu_check}
PY=${PYTHON:-python3}
FAKE=${GPU_CHECK_FAKE_DIR:-}
SCALE=${GPU_CHECK_TIME_SCALE:-1}
SITE=/tmp/site
REPORT=(benchmarks/gpu_check_report.py)

export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"

# s SECONDS: a time of the plan, scaled (GPU_CHECK_TIME_SCALE; 1 on the GPU machine).
s() { awk -v x="$1" -v k="$SCALE" 'BEGIN { v = int(x * k + 0.5); print (v < 1 ? 1 : v) }'; }

BUDGET_S=$(s "${GPU_CHECK_BUDGET_S:-540}")
GRACE_S=$(s 15)   # a floor may run this far past the plan; the device's own limit is 60 s further
# name floor wish optional(1: no time is set aside for it)
PLAN="env 10 30 0
wheels 10 60 0
build 120 300 0
probe 5 5 0
pytest 60 150 0
memcheck 45 90 0
racecheck 40 60 0
bench_loss 60 150 0
bench_aug 45 80 0
ncu 40 60 1"
ORDER=() ; declare -A FLOOR WISH OPTIONAL WILL
while read -r n f w o; do
  ORDER+=("$n"); FLOOR[$n]=$(s "$f"); WISH[$n]=$(s "$w"); OPTIONAL[$n]=$o; WILL[$n]=1
done <<<"$PLAN"

STEPS=${GPU_CHECK_STEPS:-all}
if [ "$STEPS" != "all" ]; then
  for n in "${ORDER[@]}"; do [[ ",$STEPS,env,wheels,probe," == *",$n,"* ]] || WILL[$n]=0; done
  for n in pytest memcheck racecheck bench_loss bench_aug ncu; do [ "${WILL[$n]}" = 1 ] && WILL[build]=1; done
fi

# find_tool NAME: the tool's path, or nothing. The image may keep CUDA's tools off PATH.
find_tool() {
  local c
  for c in ${FAKE:+"$FAKE/$1"} "$(command -v "$1")" "${CUDA_HOME:-/usr/local/cuda}/bin/$1" "/usr/local/cuda/bin/$1" \
           /usr/local/cuda/compute-sanitizer/"$1" /opt/nvidia/nsight-compute/*/"$1" /usr/local/cuda/nsight-compute*/"$1"; do
    if [ -n "$c" ] && [ -f "$c" ] && [ -x "$c" ]; then echo "$c"; return; fi
  done
}
SANITIZER=$(find_tool compute-sanitizer)
NCU=$(find_tool ncu)

START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }

# cap NAME: seconds this step may take now, or 0 when not even its floor fits (with the grace).
cap() {
  local name=$1 seen=0 reserve=0 n avail c
  for n in "${ORDER[@]}"; do
    if [ $seen = 1 ] && [ "${WILL[$n]}" = 1 ] && [ "${OPTIONAL[$n]}" = 0 ]; then reserve=$(( reserve + FLOOR[$n] )); fi
    [ "$n" = "$name" ] && seen=1
  done
  avail=$(left)
  c=$(( avail - reserve ))
  [ "$c" -gt "${WISH[$name]}" ] && c=${WISH[$name]}
  [ "$c" -lt "${FLOOR[$name]}" ] && c=${FLOOR[$name]}
  [ "$c" -gt $(( avail + GRACE_S )) ] && c=$(( avail + GRACE_S ))
  [ "$c" -lt "${FLOOR[$name]}" ] && c=0
  echo "$c"
}

# ------------------------------------------------------------------------------------ recording
rm -rf "$LOGDIR"
mkdir -p "$LOGDIR" "$OUT" || exit 2
STEPS_TSV=$LOGDIR/steps.tsv
: >"$STEPS_TSV"
CARD="no GPU seen"; DRIVER="-"; TORCH_V="-"

# record NAME STATUS SECONDS CAP NOTE [DETAILS_FILE]: one row of the summary; DETAILS (the first
# failure) is kept for the summary's second part. Statuses: ok, WARN, FAILED, TIMEOUT, SKIPPED,
# UNAVAILABLE (the runtime refused a tool), DRY (dry run: the command was checked, not run).
record() {
  local name=$1 status=$2 secs=$3 cap=$4 note=$5 details=${6:-}
  note=$(printf '%s' "$note" | tr '\t\n' '  ' | cut -c1-220)
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$cap" "$note" >>"$STEPS_TSV"
  if [ -n "$details" ] && [ -s "$details" ]; then
    cut -c1-300 "$details" | head -n 45 >"$LOGDIR/details_$name.txt"
  fi
  echo "=== $name: $status (${secs}s of ${cap}s) $note"
  save_archive
}

save_archive() {  # everything but summary.txt, in one file; written aside, then moved into place
  local tmp=${LOGDIR}.tar.gz.part
  tar -czf "$tmp" -C "$(dirname "$LOGDIR")" "$(basename "$LOGDIR")" 2>/dev/null && mv -f "$tmp" "$OUT/gpu_check.tar.gz"
}

# run NAME CAP LOG CMD...: CMD under `timeout` (its whole process group), output in LOG; sets RC and
# SECS. A stand-in from GPU_CHECK_FAKE_DIR, when there is one for NAME, runs instead, given CMD.
run() {
  local name=$1 limit=$2 log=$3 t0
  shift 3
  if [ -n "$FAKE" ] && [ -x "$FAKE/$name" ]; then set -- "$FAKE/$name" "$@"; fi
  t0=$(date +%s)
  echo "--- $name (limit ${limit}s): $*" | cut -c1-400
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  RC=$?
  SECS=$(( $(date +%s) - t0 ))
}

timed_out() { [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; }

# first_failure LOG > FILE: the first thing worth reading in a log that ended badly.
first_failure() {
  local log=$1 pat='^========= (Invalid|Race|Error|Program hit|Warning|Uninitialized|Barrier|Leaked)'
  if timed_out; then
    echo "killed at its cap after ${SECS}s; the log ends:"
    tail -n 20 "$log"
  elif grep -qE "$pat" "$log"; then
    { grep -m1 -A24 -E "$pat" "$log"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -n 2; } | awk '!seen[$0]++'
  elif grep -qE "csrc/\S+[(:][0-9]+.*error" "$log"; then
    grep -m1 -B2 -A12 -E "csrc/\S+[(:][0-9]+.*error" "$log"
  elif grep -q "^Traceback" "$log"; then
    awk '/^Traceback/ { buf = "" } { buf = buf $0 "\n" } END { printf "%s", buf }' "$log" | tail -n 25
  else
    tail -n 25 "$log"
  fi
}

# ----------------------------------------------------------------------------------------- steps
step_env() {
  local log=$LOGDIR/env.txt c
  c=$(cap env)
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S') UTC   host: $(hostname)   kernel: $(uname -r)   mode: $MODE"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null) ($(git status --porcelain 2>/dev/null | wc -l) changed files)"
    echo "cpus: $(nproc)   memory: $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 2^20 }' /proc/meminfo)   load: $(cat /proc/loadavg)"
  } >"$log"
  run env "$c" "$log" nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,temperature.gpu,power.limit --format=csv
  run env "$c" "$log" "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| available', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no device')"
  { command -v nvcc && nvcc --version | tail -n 2
    for t in "$SANITIZER" "$NCU"; do [ -n "$t" ] && echo "$t: $(timeout 20 "$t" --version 2>&1 | grep -m1 -iE 'version|[0-9]+\.[0-9]+')"; done
    [ -z "$SANITIZER" ] && echo "compute-sanitizer: not found"; [ -z "$NCU" ] && echo "ncu: not found"
    timeout 30 "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|numpy|pytest|pytest-timeout|kornia|kornia.rs|lightly|ninja|setuptools) ' | tr -s ' ' | paste -sd ';' -
  } >>"$log" 2>&1
  CARD=$(grep -m1 -E '^[^,]*(NVIDIA|H100|H200|A100)[^,]*,' "$log" | cut -d, -f1 | xargs)
  DRIVER=$(grep -m1 -E '^[^,]*(NVIDIA|H100|H200|A100)[^,]*,' "$log" | cut -d, -f2 | xargs)
  TORCH_V=$(grep -m1 -oE 'torch [^ |]+' "$log" | cut -d' ' -f2)
  [ -z "$CARD" ] && CARD="no GPU seen" && DRIVER="-"
  cat "$log"
  local status=ok
  if [ "$MODE" = run ] && ! grep -q "available True" "$log"; then status=FAILED; fi
  record env "$status" "$(elapsed)" "$c" "$CARD | driver $DRIVER | torch ${TORCH_V:--}" "$log"
}

step_wheels() {
  local log=$LOGDIR/wheels.log c whl=()
  shopt -s nullglob; whl=(.whl/*.whl); shopt -u nullglob
  if [ ${#whl[@]} -eq 0 ]; then
    record wheels SKIPPED 0 0 "no .whl/*.whl (make gpu-wheels, carry .whl): kornia baseline missing"
    return
  fi
  c=$(cap wheels)
  if [ "$MODE" = dry ]; then  # here Python is not 3.12: ask pip whether the wheels would install there
    run wheels "$c" "$log" "$PY" -m pip install --dry-run --no-index --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --target "$SITE.dry" "${whl[@]}"
    record wheels "$([ $RC -eq 0 ] && echo DRY || echo FAILED)" "$SECS" "$c" "${#whl[@]} wheels would install for cp312: $(basename -a "${whl[@]}" | cut -d- -f1-2 | paste -sd' ' -)" "$log"
    return
  fi
  run wheels "$c" "$log" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${whl[@]}"
  if [ $RC -eq 0 ]; then
    export PYTHONPATH="$PYTHONPATH:$SITE"  # after the tree, before site-packages: nothing of the image is shadowed
    run wheels "$c" "$log" "$PY" -c "import kornia, kornia_rs; print('kornia', kornia.__version__, 'kornia_rs', kornia_rs.__version__)"
  fi
  record wheels "$([ $RC -eq 0 ] && echo ok || echo FAILED)" "$SECS" "$c" "$(tail -n 1 "$log")" "$log"
}

# probe_tools (in the background during the build): one tiny torch program under each tool.
probe_tools() {
  local prog="import torch; x = torch.arange(1024.0, device='cuda'); assert float((2 * x).sum()) == 1047552.0; print('probe program ok')"
  local log=$LOGDIR/probe.log lim
  lim=$(s 60)
  : >"$LOGDIR/probe.tsv"
  if [ -z "$SANITIZER" ]; then
    printf 'sanitizer\tcompute-sanitizer not found\n' >>"$LOGDIR/probe.tsv"
  else
    echo "--- compute-sanitizer" >>"$log"
    timeout -k 5 "$lim" "$SANITIZER" --tool memcheck --report-api-errors no --error-exitcode 99 "$PY" -c "$prog" >>"$log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ] && grep -q "probe program ok" "$log"; then printf 'sanitizer\tok\n' >>"$LOGDIR/probe.tsv"
    else printf 'sanitizer\texit %s: %s\n' "$rc" "$(grep -m1 -iE 'error|not supported|fail' "$log" | cut -c1-150)" >>"$LOGDIR/probe.tsv"; fi
  fi
  if [ -z "$NCU" ]; then
    printf 'ncu\tncu not found\n' >>"$LOGDIR/probe.tsv"
  else
    echo "--- ncu" >>"$log"
    local before
    before=$(wc -l <"$log")
    timeout -k 5 "$lim" "$NCU" --clock-control none --section SpeedOfLight --launch-count 1 "$PY" -c "$prog" >>"$log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ] && tail -n +"$before" "$log" | grep -q "Duration" && ! tail -n +"$before" "$log" | grep -q "==ERROR=="; then
      printf 'ncu\tok\n' >>"$LOGDIR/probe.tsv"
    else printf 'ncu\texit %s: %s\n' "$rc" "$(tail -n +"$before" "$log" | grep -m1 -E '==ERROR==|rror' | cut -c1-150)" >>"$LOGDIR/probe.tsv"; fi
  fi
}

tool_ok() { grep -q "^$1	ok$" "$LOGDIR/probe.tsv" 2>/dev/null; }
tool_why() { grep -m1 "^$1	" "$LOGDIR/probe.tsv" 2>/dev/null | cut -f2; }

BUILT=0
step_build() {
  local log=$LOGDIR/build.log c probe_pid info
  if [ "${WILL[build]}" = 0 ]; then record build SKIPPED 0 0 "not asked for (GPU_CHECK_STEPS)"; return; fi
  c=$(cap build)
  probe_tools & probe_pid=$!
  local cuda=1 arch=9.0 jobs=16 nvcc
  if [ "$MODE" = dry ]; then cuda=${GPU_CHECK_DRY_CUDA:-0}; jobs=2; fi
  if [ -z "${CUDA_HOME:-}" ] && [ ! -x /usr/local/cuda/bin/nvcc ]; then  # setup.py looks there, torch on PATH
    nvcc=$(find_tool nvcc); [ -n "$nvcc" ] && export CUDA_HOME=${nvcc%/bin/nvcc}
  fi
  # --split-compile: nvcc optimizes the many kernel instantiations of one .cu file on several threads.
  run build "$c" "$log" env SIMCLR_EXT_CUDA="$cuda" TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$jobs" SIMCLR_EXT_WERROR=0 \
    SIMCLR_EXT_PTXAS_VERBOSE=1 NVCC_APPEND_FLAGS="--split-compile=8" "$PY" setup.py build_ext --inplace
  local secs=$SECS
  if [ $RC -ne 0 ] && ! timed_out && ! grep -qE "csrc/\S+[(:][0-9]+.*error" "$log" && [ "$(left)" -gt "${FLOOR[build]}" ]; then
    echo "--- build failed with no error in our sources: once more without --split-compile" | tee -a "$log"
    run build "$(cap build)" "$log" env SIMCLR_EXT_CUDA="$cuda" TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$jobs" \
      SIMCLR_EXT_WERROR=0 SIMCLR_EXT_PTXAS_VERBOSE=1 "$PY" setup.py build_ext --inplace
    secs=$(( secs + SECS ))
  fi
  local status note
  if [ $RC -ne 0 ]; then
    status=$(timed_out && echo TIMEOUT || echo FAILED); note="exit $RC"
    first_failure "$log" >"$LOGDIR/first_build.txt"
  else
    run build_info 60 "$LOGDIR/build_info.log" "$PY" -c \
      "import simclr_ext; i = simclr_ext.info(); print(i['cuda_compiled'], '+'.join(i['cuda_archs']) or '-')"
    info=$(tail -n 1 "$LOGDIR/build_info.log")
    note="cuda_compiled=${info%% *} archs=${info#* }; $("$PY" "${REPORT[@]}" build "$log" | head -n 1)"
    "$PY" "${REPORT[@]}" build "$log" | tail -n +2 >"$LOGDIR/first_build.txt"
    if [ "${info%% *}" = True ] || { [ "$MODE" = dry ] && [ "${info%% *}" = False ]; }; then
      BUILT=1; status=ok; [ "$MODE" = dry ] && status=DRY
    else
      status=FAILED; note="simclr_ext.info() after the build: $info"
      echo "$info" >"$LOGDIR/first_build.txt"
    fi
  fi
  record build "$status" "$secs" "$c" "$note" "$LOGDIR/first_build.txt"
  wait "$probe_pid"
  local p; p="sanitizer: $(tool_why sanitizer); ncu: $(tool_why ncu)"
  { cat "$LOGDIR/probe.tsv"; grep -m3 -iE "error|not supported" "$LOGDIR/probe.log"; } >"$LOGDIR/first_probe.txt" 2>/dev/null
  record probe "$( { tool_ok sanitizer && tool_ok ncu; } && echo ok || echo WARN)" 0 0 "$p" "$LOGDIR/first_probe.txt"
}

# needs NAME: says (and records) why NAME cannot run, or returns 0 when it can.
needs() {
  local name=$1
  if [ "${WILL[$name]}" = 0 ]; then record "$name" SKIPPED 0 0 "not asked for (GPU_CHECK_STEPS)"; return 1; fi
  if [ "$BUILT" != 1 ]; then record "$name" SKIPPED 0 0 "the build failed: nothing of ours to run"; return 1; fi
  if [ "$(cap "$name")" = 0 ]; then
    record "$name" SKIPPED 0 0 "no time left: ${FLOOR[$name]}s needed, $(left)s left"; return 1
  fi
}

# guarded_pytest NAME CAP LOG RECORDS PER_TEST_S PREFIX... -- PYTEST_ARGS...: pytest under the guard
# plugin, rerun after a test that hung or crashed the process (the guard deselects recorded tests).
guarded_pytest() {
  local name=$1 limit=$2 log=$3 records=$4 per_test=$5 t_end attempt=1 total=0 pre=() args=()
  shift 5
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do pre+=("$1"); shift; done
  shift
  args=("$@")
  t_end=$(( $(date +%s) + limit ))
  : >"$records"
  while :; do
    local lim=$(( t_end - $(date +%s) ))
    [ $lim -lt 1 ] && break  # (timeout 0 would mean no limit)
    echo "=== attempt $attempt" >>"$log"
    run "$name" "$lim" "$log" env PYTHONPATH="$ROOT/benchmarks:$PYTHONPATH" GPU_GUARD_RECORDS="$records" \
      GPU_GUARD_TEST_S="$per_test" GPU_GUARD_HARD_S="$(s 20)" GPU_GUARD_DEADLINE=$(( t_end - $(s 12) )) \
      GPU_GUARD_RESUME="$([ $attempt -gt 1 ] && echo 1 || echo 0)" \
      "${pre[@]}" "$PY" -m pytest -p gpu_check_guard -p no:cacheprovider -q -rfE --continue-on-collection-errors \
      "${args[@]}"
    total=$(( total + SECS ))
    # rerun only when the process died inside a test (a start with no end) and time is left for it
    if [ $RC -ne 0 ] && ! timed_out && [ $attempt -lt 4 ] && [ $(( t_end - $(date +%s) )) -gt "$(s 30)" ] \
       && "$PY" "${REPORT[@]}" tests "$records" | grep -q "^HUNG"; then
      attempt=$(( attempt + 1 ))
      continue
    fi
    break
  done
  SECS=$total
}

# test_status NAME CAP RECORDS LOG: records the step from the test records and pytest's exit code
# (99: compute-sanitizer found errors; its first report then heads the details).
test_status() {
  local name=$1 c=$2 records=$3 log=$4 status head tests=$LOGDIR/tests_$1.txt
  "$PY" "${REPORT[@]}" tests "$records" --rc "$RC" >"$tests" 2>&1
  head=$(head -n 1 "$tests")
  # a sanitizer's errors, whatever the exit code of a later attempt (memcheck: "ERROR SUMMARY: 2 errors";
  # racecheck: "RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)")
  local san=0; grep -qE "ERROR SUMMARY: [1-9]|SUMMARY: .*\([1-9][0-9]* errors?," "$log" && san=1
  if timed_out; then status=TIMEOUT
  elif [ $san = 1 ] || grep -qE "^(FAILED|HUNG) " "$tests" || [ "$RC" -ne 0 ] || [[ "$head" == "no test ran"* ]]; then
    status=FAILED
  elif [ "$MODE" = dry ]; then status=DRY
  elif grep -q "^skipped" "$tests"; then status=WARN  # on the GPU machine a skipped cuda test hides something
  else status=ok; fi
  if grep -qE "ERROR SUMMARY|RACECHECK SUMMARY" "$log"; then
    head="$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -n 1 | sed 's/^=* *//'); $head"
  fi
  [ $san = 0 ] && grep -qE "SUMMARY: .*\([0-9]+ errors?, [1-9][0-9]* warnings?\)" "$log" && [ "$status" = ok ] && status=WARN
  {
    [ $san = 1 ] && first_failure "$log"
    grep -vE "^skipped" "$tests" | tail -n +2 | head -n 30
    grep -E "^skipped" "$tests"
    grep -E "^ERROR " "$log" | head -n 5  # collection errors: no record names them
    if [ $san = 0 ] && { [ "$status" = FAILED ] || [ "$status" = TIMEOUT ]; }; then
      echo "log end:"; first_failure "$log" | tail -n 12
    fi
  } >"$LOGDIR/first_$name.txt"
  record "$name" "$status" "$SECS" "$c" "$head" "$LOGDIR/first_$name.txt"
}

step_pytest() {
  needs pytest || return
  local c log=$LOGDIR/pytest.log; c=$(cap pytest)
  guarded_pytest pytest "$c" "$log" "$LOGDIR/pytest_records.jsonl" "$(s 60)" -- -m cuda tests \
    --junitxml="$LOGDIR/pytest_junit.xml"
  test_status pytest "$c" "$LOGDIR/pytest_records.jsonl" "$log"
}

# The sanitized selections: odd sizes, a slice of the keys and extra negatives (self excluded or not,
# q != k: the general backward), q is k (the symmetric backward), every precision path; one augmentation
# test with every branch on.
MEMCHECK_K="(test_matches_reference and (small-slice or small-bank) and cuda) or (test_symmetric_path_matches_reference and small-supcon) or (test_every_branch_together and cuda)"
RACECHECK_K="(test_matches_reference and small-supcon and (bf16 or fp32) and cuda) or (test_matches_reference and small-bank and tf32) or (test_symmetric_path_matches_reference and small-simclr-N3 and bf16) or (test_every_branch_together and cuda)"
SANITIZED=(tests/test_ntxent_parity.py tests/test_ntxent_cuda_only.py tests/test_augment.py)

step_sanitizer() {  # step_sanitizer NAME TOOL K-EXPRESSION ENV...
  local name=$1 tool=$2 k=$3 c log=$LOGDIR/$1.log
  shift 3
  needs "$name" || return
  c=$(cap "$name")
  if [ "$MODE" = dry ]; then  # what runs there cannot run here; check that the selection still matches
    run "$name" "$c" "$log" "$PY" -m pytest -p no:cacheprovider -q --collect-only "${SANITIZED[@]}" -k "$k"
    local n; n=$(grep -cE "::" "$log")
    record "$name" "$([ $RC -eq 0 ] && [ "$n" -gt 0 ] && echo DRY || echo FAILED)" "$SECS" "$c" \
      "selection collects $n tests; there: compute-sanitizer --tool $tool ($(tool_why sanitizer))" "$log"
    return
  fi
  if ! tool_ok sanitizer; then record "$name" UNAVAILABLE 0 0 "$(tool_why sanitizer)"; return; fi
  guarded_pytest "$name" "$c" "$log" "$LOGDIR/${name}_records.jsonl" "$(s 120)" env "$@" "$SANITIZER" \
    --tool "$tool" --report-api-errors no --error-exitcode 99 --print-limit 30 -- "${SANITIZED[@]}" -k "$k"
  test_status "$name" "$c" "$LOGDIR/${name}_records.jsonl" "$log"
}

step_bench_loss() {
  needs bench_loss || return
  local c log=$LOGDIR/bench_loss.log dir=$LOGDIR/bench_loss; c=$(cap bench_loss)
  local script=benchmarks/bench_ntxent.py
  if [ "$MODE" = dry ]; then check_flags bench_loss "$c" "$script" --device --out --sizes --dims --dtypes --max-seconds \
    --note bf16 fp32; return; fi
  # it writes its files only at the end: leave room for start-up and the configuration that is running
  local margin=$(( c / 3 )); [ $margin -lt "$(s 25)" ] && margin=$(s 25)
  local maxs=$(( c - margin ))
  # the target row (bf16, 2N = 16384, D = 128) first: the configurations run in this order until time is up
  run bench_loss "$c" "$log" "$PY" $script --device cuda --out "$dir" --sizes 16384,65536,4096 --dims 128,512 \
    --dtypes bf16,fp32 --max-seconds "$maxs" --note "gpu_check.sh on $CARD, driver $DRIVER"
  bench_status bench_loss "$c" "$log" loss "$dir"
}

step_bench_aug() {
  needs bench_aug || return
  local c log=$LOGDIR/bench_aug.log dir=$LOGDIR/bench_augment; c=$(cap bench_aug)
  local script=benchmarks/bench_augment.py
  if [ "$MODE" = dry ]; then check_flags bench_aug "$c" "$script" --device --out --reps --cases --providers --note --max-seconds cuda 224x224 32x32 \
    fused tv2 kornia; return; fi
  local reps=5; [ "$c" -lt "$(s 80)" ] && reps=3
  # it stops repeating and skips cases not started once --max-seconds is spent, and still writes results
  local maxs=$(( c - c / 4 ))
  run bench_aug "$c" "$log" "$PY" $script --device cuda --out "$dir" --reps $reps --cases 224x224,32x32 \
    --providers fused,tv2,kornia --max-seconds "$maxs" --note "gpu_check.sh on $CARD, driver $DRIVER"
  bench_status bench_aug "$c" "$log" augment "$dir"
}

# check_flags NAME CAP SCRIPT WORD...: dry run of a benchmark: its --help must name every flag we pass
# and every value we pass that it lists (dtypes, cases, providers).
check_flags() {
  local name=$1 c=$2 script=$3 log=$LOGDIR/$1.log missing=()
  shift 3
  run "$name" "$c" "$log" "$PY" "$script" --help
  for f in "$@"; do grep -q -- "$f" "$log" || missing+=("$f"); done
  local status=DRY; { [ $RC -ne 0 ] || [ ${#missing[@]} -gt 0 ]; } && status=FAILED
  record "$name" "$status" "$SECS" "$c" "$script --help: $([ ${#missing[@]} -eq 0 ] && echo "takes $*" || echo "lacks ${missing[*]}")" "$log"
}

bench_status() {  # bench_status NAME CAP LOG KIND DIR
  local name=$1 c=$2 log=$3 kind=$4 dir=$5 status=ok note
  note=$("$PY" "${REPORT[@]}" "$kind" "$dir" 2>&1 | head -n 1)
  if timed_out; then status=TIMEOUT; elif [ $RC -ne 0 ]; then status=FAILED; fi
  if [ "$status" != ok ] && [[ "$note" == "no result JSON"* ]]; then note="exit $RC: $(grep -v '^\s*$' "$log" | tail -n 1)"; fi
  # the augmentation targets are against kornia: a run without it is incomplete
  if [ "$status" = ok ] && [ "$kind" = augment ] && [[ "$note" != *kornia* ]]; then status=WARN; note="no kornia column; $note"; fi
  [ "$status" != ok ] && first_failure "$log" >"$LOGDIR/first_$name.txt"
  grep -iE "not installed|skipping|OOM|not run" "$log" | head -n 5 >>"$LOGDIR/first_$name.txt"
  record "$name" "$status" "$SECS" "$c" "$note" "$LOGDIR/first_$name.txt"
}

step_ncu() {
  if [ "${WILL[ncu]}" = 0 ]; then record ncu SKIPPED 0 0 "not asked for (GPU_CHECK_STEPS)"; return; fi
  if [ "$BUILT" != 1 ]; then record ncu SKIPPED 0 0 "the build failed"; return; fi
  if [ "$MODE" = dry ]; then
    run ncu 30 "$LOGDIR/ncu.log" "$PY" benchmarks/gpu_check_ncu.py --help
    record ncu "$([ $RC -eq 0 ] && echo DRY || echo FAILED)" "$SECS" 30 "driver parses its arguments; there: ncu ($(tool_why ncu))" "$LOGDIR/ncu.log"
    return
  fi
  if ! tool_ok ncu; then record ncu UNAVAILABLE 0 0 "$(tool_why ncu)"; return; fi
  local c; c=$(cap ncu)
  if [ "$c" = 0 ]; then record ncu SKIPPED 0 0 "no time left ($(left)s)"; return; fi
  local log=$LOGDIR/ncu.log rep=$LOGDIR/ncu_ntxent
  run ncu "$c" "$log" "$NCU" --profile-from-start off --clock-control none --target-processes all \
    --section SpeedOfLight --section Occupancy --section LaunchStats -f -o "$rep" \
    "$PY" benchmarks/gpu_check_ncu.py --n2 16384 --dim 128 --dtype bf16
  local rc=$RC secs=$SECS
  if [ -f "$rep.ncu-rep" ]; then
    local imp=$(( $(left) + GRACE_S )); [ $imp -gt 60 ] && imp=60; [ $imp -lt 5 ] && imp=5
    timeout "$imp" "$NCU" --import "$rep.ncu-rep" --csv --page details --print-units base >"$LOGDIR/ncu_details.csv" 2>>"$log"
    "$PY" "${REPORT[@]}" ncu "$LOGDIR/ncu_details.csv" --n2 16384 --dim 128 >"$LOGDIR/ncu_summary.txt" 2>&1
  fi
  RC=$rc; SECS=$secs
  local status=ok; if timed_out; then status=TIMEOUT; elif [ $rc -ne 0 ]; then status=FAILED; fi
  [ "$status" != ok ] && first_failure "$log" >"$LOGDIR/first_ncu.txt"
  record ncu "$status" "$secs" "$c" "$(head -n 1 "$LOGDIR/ncu_summary.txt" 2>/dev/null || echo 'no report')" "$LOGDIR/first_ncu.txt"
}

# ---------------------------------------------------------------------------------------- summary
summary() {  # the first failures, then the table: the device's reply holds the end of the output
  local f=$LOGDIR/summary.txt rev
  rev=${GPU_CHECK_REV:-$(git rev-parse --short HEAD 2>/dev/null)}
  {
    local bad; bad=$(awk -F'\t' '$2 ~ /FAILED|TIMEOUT|WARN/ { print $1 }' "$STEPS_TSV")
    [ -n "$bad" ] && echo && echo "first failure of each step that did not pass:"
    for n in $bad; do
      echo
      echo "--- $n: $(awk -F'\t' -v n="$n" '$1 == n { print $2 }' "$STEPS_TSV" | tail -n 1) (logs in gpu_check.tar.gz: $(basename "$LOGDIR")/$n*)"
      [ -f "$LOGDIR/details_$n.txt" ] && cat "$LOGDIR/details_$n.txt"
    done
    if [ -f "$LOGDIR/ncu_summary.txt" ]; then echo; echo "--- ncu"; tail -n +2 "$LOGDIR/ncu_summary.txt" | head -n 12; fi
    echo
    echo "gpu_check summary: $(date -u '+%Y-%m-%d %H:%M') UTC | $CARD | driver $DRIVER | torch ${TORCH_V:--} | rev ${rev:-unknown} | $(elapsed)s of ${BUDGET_S}s | mode $MODE"
    printf '%-11s %-11s %6s %6s  %s\n' step status secs cap note
    awk -F'\t' '{ printf "%-11s %-11s %5ss %5ss  %s\n", $1, $2, $3, $4, $5 }' "$STEPS_TSV"
    echo "result: $(awk -F'\t' '$2 ~ /FAILED|TIMEOUT/ { n++ } END { print (n ? n " step(s) FAILED or TIMED OUT" : "no step failed") }' "$STEPS_TSV")"
  } >"$f"
  cp "$f" "$OUT/summary.txt"
  save_archive
  cat "$f"
}

step_env
step_wheels
step_build
step_pytest
step_sanitizer memcheck memcheck "$MEMCHECK_K" PYTORCH_NO_CUDA_MEMORY_CACHING=1
step_sanitizer racecheck racecheck "$RACECHECK_K"
step_bench_loss
step_bench_aug
step_ncu
summary
awk -F'\t' '$2 ~ /^(FAILED|TIMEOUT)$/ { bad = 1 } END { exit bad }' "$STEPS_TSV"
