#!/usr/bin/env bash
# The hot-path measurements in one GPU call: install the carried wheels, check the fused LoRA and
# varlen attention paths against PEFT's and SDPA's on the GPU (bench/lab/check_speed_paths.py),
# then run the bench with the given flags and pack its results into $OUT/NAME.tgz. Run from the
# repository root, carrying .whl:
#   LIMIT=480 bash bench/lab/gpu_speed.sh NAME [--check] [bench.py flags ...]
set -uo pipefail
name=${1:-speed}
shift || true
check=0
if [ "${1:-}" = "--check" ]; then check=1; shift; fi
bash bench/lab/install_wheels.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p /root/r
if [ $check = 1 ]; then
  timeout 80 python3 bench/lab/check_speed_paths.py > /root/r/check.log 2>&1
  echo "check exit status $?"; grep -E "vs|Error|error" /root/r/check.log | tail -8
  cp /root/r/check.log "$OUT/$name-check.log"
fi
timeout "${LIMIT:-480}" python3 bench/bench.py --out "/root/r/$name" --unsloth-path /tmp/site-unsloth \
  --timeout "${ARM_TIMEOUT:-120}" "$@" > "/root/r/$name.log" 2>&1
echo "bench exit status $?"
grep -E "^\[|^model:" "/root/r/$name.log"
tar czf "$OUT/$name.tgz" --exclude='*.safetensors' --exclude='checkpoint-*' --exclude='adapter' -C /root/r "$name" "$name.log"
cp "/root/r/$name/bench.md" "$OUT/$name.md" 2>/dev/null
cat "/root/r/$name/bench.md" 2>/dev/null
