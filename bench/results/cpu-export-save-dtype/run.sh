#!/bin/bash
# 8-bit run of the embedded Gemma 3 270M on CPU, then its merge into the original weights saved three ways
set -x
export PYTHONPATH=/work/wt-export
cd /tmp/measure
date -u
python -m gemma_qlora train --model embedded --data embedded --bits 8 --steps 15 --batch_size 2 --max_seq_length 128 --eval_size 40 --output_dir runs
date -u
python -m gemma_qlora export --run runs/8bit --into merged --base original --save_dtype bfloat16 --out runs/8bit/merged-original-bf16
date -u
python -m gemma_qlora export --run runs/8bit --into merged --base original --save_dtype float32 --out runs/8bit/merged-original-fp32
date -u
python -m gemma_qlora export --run runs/8bit --into merged --base dequantized --out runs/8bit/merged-dequantized-auto
date -u
python -m gemma_qlora export --run runs/8bit --into gguf --base original --out runs/8bit/gguf-original
date -u
