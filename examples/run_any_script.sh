#!/usr/bin/env bash
# Run an unmodified script with rope_patch active, the way ddtrace-run or
# opentelemetry-instrument do: `rope-patch run -- PROGRAM [ARGS...]`.
# The generated tokens are the same in all three runs; only the first line differs.
#
#   examples/run_any_script.sh            (PYTHON=/path/to/python to pick an interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
ROPE_PATCH="${ROPE_PATCH:-$(dirname "$(command -v "$PYTHON")")/rope-patch}"

echo "== as is"
"$PYTHON" examples/generate_script.py

echo "== rope-patch run -- python examples/generate_script.py"
"$ROPE_PATCH" run -- "$PYTHON" examples/generate_script.py

echo "== rope-patch run --exclude qwen3 -- python examples/generate_script.py"
"$ROPE_PATCH" run --exclude qwen3 -- "$PYTHON" examples/generate_script.py
