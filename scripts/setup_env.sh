# Sourced by demo.sh and test.sh: a fresh virtual environment in .venv with this package.
# torch==2.13.0 first: these machines carry its CPU wheel; pyproject.toml only asks for a range.
# Usage: . scripts/setup_env.sh [EXTRAS]   (e.g. "dev,docs")
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".${1:+[$1]}"
