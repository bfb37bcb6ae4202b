#!/usr/bin/env bash
# Multi-node OPSD with Slurm: one torchrun per node, rendezvous on the first node.
#   sbatch --nodes=2 examples/slurm_opsd.sh --config examples/configs/qwen3_8b_tp4_pp2.yaml
# (Launching one task per GPU with `srun python -m megatron_opsd.train` also works: the trainer reads
# SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID and rendezvous on the first node.)
#SBATCH --job-name=opsd
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
export NNODES=${SLURM_NNODES:-1}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export NPROC_PER_NODE=${NPROC_PER_NODE:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1  # megatron-core: TP communication overlap and sequence parallelism
# Every node runs the same launcher; NODE_RANK comes from Slurm inside the step. The step must see the
# node's GPUs: --gpus-per-node on the srun line (the #SBATCH line alone is not inherited by every site's
# srun configuration).
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --gpus-per-node="$NPROC_PER_NODE" bash -c 'NODE_RANK=$SLURM_NODEID bash examples/run_opsd.sh "$@"' _ "$@"
