#!/usr/bin/env bash
# Set everything up, then run the main job: evaluate the shipped models, quantize them, print the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/diffquant demo "$@"
