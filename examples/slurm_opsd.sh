#!/usr/bin/env bash
# Multi-node OPSD with Slurm: one torchrun per node, rendezvous on the first node.
#   sbatch --nodes=2 examples/slurm_opsd.sh --config examples/configs/qwen3_8b_tp4_pp2.yaml
#SBATCH --job-name=opsd
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
export NNODES=${SLURM_NNODES:-1}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export NPROC_PER_NODE=${NPROC_PER_NODE:-8}
# Every node runs the same launcher; NODE_RANK comes from Slurm inside the step.
srun --kill-on-bad-exit=1 bash -c 'NODE_RANK=$SLURM_NODEID bash examples/run_opsd.sh "$@"' _ "$@"
