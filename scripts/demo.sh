#!/usr/bin/env bash
# Set up a fresh virtual environment and run the offline demo on the shipped `ioi` zoo model.
# Writes depass_report.html (self-contained, open it in a browser) and prints a summary.
# TransformerLens 4: VENV=.venv-tl4 TL_SPEC='transformer-lens>=4.3,<5' bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
depass-lens demo --model ioi --out depass_report.html
