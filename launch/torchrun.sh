#!/bin/bash
# bash launch/torchrun.sh 8 recipe=zephyr_sft_dpo deepspeed=zero2
#
# One node, N GPUs through torchrun: posttrain composes the config once, writes
# <run>/resolved.yaml and starts N workers on it (DDP, or DeepSpeed with deepspeed=zeroN).
# Across nodes use launch/slurm_multinode.sbatch, or launcher.nnodes/node_rank/master_addr.
set -euo pipefail
GPUS=${1:?usage: bash launch/torchrun.sh GPUS [posttrain overrides...]}
shift
exec posttrain launcher=torchrun launcher.gpus="$GPUS" "$@"
