#!/usr/bin/env bash
# The single-GPU checks in one command, for a machine with a CUDA torch and no internet:
#
#   bash tests/gpu/run_gpu_checks.sh [--wheels DIR] [--timeout SECONDS]
#
# megatron-core (and any other missing pure-Python dependency) is installed from wheel files in
# --wheels DIR (default tests/gpu/wheels); make that folder on a machine with internet with
#
#   bash tests/gpu/run_gpu_checks.sh --collect DIR [--python-version 3.12]
#
# It prints a table: each check, the issue item it covers, its result; then what it cannot cover.
set -uo pipefail
cd "$(dirname "$0")/../.."

wheels=tests/gpu/wheels
collect=""
python_version=3.12
timeout_s=480
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    --collect) collect=$2; shift 2 ;;
    --python-version) python_version=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    -h|--help) sed -n 2,11p "$0"; exit 0 ;;
    *) echo "run_gpu_checks.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "$collect" ]; then
  # Everything the package needs besides torch and numpy (which the GPU machine has), for CPython
  # $python_version on x86-64 Linux. --no-deps: a dependency on torch must never pull a CUDA build.
  mkdir -p "$collect"
  python -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --implementation cp -d "$collect" -r tests/gpu/wheels.txt || exit 1
  du -sh "$collect"
  exit 0
fi

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "run_gpu_checks.sh: error: torch sees no CUDA GPU here; these checks need one" >&2; exit 2; }
if ! python -c "import megatron.core" 2>/dev/null; then
  [ -d "$wheels" ] || { echo "run_gpu_checks.sh: error: megatron-core is not installed and --wheels $wheels does not exist (make it with --collect)" >&2; exit 2; }
  python -m pip install -q --no-index --find-links "$wheels" --no-deps "$wheels"/*.whl || exit 1
fi
python -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1

out=$(mktemp -d)
export CUDA_DEVICE_MAX_CONNECTIONS=1
# The GPU checks, plus the CPU suite's device-agnostic tests, now on CUDA.
timeout "$timeout_s" python -m pytest -q -p no:cacheprovider --junitxml="$out/gpu.xml" \
  tests/gpu/test_single_gpu.py tests/unit/test_gpu_readiness.py tests/unit/test_rollout_engine.py \
  tests/unit/test_projected_loss.py tests/unit/test_response_projection.py
status=$?
python tests/gpu/report.py "$out/gpu.xml"
exit $status
