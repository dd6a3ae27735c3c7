#!/bin/bash
set -x
export PYTHONPATH=/work/wt-export
cd /tmp/measure
while pgrep -f "run.sh" >/dev/null || pgrep -f "./run.sh" > /dev/null; do sleep 10; done
date -u
python -m gemma_qlora export --run runs/8bit --into merged --base dequantized --save_dtype bfloat16 --out runs/8bit/merged-dequantized-bf16
date -u
