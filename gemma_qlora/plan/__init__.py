"""Will it fit? GPU memory of a QLoRA run, predicted from the model's config.json alone.

`plan(model, bits=4, batch_size=8, ...)` reads only the config (a folder, the embedded model,
or a Hub id, of which only config.json is downloaded) and adds up, component by component,
what the libraries allocate: the weights as bitsandbytes stores them, LoRA and its optimizer,
the activations that autograd keeps (with and without gradient checkpointing), TRL's chunked
loss, then the allocator's cache and the CUDA context that NVML (and Colab's panel) adds.
`print(plan(...).table())` shows it; docs/planner.md says how it was checked.

    gpus      the GPUs it knows and how a device's name is matched to one
    shapes    a Gemma config.json: checked, and read into a ModelShape
    inputs    a run's settings as far as memory goes (PlanInputs)
    memory    each component in bytes, from the libraries' code
    estimate  the totals, the fitted cache and context, the fit, the largest micro-batch
    search    the micro-batch for --auto_batch_size, the out-of-memory advice's line
    report    the printed table and the `plan` command
"""

from gemma_qlora.plan.estimate import (
    HEADROOM,
    INT8_EXTRA,
    LOAD_SLACK_GIB,
    Plan,
    build_plan,
    largest_micro_batch,
    plan,
    plan_for,
)
from gemma_qlora.plan.gpus import GIB, GPU, GPUS, current_gpu, device_gpu, gpu_in_use, match_gpu, parse_gpu
from gemma_qlora.plan.inputs import LORA_TARGETS, MAX_TOKENS, OPTIMIZERS, PlanInputs
from gemma_qlora.plan.memory import (
    LOSS_TOKENS,
    LOSS_VOCAB,
    OFFLOAD_STASH,
    backward_transient_bytes,
    int8_kept_bytes,
    layer_activation_bytes,
    lora_parameters,
    lora_tensors,
    loss_bytes,
    optimizer_bytes,
    quantized_linear_bytes,
    shared_bytes,
    weight_bytes,
)
from gemma_qlora.plan.report import PlanConfig, format_table, headline, run_plan, verdict_lines
from gemma_qlora.plan.search import choose_micro_batch, fit_micro_batch, prediction_line
from gemma_qlora.plan.shapes import GEMMA_TYPES, ModelShape, check_config, check_fields, load_shape, read_config, read_json

__all__ = [
    "GEMMA_TYPES", "GIB", "GPU", "GPUS", "HEADROOM", "INT8_EXTRA", "LOAD_SLACK_GIB", "LORA_TARGETS", "LOSS_TOKENS",
    "LOSS_VOCAB", "MAX_TOKENS", "OFFLOAD_STASH", "OPTIMIZERS", "ModelShape", "Plan",
    "PlanConfig", "PlanInputs", "backward_transient_bytes", "build_plan", "check_config", "check_fields", "choose_micro_batch",
    "current_gpu", "device_gpu", "fit_micro_batch", "format_table", "gpu_in_use", "headline", "int8_kept_bytes",
    "largest_micro_batch", "layer_activation_bytes", "load_shape", "lora_parameters", "lora_tensors", "loss_bytes",
    "match_gpu", "optimizer_bytes", "parse_gpu", "plan", "plan_for", "prediction_line", "quantized_linear_bytes",
    "read_config", "read_json", "run_plan", "shared_bytes", "verdict_lines", "weight_bytes",
]
