"""`python tests/fault_run.py FAULT ARG train ...`: the CLI with one fault of the outside world.

    interrupt N       Ctrl-C (SIGINT to itself) inside optimizer step N, after its backward pass,
                      whatever the machine's speed
    full-disk PART    every safetensors or torch.save write to a path containing PART fails as a
                      full disk makes it fail (half the bytes written, then the writer's own
                      error), for machines where a real tiny tmpfs cannot be mounted
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, as `python -m` from its root

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from transformers import Trainer  # noqa: E402

fault, arg = sys.argv[1], sys.argv[2]
# A process started with SIGINT ignored (a background job, `nohup`, some CI runners) passes that
# on, and Python then installs no KeyboardInterrupt handler: Ctrl-C is what this runner is for.
signal.signal(signal.SIGINT, signal.default_int_handler)

if fault == "interrupt":
    calls, training_step = 0, Trainer.training_step

    def training_step_then_ctrl_c(self, *args, **kwargs):
        global calls
        loss = training_step(self, *args, **kwargs)
        calls += 1
        if calls == int(arg):
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    Trainer.training_step = training_step_then_ctrl_c
elif fault == "full-disk":
    from safetensors import SafetensorError

    serialize_file, save = safetensors.torch.serialize_file, torch.save

    def half_written(path) -> None:
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)

    def serialize_file_full(tensors, filename, *args, **kwargs):
        if arg in str(filename):
            half_written(filename)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return serialize_file(tensors, filename, *args, **kwargs)

    def save_full(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and arg in str(f):
            half_written(f)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1000 vs 0")
        return save(obj, f, *args, **kwargs)

    safetensors.torch.serialize_file = serialize_file_full
    torch.save = save_full
else:
    raise SystemExit(f"unknown fault {fault}")

from gemma_qlora.cli import main  # noqa: E402

sys.exit(main(sys.argv[3:]))
