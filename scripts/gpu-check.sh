#!/usr/bin/env bash
# The GPU check: kvtier's CUDA data path on one NVIDIA GPU, from a fresh clone, without vLLM and without network.
# An estimated 2-4 minutes on an H100/H200 (budget: under 8; not yet run on a GPU).
#
#   bash scripts/gpu-check.sh [OUT_DIR]          # results in OUT_DIR (default gpu-check-results/)
#
# Needs Python >= 3.11 with a CUDA build of PyTorch, and these small packages (pure Python or small wheels,
# under 30 MiB together): numpy, pyyaml, lz4, zstandard, xxhash, redis, boto3 (with botocore, s3transfer,
# jmespath, python-dateutil, six, urllib3), pytest (with iniconfig, packaging, pluggy). Not vLLM: every Python
# step runs with `import vllm` blocked (scripts/novllm/sitecustomize.py). Offline, put the wheels in a directory
# and set KVTIER_WHEELS=that/dir: missing packages are installed from it with `pip --no-index`.
#
# Steps: 1. environment; 2. the worker-side modules import without vLLM; 3. the gpu-marked tests
# (tests/test_gpu.py: pinned staging, streams and events, non-blocking saves, fences, layer-wise and async
# loads) and the CPU logic tests of the same code; 4. scripts/gpu_check.py: WorkerSide through scripted save
# and load steps on a flash-attention layout, block size 16, 32 layers, byte-exact; 5. benchmarks/bench_transfer.py
# on CUDA (GB/s of save/load against a plain copy_ on pinned memory, time a save adds to a step).
# KVTIER_GPU_CHECK_ON_CPU=1 runs the same steps small on CPU (how CI checks this script: tests/test_no_vllm.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/scripts/novllm:$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
DEVICE=cuda QUICK="" BENCH_QUICK=""
TESTS="tests/test_gpu.py tests/test_transfer.py tests/test_async_copies.py tests/test_release_protocol.py"
if [ "${KVTIER_GPU_CHECK_ON_CPU:-0}" = 1 ]; then
  DEVICE=cpu QUICK=--quick BENCH_QUICK="--quick --threads 1 --reps 3 --warmup 1 --steps 4 --overhead-reps 1"
  TESTS=tests/test_gpu.py  # the CPU logic tests run in CI anyway
  export KVTIER_GPU_TESTS_ON_CPU=1
fi
step() { echo; echo "== $* [$(( $(date +%s) - START )) s]"; }

step "1. environment"
$PY - "$DEVICE" <<'PY'
import sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if sys.argv[1] == "cpu":
    print("device: cpu (KVTIER_GPU_CHECK_ON_CPU=1: a dry run of this script, not a GPU check)")
elif not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is false: this check needs an NVIDIA GPU and a CUDA build of PyTorch")
else:
    print("device:", torch.cuda.get_device_name(0))
PY
MISSING=$($PY - <<'PY'
import importlib.util
wanted = {"numpy": "numpy", "yaml": "pyyaml", "lz4": "lz4", "zstandard": "zstandard", "xxhash": "xxhash",
          "redis": "redis", "boto3": "boto3", "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in wanted.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$MISSING" ]; then
  if [ -z "${KVTIER_WHEELS:-}" ]; then
    echo "missing packages: $MISSING (set KVTIER_WHEELS to a directory holding their wheels)" >&2
    exit 2
  fi
  # shellcheck disable=SC2086  # one argument per package
  $PY -m pip install -q --no-index --find-links "$KVTIER_WHEELS" $MISSING
fi

step "2. no vLLM: the worker side, the copies and the tiers import without it"
$PY - <<'PY'
import importlib, sys
for name in ("kvtier.connector.worker", "kvtier.connector.saving", "kvtier.transfer", "kvtier.tiers.stack"):
    importlib.import_module(name)
try:
    import vllm  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("vllm imported although scripts/novllm blocks it")
assert not [m for m in sys.modules if m.split(".")[0] == "vllm"]
print("ok: vLLM is not importable here and was not needed")
PY

step "3. gpu-marked tests, and the CPU logic tests of the same code"
# shellcheck disable=SC2086  # one argument per file
$PY -m pytest -q -p no:cacheprovider $TESTS --junitxml "$OUT/pytest.xml"

step "4. WorkerSide on the device: scripted save and load steps, 32 layers, flash layout, block size 16"
$PY scripts/gpu_check.py --device "$DEVICE" $QUICK --out "$OUT/gpu_check.json"

step "5. bench_transfer on $DEVICE"
# shellcheck disable=SC2086  # flags
$PY benchmarks/bench_transfer.py --device "$DEVICE" $BENCH_QUICK --out-dir "$OUT"

step "done: results in $OUT/"
