#!/usr/bin/env bash
# Set everything up, then run the main job: quantize the shipped models, run them on int8 kernels and print
# quality, disk size and measured speedup vs fp32 (plus a side-by-side PNG per model in runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/diffquant demo "$@"
