"""The micro-batch for `--auto_batch_size`: the largest divisor of the global batch predicted
to fit, and the planner's line in the out-of-memory advice."""

from __future__ import annotations

from dataclasses import replace

from gemma_qlora.errors import UserError
from gemma_qlora.plan.estimate import build_plan, plan_for
from gemma_qlora.plan.gpus import GPU, parse_gpu
from gemma_qlora.plan.inputs import PlanInputs


def choose_micro_batch(inputs: PlanInputs, gpu_gib: float | GPU) -> tuple[int, int]:
    """(micro-batch, accumulation) for `--auto_batch_size`: the largest divisor of the global
    batch (batch_size x grad_accum) predicted to fit, so the global batch stays the same."""
    gpu = gpu_gib if isinstance(gpu_gib, GPU) else parse_gpu(gpu_gib)
    total = inputs.batch_size * inputs.grad_accum
    for micro in sorted((d for d in range(1, total + 1) if total % d == 0), reverse=True):
        if build_plan(replace(inputs, batch_size=micro, grad_accum=total // micro), gpu=gpu).fits(gpu):
            return micro, total // micro
    one = build_plan(replace(inputs, batch_size=1, grad_accum=total), gpu=gpu)
    raise UserError(
        f"Even a micro-batch of 1 x {inputs.max_seq_length} tokens is predicted to need {one.need_gib(gpu):.1f} GiB "
        f"({one.peak_allocated_gib:.1f} allocated + context), more than the {gpu.total_gib:g} GiB of {gpu.name}: "
        f"shorten --max_seq_length{', use --bits 4' if inputs.bits != 4 else ''} or a larger GPU."
    )


def fit_micro_batch(cfg, gpu: GPU):
    """`cfg` (a TrainConfig) with the largest micro-batch predicted to fit `gpu`, the global batch
    (batch_size x grad_accum) kept through accumulation; for `--auto_batch_size`."""
    micro, accum = choose_micro_batch(plan_for(cfg, gpu).inputs, gpu)
    return replace(cfg, batch_size=micro, grad_accum=accum)


def prediction_line(cfg, gpu: GPU) -> str:
    """What the planner predicts for `cfg` on `gpu`, for the out-of-memory advice ('' where the
    model's config cannot be read)."""
    try:
        p = plan_for(cfg, gpu)
    except (UserError, OSError, ValueError):
        return ""
    return f"The planner predicted {p.need_gib(gpu):.1f} GiB of {gpu.total_gib:g} GiB and a largest micro-batch of {p.largest_micro_batch(gpu)}. "
