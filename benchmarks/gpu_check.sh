#!/usr/bin/env bash
# rope_patch GPU check: bit-identity on CUDA over every rotary class, per-call
# latency (exact bound check and sync-free), torch.compile, CUDA graphs, the
# deterministic / TF32 numerics, bf16 robustness under deterministic mode, and
# greedy generate tokens/s (Qwen3-0.6B- and Llama-3-8B-shaped models; eager,
# eager sync-free, static cache + torch.compile), on the installed
# transformers and, when available, on transformers 4.57.x (numerics,
# robustness, identity, latency). Needs no network. About 5 minutes on one
# H100/H200 (killed at BUDGET + BUDGET_T4 + 70 s, i.e. 380 s, plus start-up
# and the wheel install); ends with markdown tables to paste into BENCHMARKS.md.
#
#   bash benchmarks/gpu_check.sh [LOG] [gpu_check.py options...]
#
#   LOG            where everything printed goes (default: gpu_check.log); the
#                  table rows also go to LOG without .log + .summary.jsonl
#   options        passed to benchmarks/gpu_check.py in both runs, e.g.
#                  --cpu-smoke (CPU, tiny shapes: a dry run in about a minute)
#                  or --generate-modes eager,sync_free (no compile)
#
# Environment:
#   PYTHON         interpreter with torch + transformers (default: python3)
#   PYTHON_T4      an interpreter that already has transformers 4.57.x; if unset,
#                  .whl/t4/*.whl (transformers 4.57.6 and what it checks at
#                  import time) are installed into a temporary --target folder
#                  and put first on PYTHONPATH for a second run with $PYTHON.
#                  To fill it where a package index is reachable:
#                    pip download --no-deps -d .whl/t4 transformers==4.57.6 \
#                        huggingface_hub==0.36.2 tokenizers==0.22.2
#                  (and carry .whl to the GPU machine)
#   T4_WHEELS      folder of those wheels (default: .whl/t4)
#   BUDGET         seconds for the first run (default 240); the 4.57 run gets
#                  BUDGET_T4 (default 70)
#
# Exit status: 1 if any bit-identity check failed in any run, else 3 if a part
# was skipped or incomplete, else 0.

set -u -o pipefail

LOG=${1:-gpu_check.log}
shift || true
case $LOG in /*) ;; *) LOG=$PWD/$LOG ;; esac  # relative to where it was started
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-240}
BUDGET_T4=${BUDGET_T4:-70}
T4_WHEELS=${T4_WHEELS:-.whl/t4}
SUMMARY=${LOG%.log}.summary.jsonl
mkdir -p "$(dirname "$LOG")"
: > "$LOG"
: > "$SUMMARY"

say() { echo "$@" | tee -a "$LOG"; }

# run_check LABEL TIMEOUT PYTHON [env assignments...] -- gpu_check.py args
run_check() {
    local label=$1 limit=$2 python=$3
    shift 3
    local envs=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift || true
    say ""
    say "######## $label ($(date -u +%H:%M:%S), limit ${limit}s)"
    env ${envs[@]+"${envs[@]}"} timeout --kill-after=10 "$limit" "$python" -u benchmarks/gpu_check.py "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    if [ "$status" = 124 ] || [ "$status" = 137 ]; then
        say "######## $label: KILLED after ${limit}s (incomplete)"
        status=3
    fi
    say "######## $label: exit status $status"
    return "$status"
}

worst=0
record() {  # keep the worst status: 1 (failure) > 3 (incomplete) > 0
    local s=$1
    if [ "$s" = 1 ] || [ "$worst" = 1 ]; then worst=1
    elif [ "$s" != 0 ]; then worst=3
    fi
}

say "rope_patch gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
say "repo $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?') $(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) changed files"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
fi
"$PYTHON" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"

# rope_patch from the checkout, without touching site-packages.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

run_check "installed transformers" "$((BUDGET + 45))" "$PYTHON" -- --budget "$BUDGET" --summary-json "$SUMMARY" "$@"
record $?

# transformers 4.57.x
T4_PYTHON=""
T4_ENV=()
if [ -n "${PYTHON_T4:-}" ]; then
    T4_PYTHON=$PYTHON_T4
elif ls "$T4_WHEELS"/*.whl >/dev/null 2>&1; then
    T4_SITE=$(mktemp -d "${TMPDIR:-/tmp}/rope_patch_t4.XXXXXX")
    say ""
    say "installing $(ls "$T4_WHEELS"/*.whl | wc -l) wheels from $T4_WHEELS into $T4_SITE"
    installed=0
    if "$PYTHON" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$T4_SITE" "$T4_WHEELS"/*.whl 2>&1 | tee -a "$LOG"; then
        installed=1
    else
        # No pip: a wheel is a zip of the package and its metadata.
        say "pip install failed; unpacking the wheels instead"
        installed=1
        for wheel in "$T4_WHEELS"/*.whl; do
            "$PYTHON" -m zipfile -e "$wheel" "$T4_SITE" 2>&1 | tee -a "$LOG" || installed=0
        done
    fi
    if [ "$installed" = 1 ]; then
        T4_PYTHON=$PYTHON
        T4_ENV=("PYTHONPATH=$T4_SITE:$PYTHONPATH")
    else
        say "SKIPPED transformers 4.57: could not install the wheels"
        record 3
    fi
else
    say ""
    say "SKIPPED transformers 4.57: no PYTHON_T4 and no wheels in $T4_WHEELS"
    record 3
fi
if [ -n "$T4_PYTHON" ]; then
    if env ${T4_ENV[@]+"${T4_ENV[@]}"} "$T4_PYTHON" -c "import transformers, sys; v = transformers.__version__; print('transformers', v, 'from', transformers.__file__); sys.exit(0 if v.startswith('4.57') else 1)" 2>&1 | tee -a "$LOG"; then
        run_check "transformers 4.57" "$((BUDGET_T4 + 25))" "$T4_PYTHON" ${T4_ENV[@]+"${T4_ENV[@]}"} -- \
            --budget "$BUDGET_T4" --parts robustness,numerics,identity,latency --summary-json "$SUMMARY" "$@"
        record $?
    else
        say "SKIPPED transformers 4.57: it does not import (see above)"
        record 3
    fi
fi

say ""
say "######## tables of both runs (paste into BENCHMARKS.md)"
say ""
"$PYTHON" benchmarks/gpu_check.py --print-summary "$SUMMARY" 2>&1 | tee -a "$LOG"
say ""
say "######## gpu_check overall exit status $worst (1: bit-identity failure, 3: incomplete, 0: ok); log: $LOG"
exit "$worst"
