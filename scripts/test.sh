#!/usr/bin/env bash
# Install (scripts/setup_env.sh) and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest -q "$@"
