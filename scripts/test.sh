#!/usr/bin/env bash
# Set up a fresh virtual environment and run every check CI runs: lint, types, tests (which build
# the docs with warnings as errors and execute every notebook).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh "dev,docs,sae"
ruff check depass_lens tests benchmarks notebooks docs/make_figures.py
ruff format --check depass_lens tests benchmarks notebooks docs/make_figures.py
mypy
python -m pytest -v --durations=10
