#!/usr/bin/env bash
# Sets up rvs_tf on a fresh Debian machine: the offline Fashion-MNIST files, a venv in .venv, the package.
# Idempotent: rerunning it is cheap. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import rvs_tf, pytest, xdist, tensorflow_serving" 2>/dev/null \
   || [ setup.py -nt .venv/.rvs_installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  touch .venv/.rvs_installed
fi
echo "rvs_tf is set up in .venv"
