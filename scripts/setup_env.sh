#!/usr/bin/env bash
# Create ./.venv (if missing) and install moeformer with its test, training, serving and FP8 extras.
# CPU machines get the pinned CPU build of torch; set MOEFORMER_TORCH to choose another spec.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${MOEFORMER_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[test,train,serve,fp8]"
