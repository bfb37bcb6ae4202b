#!/usr/bin/env bash
# Launch an OPSD run with torchrun on one node or many.
#
#   bash examples/run_opsd.sh                                   # the embedded default (CPU, 2 processes)
#   bash examples/run_opsd.sh --config examples/configs/qwen3_1p7b_tp2.yaml [--section.key value ...]
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node (examples/slurm_opsd.sh
# does it for Slurm). NPROC_PER_NODE defaults to the GPU count, or 2 on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# megatron-core: TP communication overlap and sequence parallelism need one hardware queue per GPU.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

# Check the config once, before torchrun starts the workers (the trainer's own validation, no process
# group): a bad value prints one line and exits 2; a finished run says so and launches nothing.
check=$(WORLD_SIZE=$((NNODES * NPROC_PER_NODE)) python -m megatron_opsd.train --validate-only "$@") || exit $?
echo "$check"
case "$check" in "nothing to do"* | *"Options (--section.key value)"*) exit 0 ;; esac

exec python -m torch.distributed.run \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m megatron_opsd.train "$@"
