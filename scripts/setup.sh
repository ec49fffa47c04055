#!/usr/bin/env bash
# Idempotent setup on a fresh Debian-like machine: the Fashion-MNIST package and a virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${DIFFQUANT_FASHION_MNIST_DIR:-}" ]; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || {
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null;
  }
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch is pinned so pip takes the local CPU build, not a multi-GB CUDA one
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
# CI also takes the OpenVINO peer (large, so kept out of a user's default setup) so its code path is tested
EXTRAS="test,peers"
if [ "${CI:-}" = "true" ]; then EXTRAS="test,peers,openvino"; fi
.venv/bin/pip install -q --disable-pip-version-check -e ".[${EXTRAS}]" 'torch==2.13.0'
