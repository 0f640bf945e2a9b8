#!/usr/bin/env bash
# Set up fresh virtual environments and run every check CI runs: lint, types, and the test suite
# (which builds the docs with warnings as errors and executes every notebook) under each supported
# TransformerLens generation: 3.x in .venv, then 4.x (TransformerBridge) in .venv-tl4.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1  # the tests never reach the network

# The numerically sensitive tests again, under other math: one thread (other reduction orders),
# ATen's portable kernels instead of AVX2/AVX-512, MKL's conditional-numerical-reproducibility
# mode. A tolerance that only holds on this machine's kernels fails here.
second_math_configuration() {
  echo "== second math configuration: 1 thread, ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE"
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE \
    python -m pytest -q -m numerics
}

# The feature-graph explorer's tests (tests/test_explorer.py) drive a real headless Chromium through
# Playwright (dev extra); its own browser download needs the network, so Debian's chromium is used.
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing Debian's chromium (for tests/test_explorer.py)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
  if ! { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq chromium; } >/dev/null 2>&1; then
    echo "warning: could not install chromium; the explorer's browser tests skip (fail if CI=true)"
  fi
fi

. scripts/setup_env.sh "dev,docs,sae"  # SAELens (TL 3 only): the SAE tests run here
ruff check depass_lens tests benchmarks notebooks docs/make_figures.py scripts
ruff format --check depass_lens tests benchmarks notebooks docs/make_figures.py scripts
mypy
echo "== TransformerLens $(python -c 'import importlib.metadata as m; print(m.version("transformer-lens"))')"
python -m pytest -v --durations=10
second_math_configuration
deactivate

VENV=.venv-tl4 TL_SPEC='transformer-lens>=4.3,<5' . scripts/setup_env.sh "dev,docs"
mypy
echo "== TransformerLens $(python -c 'import importlib.metadata as m; print(m.version("transformer-lens"))')"
python -m pytest -v --durations=10
second_math_configuration
