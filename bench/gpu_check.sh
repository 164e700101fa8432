#!/usr/bin/env bash
# The GPU check in one command, from the repository root of a GPU host (wheels from
# tools/gpu_wheels.sh in .whl/):  bench/gpu_check.sh OUT_DIR [bench/gpu_check.py flags]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bench/gpu_check.sh OUT_DIR [flags]}"
shift
exec env PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out "$out" --wheels .whl \
  --target /tmp/asen_site "$@"
