#!/usr/bin/env bash
# The benchmark in one GPU call: install the carried wheels, build the random Gemma-2B shape (once
# per machine, on the GPU: seconds), run the arms (default: bench.py's default arms, 5 warm-up + 20
# timed steps each, about 8 minutes on an H200), and pack the results into $OUT/NAME.tgz (bench.md
# also comes back alone). Run from the repository root, carrying .whl:
#   bash bench/lab/gpu_bench.sh NAME [bench.py flags ...]
#   LIMIT=540 ARM_TIMEOUT=150 bash bench/lab/gpu_bench.sh h200-bench-rows --arms trl-4bit-wrapped,pkg-4bit
set -uo pipefail
name=${1:-bench}
shift || true
bash bench/lab/install_wheels.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
mkdir -p /root/r
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout "${LIMIT:-540}" python3 bench/bench.py --out "/root/r/$name" --unsloth-path /tmp/site-unsloth \
  --timeout "${ARM_TIMEOUT:-150}" "$@" > "/root/r/$name.log" 2>&1
echo "bench exit status $?"
grep -E "^\[|^model:" "/root/r/$name.log"
tar czf "$OUT/$name.tgz" --exclude='*.safetensors' --exclude='checkpoint-*' -C /root/r "$name" "$name.log"
cp "/root/r/$name/bench.md" "$OUT/$name.md" 2>/dev/null
cat "/root/r/$name/bench.md" 2>/dev/null
ls -la "$OUT"
