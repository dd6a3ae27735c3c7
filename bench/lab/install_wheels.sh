#!/usr/bin/env bash
# Install the carried wheels (.whl/, made here by `python bench/lab/make_wheels.py`) on the GPU
# machine, which has no network, into two target folders:
#   /tmp/site          transformers 5.24, trl 1.16, datasets 5.2, liger-kernel + bitsandbytes, dill, multiprocess, the quotes:
#                      the package, the plain and the TRL arms (PYTHONPATH=/tmp/site:$PWD)
#   /tmp/site-unsloth  unsloth, unsloth_zoo, trl 1.15, datasets 4.8 + the same common wheels, on the
#                      machine's own transformers 5.17 (bench.py --unsloth-path /tmp/site-unsloth)
# Run from the repository root; about 15 s.
set -euo pipefail
pip=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --disable-pip-version-check)
"${pip[@]}" --target /tmp/site .whl/common/*.whl .whl/site/*.whl
"${pip[@]}" --target /tmp/site-unsloth .whl/common/*.whl .whl/unsloth/*.whl
# Unsloth's sources are large: byte-compile them now, on all cores, rather than inside the first
# Unsloth arm's import time; not in the background, where it slowed the first arms' host-bound steps.
python3 -m compileall -q -j 0 /tmp/site-unsloth/unsloth /tmp/site-unsloth/unsloth_zoo >/dev/null 2>&1 || true
PYTHONPATH=/tmp/site python3 -c "import torch, transformers, trl, bitsandbytes, datasets; print('site:', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'bitsandbytes', bitsandbytes.__version__, 'datasets', datasets.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
