"""A run's plan: the components added up over the two phases of a training step, then the
allocator's cache and the CUDA context that NVML (and Colab's panel) adds, fitted to measured
runs; whether it fits a GPU, and the largest micro-batch that does.

Four constants are fitted, to this project's H200 measurements (torch 2.11 + CUDA 13; Gemma-2B
shape with random weights at 8 x 512 in 4-, 8- and 16-bit, with and without checkpointing, fp16
under a 15 GiB cap; real Gemma 3 270M in 4-, 8- and 16-bit; `bench/results/`):

    HEADROOM       allocator cache above the allocated peak, as a share of what training adds
                   to the weights, by packing layout and bits. TRL's flattened batches (one row
                   of a new length every step) leave the most: 0.65, fitted to 25-step runs.
                   Packed as rows, 4-bit's cache grows over the first steps (Gemma-2B shape at
                   8 x 512: 0.29 GiB after 2 steps, 0.96 GiB after 25): 0.65 again, fitted to
                   25-step runs; 8- and 16-bit's does not (9.52 and 9.51 GiB of NVML after 2 and
                   25 steps in 8-bit): 0.15, fitted to the two-step grid of `bench/plan_grid.py`
    INT8_EXTRA     LLM.int8's outlier columns and quantization buffers, as a share of the
                   layer inputs it keeps (0.12 on random weights, 0.32 on real Gemma 3 270M)
    CONTEXT        NVML's used memory above the allocator's reserved memory, after loading and
                   while training (`GPU.context_gib`): measured on the H200 only; other GPUs
                   are estimates
    LOAD_SLACK     allocator cache left by quantizing while loading

Activation offloading (TRL's) is planned from TRL's code, not fitted: the checkpointed inputs of
all but its forward stash of layers leave the GPU. Not modelled: torch.compile, Liger kernels,
PEFT's fp32 preparation (`--lean_prepare false`), several GPUs, generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from gemma_qlora.errors import UserError
from gemma_qlora.plan.gpus import GIB, GPU, GPUS, gpu_in_use, parse_gpu
from gemma_qlora.plan.inputs import MAX_TOKENS, PlanInputs
from gemma_qlora.plan.memory import (
    LOSS_TOKENS,
    LOSS_VOCAB,
    OFFLOAD_STASH,
    backward_transient_bytes,
    int8_kept_bytes,
    layer_activation_bytes,
    lora_parameters,
    loss_bytes,
    optimizer_bytes,
    shared_bytes,
    weight_bytes,
)
from gemma_qlora.plan.shapes import ModelShape, load_shape

# fitted constants (module docstring)
HEADROOM = {"flat": {4: 0.65, 8: 0.65, 16: 0.65}, "rows": {4: 0.65, 8: 0.15, 16: 0.15}}  # by packing layout, bits
INT8_EXTRA = 0.2
LOAD_SLACK_GIB = 0.04


@dataclass
class Plan:
    """Predicted memory of one run, in GiB, by component and phase."""

    inputs: PlanInputs
    gpu: GPU | None
    rows: list[tuple[str, float, str]] = field(default_factory=list)  # (component, GiB, note)
    after_load_allocated_gib: float = 0.0
    after_load_nvml_gib: float = 0.0
    peak_allocated_gib: float = 0.0
    peak_reserved_gib: float = 0.0
    peak_nvml_gib: float = 0.0
    peak_phase: str = ""

    def need_gib(self, gpu: GPU) -> float:
        """What must fit: the allocator's peak with a 10 % margin (the prediction's error), and
        the CUDA context. The allocator frees its cache before it runs out, so the cache need not fit."""
        return self.peak_allocated_gib * 1.10 + gpu.context_gib[1]

    def fits(self, gpu: str | float | GPU | None = None) -> bool:
        gpu = parse_gpu(gpu) or self.gpu
        if gpu is None:
            raise UserError("Name a GPU to check the fit against (t4, l4, a100-40gb, h100, ... or its GiB).")
        return self.need_gib(gpu) <= gpu.total_gib

    def largest_micro_batch(self, gpu: str | float | GPU | None = None) -> int:
        """The largest micro-batch (at this sequence length) predicted to fit; 0 if none does."""
        gpu = parse_gpu(gpu) or self.gpu
        if gpu is None:
            raise UserError("Name a GPU to find the largest micro-batch for.")
        return largest_micro_batch(self.inputs, gpu=gpu)

    def summary(self) -> str:
        """One line, for notebooks and the out-of-memory advice."""
        line = (f"predicted peak while training: {self.peak_allocated_gib:.2f} GiB allocated, "
                f"{self.peak_nvml_gib:.2f} GiB in NVML (what nvidia-smi and Colab show)")
        if self.gpu:
            fit = "fits" if self.fits() else "does NOT fit"
            line += f"; {fit} on {self.gpu.name} ({self.gpu.total_gib:g} GiB), largest micro-batch {self.largest_micro_batch()}"
        return line

    def table(self, markdown: bool = False) -> str:
        # report prints Plans and builds them for each GPU's verdict: imported here, not at the
        # top, so that the two modules do not import each other
        from gemma_qlora.plan.report import format_table

        return format_table(self, markdown=markdown)


def build_plan(inputs: PlanInputs, *, gpu: GPU | None = None) -> Plan:
    """Every component of `inputs`, the two phases of a training step, and the totals."""
    g = 1 / GIB
    a = inputs.act_bytes
    s = inputs.shape
    weights = weight_bytes(inputs)
    lora = lora_parameters(inputs) * inputs.lora_bytes
    opt_alloc, opt_paged = optimizer_bytes(inputs)
    workspace = int(2 * inputs.workspace_mib * 2**20) if inputs.device == "cuda" else 0
    shared = shared_bytes(inputs)
    # each checkpointed layer keeps its input; offloaded, only the latest few stay on the GPU
    resident = min(s.num_layers, OFFLOAD_STASH) if inputs.offload_activations and inputs.device == "cuda" else s.num_layers
    checkpoints = resident * inputs.tokens * s.hidden_size * a if inputs.gradient_checkpointing else 0
    kept8 = int8_kept_bytes(inputs)
    kept8_extra = int(INT8_EXTRA * kept8)
    layer = layer_activation_bytes(inputs)
    layers = layer * (1 if inputs.gradient_checkpointing else s.num_layers)
    recompute8 = kept8 // s.num_layers if inputs.gradient_checkpointing else 0  # the recomputed layer keeps its own
    transient = backward_transient_bytes(inputs)
    loss = loss_bytes(inputs)

    static = sum(weights.values()) + 2 * lora + opt_alloc + workspace
    held = static + shared + checkpoints + kept8 + kept8_extra
    layer_phase = layers + recompute8 + transient
    loss_phase = loss + (0 if inputs.gradient_checkpointing else layers)
    peak = held + max(layer_phase, loss_phase)
    flat = inputs.packing and inputs.packing_layout == "flat"
    reserved = peak + HEADROOM["flat" if flat else "rows"][inputs.bits] * (peak - static)

    plan = Plan(inputs, gpu)
    plan.after_load_allocated_gib = sum(weights.values()) * g
    plan.peak_allocated_gib = peak * g
    plan.peak_phase = "backward through a layer" if layer_phase >= loss_phase else "the loss"
    plan.peak_reserved_gib = reserved * g
    ctx = gpu.context_gib if gpu else GPUS["h200"].context_gib
    plan.after_load_nvml_gib = plan.after_load_allocated_gib + LOAD_SLACK_GIB + ctx[0]
    plan.peak_nvml_gib = plan.peak_reserved_gib + opt_paged * g + ctx[1]
    if gpu:
        plan.peak_nvml_gib = min(plan.peak_nvml_gib, gpu.total_gib)

    q = {4: f"{inputs.quant_type.upper()} 4-bit + absmax" + (" (double quant)" if inputs.double_quant else ""),
         8: "LLM.int8: int8 + fp32 row scales", 16: inputs.dtype}[inputs.bits]
    tied = "embedding (tied lm_head)" if s.tied else "embedding + lm_head"
    lora_dtype = "bf16" if inputs.lora_bytes == 2 else "fp32"
    rows, length = inputs.row
    plan.rows = [
        ("decoder projections", weights["quantized"] * g, q),
        (f"kept in {inputs.dtype}", weights["kept"] * g, f"{tied} {s.vocab_size:,} x {s.hidden_size:,}, norms"),
        ("after load: allocated", plan.after_load_allocated_gib, ""),
        ("after load: NVML", plan.after_load_nvml_gib, "+ allocator cache + CUDA context"),
        ("LoRA weights", lora * g, f"{lora_parameters(inputs):,} parameters, {lora_dtype}"),
        ("LoRA gradients", lora * g, lora_dtype),
        ("optimizer state", (opt_alloc + opt_paged) * g, inputs.optim + (" (paged: NVML only)" if opt_paged else "")),
        ("cuBLAS workspaces", workspace * g, "forward and backward threads"),
        ("rotary tables, masks, ids", shared * g, f"attention row {rows} x {length:,} ({inputs.attention})"),
        ("checkpointed layer inputs", checkpoints * g,
         (f"{resident} x {inputs.tokens:,} x {s.hidden_size:,}" + (" (the rest offloaded to CPU)" if resident < s.num_layers else ""))
         if checkpoints else "checkpointing off"),
    ]
    if kept8:
        plan.rows.append(("8-bit layer inputs", (kept8 + kept8_extra) * g, "held by bitsandbytes through the step"))
    plan.rows += [
        ("activations", (layers + recompute8) * g,
         "one layer, recomputed" if inputs.gradient_checkpointing else f"all {s.num_layers} layers"),
        ("backward transients", transient * g, "gradients in flight, dequantized weight"),
        ("loss (TRL chunked)", loss * g, f"{min(inputs.tokens, LOSS_TOKENS):,} x {min(s.vocab_size, LOSS_VOCAB):,} logits tile, no full logits"),
        ("peak: allocated", plan.peak_allocated_gib, f"during {plan.peak_phase}"),
        ("allocator cache", plan.peak_reserved_gib - plan.peak_allocated_gib, "headroom, fitted"),
        ("CUDA context", ctx[1], context_note(gpu)),
        ("peak: NVML", plan.peak_nvml_gib, "what nvidia-smi / Colab show"),
    ]
    return plan


def context_note(gpu: GPU | None) -> str:
    if gpu is None or gpu.measured:
        return "measured on H200"
    return "estimated" if gpu.catalogued else "estimated: this GPU is not in the planner's list"


def largest_micro_batch(inputs: PlanInputs, *, gpu: GPU, limit: int = 4096) -> int:
    """Binary search over the micro-batch at a fixed sequence length."""

    def fits(b: int) -> bool:
        if b * inputs.max_seq_length > MAX_TOKENS:
            return False
        return build_plan(replace(inputs, batch_size=b), gpu=gpu).fits(gpu)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan_for(cfg, gpu: str | float | GPU | None = None) -> Plan:
    """The memory plan of a `TrainConfig` on `gpu` (default: the GPU in use, capped as the run
    caps it; without one, a T4, the notebooks' GPU)."""
    gpu = parse_gpu(gpu) if gpu is not None else gpu_in_use(cfg.gpu_memory_gib)
    return build_plan(PlanInputs.from_train_config(cfg, shape=load_shape(cfg.model), gpu=gpu), gpu=gpu)


def plan(model: str | ModelShape = "embedded", *, gpu: str | float | GPU | None = None, **settings) -> Plan:
    """The memory plan of fine-tuning `model` with `settings` (TrainConfig's names: bits,
    batch_size, max_seq_length, lora_r, gradient_checkpointing, ...) on `gpu` (a name such as
    't4', or GiB). Reads config.json only. `print(plan(...).table())` shows it."""
    gpu = parse_gpu(gpu)
    shape = model if isinstance(model, ModelShape) else load_shape(model)
    if "dtype" not in settings or settings["dtype"] in (None, "auto"):
        settings["dtype"] = "float16" if gpu is not None and not gpu.bf16 else "bfloat16"
    if "lora_targets" in settings:
        targets = settings["lora_targets"]
        settings["lora_targets"] = tuple(targets.split(",") if isinstance(targets, str) else targets)
    if gpu is not None:
        settings.setdefault("workspace_mib", gpu.workspace_mib)
    fields = set(PlanInputs.__dataclass_fields__) - {"shape"}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise UserError(f"plan() has no setting {', '.join(unknown)}: use {', '.join(sorted(fields))}.")
    return build_plan(PlanInputs(shape=shape, **settings), gpu=gpu)
