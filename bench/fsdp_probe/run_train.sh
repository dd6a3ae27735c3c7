#!/bin/bash
# usage: run_train.sh 1|2|ddp   (env = what `accelerate launch --config_file gemma_qlora/fsdp_qlora.yaml [--fsdp_version 2]` exports)
cd "$(dirname "$0")"  # scratch: model and runs in /tmp/fsdp_probe (python3 build.py first)
if [ "$1" != ddp ]; then
export ACCELERATE_USE_FSDP=true FSDP_VERSION=$1 FSDP_AUTO_WRAP_POLICY=TRANSFORMER_BASED_WRAP FSDP_BACKWARD_PREFETCH=BACKWARD_PRE \
  FSDP_CPU_RAM_EFFICIENT_LOADING=false FSDP_FORWARD_PREFETCH=false FSDP_OFFLOAD_PARAMS=false FSDP_SHARDING_STRATEGY=FULL_SHARD \
  FSDP_STATE_DICT_TYPE=FULL_STATE_DICT FSDP_SYNC_MODULE_STATES=${SYNC:-true} FSDP_USE_ORIG_PARAMS=true
fi
export ACCELERATE_MIXED_PRECISION=no
[ -n "$IGNORE" ] && export FSDP_IGNORED_MODULES="$IGNORE"
torchrun --standalone --nproc_per_node 2 run_train.py 2>&1 | grep -v -E "FutureWarning|warnings.warn|Loading weights|it/s\]|^\s*$"
