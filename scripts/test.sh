#!/usr/bin/env bash
# Set up a fresh virtual environment and run every check CI runs: lint, types, tests (which build
# the docs with warnings as errors and execute every notebook).
# torch==2.13.0 first: these machines carry its CPU wheel; pyproject.toml only asks for a range.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,docs]"
ruff check depass_lens tests benchmarks notebooks
ruff format --check depass_lens tests benchmarks notebooks
mypy
python -m pytest -q --durations=10
