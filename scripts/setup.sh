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
# TensorRT pieces that install from PyPI (the full builder does not): the lean runtime, for
# the plugin-registry tests, and a wheel that ships TensorRT's public headers
# (kernel_lens/include/tensorrt), for building the plugin library. --no-deps: it would
# otherwise pull in a second torch.
$PIP install "tensorrt-lean-cu13-libs==11.4.0.106" "tensorrt-lean-cu13-bindings==11.4.0.106"
$PIP install --no-deps "kernel-lens==2.0.1"
# Triton: the server inside the nvidia-pytriton wheel runs its Python-backend stub from the
# first python on PATH and needs numpy < 2 there, so it gets an environment of its own
# (same Python minor version as .venv; the models add .venv's site-packages themselves).
[ -x build/triton-env/bin/python ] || "$PY" -m venv build/triton-env
build/triton-env/bin/pip --disable-pip-version-check -q install "nvidia-pytriton==0.7.0" "numpy<2"
