#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the toolkit, its test
# dependencies and the optional pieces the tests use when present (TensorRT lean runtime
# for the plugin-registry checks, Triton server + client for the deployment tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels here.
$PIP install "torch==2.13.0"
$PIP install -e ".[test]"
