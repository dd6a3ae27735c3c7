"""`python tests/killed_run.py STEP train ...`: the CLI, SIGKILLed by itself inside optimizer
step STEP (after its backward pass, before its update), whatever the machine's speed."""

import os
import signal
import sys

from transformers import Trainer

kill_at = int(sys.argv[1])
calls = 0
training_step = Trainer.training_step


def training_step_then_die(self, *args, **kwargs):
    global calls
    loss = training_step(self, *args, **kwargs)
    calls += 1
    if calls == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind
    return loss


Trainer.training_step = training_step_then_die

from gemma_qlora.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
