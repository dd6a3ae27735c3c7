"""What a run measures besides memory: versions and hardware, step timing, losses and speed.

The keys written here are the keys of `metrics.json`, which the plots, `report` and the
notebooks read.
"""

from __future__ import annotations

import math
import time
from importlib.metadata import version

import torch
from transformers import TrainerCallback

from gemma_qlora.memory import GIB, MemoryRecord
from gemma_qlora.quant import Precision

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


class StepTimer(TrainerCallback):
    """Wall time and non-pad tokens seen at every optimizer step, for steady-state tokens/s, and
    the GPU memory held between steps (weights, LoRA, optimizer state: what FSDP shards)."""

    def __init__(self):
        self.steps: list[tuple[int, float, int]] = []
        self.allocated: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.allocated.append(torch.cuda.memory_allocated())
        self.steps.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen)))

    def tokens_per_second(self, warmup: int) -> float | None:
        timed = [s for s in self.steps if s[0] > warmup]
        if len(timed) < 2:
            timed = self.steps
        if len(timed) < 2:
            return None
        (_, t0, n0), (_, t1, n1) = timed[0], timed[-1]
        return (n1 - n0) / (t1 - t0)


def environment(precision: Precision) -> dict:
    """Library versions, device and dtype: what a measurement depends on."""
    env = {"versions": {lib: version(lib) for lib in LIBRARIES}, "device": precision.device, "dtype": precision.name}
    if precision.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def training_metrics(trainer, timer: StepTimer, *, warmup: int, eval_before: float | None) -> dict:
    """Loss curves, perplexity and speed from the trainer's log (whose last eval is the
    final one) and the step timer; `eval_before` is the held-out loss before training (None
    where it was not measured)."""
    history = trainer.state.log_history
    losses = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
    evals = [{"step": 0, "eval_loss": eval_before}] if eval_before is not None else []
    evals += [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h]
    evals = [e for i, e in enumerate(evals) if i == 0 or e["step"] != evals[i - 1]["step"]]
    tokens = int(trainer.state.num_input_tokens_seen)
    seconds = timer.steps[-1][1] - timer.steps[0][1] if len(timer.steps) > 1 else None
    return {
        "loss_history": losses,
        "eval_history": evals,
        "final_train_loss": losses[-1]["loss"] if losses else None,
        "steps": trainer.state.global_step,
        "train_tokens": tokens,
        # transformers logs the running train_runtime with every logged step: the last one is the run's
        "tokens_per_second": tokens / next(h["train_runtime"] for h in reversed(history) if "train_runtime" in h),
        "steady_tokens_per_second": timer.tokens_per_second(warmup=warmup),
        "step_seconds": seconds / (len(timer.steps) - 1) if seconds else None,
        # the last step's, not the end of training: an evaluation leaves FSDP's root unit unsharded
        "allocated_between_steps_gib": timer.allocated[-1] / GIB if timer.allocated else None,
        "perplexity_before": math.exp(eval_before) if eval_before is not None else None,
        "perplexity": math.exp(evals[-1]["eval_loss"]),
    }


def memory_metrics(memory: MemoryRecord) -> dict:
    """The recorder's samples and phases, plus the figures the tables quote."""
    load = next((p for p in memory.phases if p.name == "load"), None)
    return {
        "memory": memory.to_dict(),
        "memory_after_load_gib": load.end_sampled_gib if load else None,
        "allocated_after_load_gib": load.end_allocated_gib if load else None,
        "peak_train_gib": memory.peak("train"),
        "peak_generate_gib": memory.peak("generate_after"),
    }
