# Sourced by demo.sh and test.sh: a fresh virtual environment with this package.
# torch==2.13.0 first: these machines carry its CPU wheel; pyproject.toml only asks for a range.
# TransformerLens next, pinned to one generation: pyproject.toml allows 3.x and 4.x, and the
# tests run once in each (TL 3.x in .venv, TL 4.x in .venv-tl4).
# Usage: [VENV=.venv] [TL_SPEC='transformer-lens>=3.9,<4'] . scripts/setup_env.sh [EXTRAS]
VENV="${VENV:-.venv}"
TL_SPEC="${TL_SPEC:-transformer-lens>=3.9,<4}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q "$TL_SPEC"
python -m pip install -q -e ".${1:+[$1]}" "$TL_SPEC"
