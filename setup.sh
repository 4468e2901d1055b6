#!/usr/bin/env bash
# Create .venv and install gmbench with its test tools.
#
# CPU machines (the default): pins the CPU build torch==2.13.0, so pip never
# pulls the multi-gigabyte CUDA packages.
# CUDA machines: install the torch build matching your driver first
# (https://pytorch.org/get-started/locally/), then run
#     GMBENCH_TORCH=keep ./setup.sh
# optionally with GMBENCH_EXTRAS=test,fused to add Triton for the fused backend.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV="${GMBENCH_VENV:-.venv}"
EXTRAS="${GMBENCH_EXTRAS:-test}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if [ "${GMBENCH_TORCH:-pin}" = "pin" ]; then
    "${PIP[@]}" install -q "torch==2.13.0"
fi
"${PIP[@]}" install -q -e ".[${EXTRAS}]"
"$VENV/bin/gmbench" --version
