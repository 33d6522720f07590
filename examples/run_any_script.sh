#!/usr/bin/env bash
# Run an unmodified script with rope_patch active, the way ddtrace-run or
# opentelemetry-instrument do: `rope-patch run -- PROGRAM [ARGS...]`.
# The generated tokens are the same in all three runs; only the first line differs.
#
#   bash examples/run_any_script.sh
#
# The interpreter is the repository's .venv/bin/python when it exists (the
# README's set-up makes it), else python3 on PATH; PYTHON=/path/to/python picks
# another one. `rope-patch` is the command installed next to that interpreter,
# else `$PYTHON -m rope_patch`; ROPE_PATCH=/path/to/rope-patch overrides it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then
        PYTHON="$PWD/.venv/bin/python"
    else
        PYTHON=python3
    fi
fi
if ! command -v "$PYTHON" >/dev/null; then
    echo "run_any_script.sh: no interpreter $PYTHON (set PYTHON=/path/to/python)" >&2
    exit 2
fi
if [[ -n "${ROPE_PATCH:-}" ]]; then
    rope_patch=("$ROPE_PATCH")
elif bin="$(dirname "$(command -v "$PYTHON")")" && [[ -x "$bin/rope-patch" ]]; then
    rope_patch=("$bin/rope-patch")
else
    rope_patch=("$PYTHON" -m rope_patch)
fi

echo "== as is"
"$PYTHON" examples/generate_script.py

echo "== rope-patch run -- python examples/generate_script.py"
"${rope_patch[@]}" run -- "$PYTHON" examples/generate_script.py

echo "== rope-patch run --exclude qwen3 -- python examples/generate_script.py"
"${rope_patch[@]}" run --exclude qwen3 -- "$PYTHON" examples/generate_script.py
