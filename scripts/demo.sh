#!/usr/bin/env bash
# Set up a fresh virtual environment and run the offline demo on the shipped `ioi` zoo model.
# Writes depass_report.html (self-contained, open it in a browser) and prints a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
depass-lens demo --model ioi --out depass_report.html
