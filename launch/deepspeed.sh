#!/bin/bash
# bash launch/deepspeed.sh launch/hostfile.example 8 recipe=zephyr_sft_dpo deepspeed=zero3
#
# Every node of a hostfile, N GPUs each, through DeepSpeed's launcher (it reaches the other
# nodes over ssh). posttrain composes the config once on this node and starts the workers on
# its frozen resolved.yaml; this node is the rank-0 node.
set -euo pipefail
HOSTFILE=${1:?usage: bash launch/deepspeed.sh HOSTFILE GPUS_PER_NODE [posttrain overrides...]}
GPUS=${2:?usage: bash launch/deepspeed.sh HOSTFILE GPUS_PER_NODE [posttrain overrides...]}
shift 2
NODES=$(grep -cE '^[[:space:]]*[^#[:space:]]' "$HOSTFILE")
exec posttrain launcher=deepspeed launcher.hostfile="$HOSTFILE" launcher.nnodes="$NODES" \
  launcher.gpus="$GPUS" launcher.master_addr="$(hostname)" "$@"
