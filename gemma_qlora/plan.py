"""Will it fit? GPU memory of a QLoRA run, predicted from the model's config.json alone.

`plan(model, bits=4, batch_size=8, ...)` reads only the config (a folder, the embedded model,
or a Hub id, of which only config.json is downloaded) and adds up, component by component,
what the libraries allocate: the weights as bitsandbytes stores them, LoRA and its optimizer,
the activations that autograd keeps (with and without gradient checkpointing), TRL's chunked
loss, then the allocator's cache and the CUDA context that NVML (and Colab's panel) adds.

Most figures are exact arithmetic on shapes, read from the code of bitsandbytes 0.50, PEFT
0.21, transformers 5.24, TRL 1.16 and torch: the tests check the weights, LoRA, optimizer
state and per-layer activations against what those libraries allocate on CPU. Four constants
are fitted instead, to this project's H200 measurements (torch 2.11 + CUDA 13; Gemma-2B shape
with random weights at 8 x 512 in 4-, 8- and 16-bit, with and without checkpointing, fp16
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
                   while training: measured on the H200 only; other GPUs are estimates
    LOAD_SLACK     allocator cache left by quantizing while loading

Activation offloading (TRL's) is planned from TRL's code, not fitted: the checkpointed inputs of
all but its forward stash of layers leave the GPU. Not modelled: torch.compile, Liger kernels, PEFT's fp32 preparation (`--lean_prepare false`),
several GPUs, generation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from gemma_qlora.errors import UserError

GIB = 1024**3
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")

# fitted constants (module docstring)
HEADROOM = {"flat": {4: 0.65, 8: 0.65, 16: 0.65}, "rows": {4: 0.65, 8: 0.15, 16: 0.15}}  # by packing layout, bits
INT8_EXTRA = 0.2
LOAD_SLACK_GIB = 0.04

# From the libraries' code.
NF4_BLOCK = 64  # bitsandbytes' 4-bit block: one absmax per 64 weights
NESTED_BLOCK = 256  # double quantization: absmax themselves quantized in blocks of 256
LOSS_TOKENS, LOSS_VOCAB = 4096, 32768  # trl.kernels.chunked_logprob: logits tile of the fused loss
MAX_TOKENS = 1 << 22  # a micro-batch beyond 4M tokens is a typo, not a plan
# TRL's activation offloading keeps this many of the latest saved tensors on the GPU while the
# forward runs (get_act_offloading_ctx_manager's max_fwd_stash_size), so that copies overlap compute
OFFLOAD_STASH = 5


@dataclass(frozen=True)
class GPU:
    """A GPU as the planner sees it: total memory as the driver reports it, whether it computes
    in bf16, and the CUDA context NVML counts above the allocator (load, training)."""

    name: str
    total_gib: float
    bf16: bool = True
    context_gib: tuple[float, float] = (1.21, 1.40)
    measured: bool = False  # context measured on this kind of GPU (else estimated)
    workspace_mib: float = 32.0  # cuBLAS workspace per thread (torch: 32 MiB on Hopper, 8 MiB before)


GPUS = {
    "t4": GPU("T4", 15.0, bf16=False, context_gib=(0.45, 0.60), workspace_mib=8.125),
    "l4": GPU("L4", 22.5, context_gib=(0.55, 0.75), workspace_mib=8.125),
    "a100-40gb": GPU("A100 40GB", 39.6, context_gib=(0.75, 0.95), workspace_mib=8.125),
    "a100-80gb": GPU("A100 80GB", 79.3, context_gib=(0.75, 0.95), workspace_mib=8.125),
    "h100": GPU("H100 80GB", 79.6, measured=False),
    "h200": GPU("H200", 139.8, measured=True),
}


def parse_gpu(value: str | float | GPU | None) -> GPU | None:
    """A known name (t4, l4, a100-40gb, a100-80gb, h100, h200) or a size in GiB."""
    if value is None or isinstance(value, GPU):
        return value
    text = str(value).strip().lower()
    if text in GPUS:
        return GPUS[text]
    try:
        gib = float(text.removesuffix("gib").removesuffix("gb"))
    except ValueError:
        raise UserError(f"Unknown GPU {value!r}: give one of {', '.join(GPUS)} or its memory in GiB (e.g. 24).") from None
    if not 1 <= gib <= 4096:
        raise UserError(f"--gpu {value!r}: a GPU's memory in GiB is between 1 and 4096.")
    return GPU(f"{gib:g} GiB GPU", gib)


def current_gpu(cap_gib: float | None = None) -> GPU:
    """The GPU this process sees (total memory, or `cap_gib` where the run caps it)."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    total = props.total_memory / GIB
    known = next((g for g in GPUS.values() if g.name.split()[0].lower() in props.name.lower()), None)
    gpu = replace(known, total_gib=total) if known else GPU(props.name, total, bf16=props.major >= 8)
    gpu = replace(gpu, workspace_mib=32.0 if props.major >= 9 else 8.125)
    return replace(gpu, total_gib=min(total, cap_gib)) if cap_gib else gpu


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from a Gemma config.json."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied: bool = True
    max_positions: int = 8192
    layer_types: tuple[str, ...] = ()
    softcap: bool = False  # Gemma 2's attention logit soft-capping (eager attention)

    @property
    def norms_per_layer(self) -> int:
        return 2 if self.model_type == "gemma" else 4

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def rope_types(self) -> int:
        return 2 if self.model_type == "gemma3_text" else 1

    @property
    def mask_types(self) -> int:
        return max(1, len(set(self.layer_types)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """The quantized projections of one decoder layer: name -> (in, out)."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def parameters(self) -> int:
        per_layer = sum(a * b for a, b in self.linears().values())
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size * (1 if self.tied else 2)

    @classmethod
    def from_config(cls, config, *, name: str) -> ModelShape:
        if getattr(config, "model_type", None) == "gemma3" and hasattr(config, "text_config"):
            config = config.text_config  # multimodal Gemma 3: its language model, which is what trains
        model_type = getattr(config, "model_type", None)
        if model_type not in GEMMA_TYPES:
            raise UserError(
                f"{name} is a {model_type!r} model, not Gemma: plan a Gemma checkpoint ({', '.join(GEMMA_TYPES)}, or gemma3's text part)."
            )
        layer_types = tuple(getattr(config, "layer_types", None) or ())
        return cls(
            name=name,
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            tied=bool(getattr(config, "tie_word_embeddings", True)),
            max_positions=getattr(config, "max_position_embeddings", 8192),
            layer_types=layer_types,
            softcap=model_type == "gemma2" and bool(getattr(config, "attn_logit_softcapping", None)),
        )


def read_config(model: str):
    """The transformers config of `model` from its config.json alone: 'embedded', a folder, a
    config.json file, or a Hub id (only config.json is downloaded)."""
    from transformers import AutoConfig

    if model == "embedded":
        from gemma_qlora.embedded import embedded_model_dir

        path = embedded_model_dir() / "config.json"
    elif model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).expanduser().exists():
        path = Path(model).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise UserError(f"No config.json at {model}: give a model folder, a config.json, a hub id or 'embedded'.")
    else:
        path = _download_config(model)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable config.json ({type(error).__name__}): give a model's config.") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"{path} has no model_type: it is not a transformers model config.")
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, TypeError, KeyError) as error:
        raise UserError(f"{model}: transformers cannot read this config ({error}).") from None


def _download_config(repo: str) -> Path:
    from huggingface_hub import hf_hub_download

    from gemma_qlora.model import _explain_hub_error, hf_token

    token = hf_token()
    try:
        return Path(hf_hub_download(repo, "config.json", token=token))
    except Exception as error:  # the hub's many error types: one line that says what to do
        raise _explain_hub_error(repo, error, token) from None


def load_shape(model: str) -> ModelShape:
    return ModelShape.from_config(read_config(model), name=model)


@dataclass(frozen=True)
class PlanInputs:
    """One run's settings, as far as memory goes (the names are TrainConfig's)."""

    shape: ModelShape
    bits: int = 4
    batch_size: int = 8
    max_seq_length: int = 512
    grad_accum: int = 1
    lora_r: int = 8
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    gradient_checkpointing: bool = True
    offload_activations: bool = True  # TRL's activation offloading: saved tensors in CPU memory (GPU only)
    packing: bool = True
    # "rows" (the package's default): one row per packed sequence (gemma_qlora.packing); "flat":
    # TRL's padding-free batch, the whole micro-batch in one row. Attention and its masks differ.
    packing_layout: str = "rows"
    quant_type: str = "nf4"
    double_quant: bool = True
    optim: str = "adamw_torch_fused"
    dtype: str = "bfloat16"  # compute dtype: bfloat16 (Ampere and newer), float16 (T4), float32 (CPU)
    attn_implementation: str | None = None  # default as the package: eager for Gemma 2, sdpa otherwise
    device: str = "cuda"  # "cpu" only to check the arithmetic against CPU runs
    workspace_mib: float = 32.0

    def __post_init__(self):
        problems = []
        if self.bits not in (4, 8, 16):
            problems.append(f"--bits must be 4, 8 or 16, not {self.bits}")
        for name in ("batch_size", "max_seq_length", "grad_accum", "lora_r"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"--{name} must be a positive whole number, not {getattr(self, name)}")
        if not problems and self.batch_size * self.max_seq_length > MAX_TOKENS:
            problems.append(f"a micro-batch of {self.batch_size} x {self.max_seq_length} tokens is beyond any GPU; "
                            f"keep --batch_size x --max_seq_length under {MAX_TOKENS:,}")
        if not problems and self.max_seq_length > self.shape.max_positions:
            problems.append(f"--max_seq_length {self.max_seq_length} is beyond the {self.shape.max_positions:,} positions "
                            f"this model handles")
        if not problems and self.lora_r > self.shape.hidden_size:
            problems.append(f"--lora_r {self.lora_r} is larger than the hidden size ({self.shape.hidden_size})")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            problems.append(f"--dtype must be bfloat16, float16 or float32, not {self.dtype!r}")
        if self.optim not in OPTIMIZERS:
            problems.append(f"--optim {self.optim!r} is not planned: choose one of {', '.join(OPTIMIZERS)}")
        if self.packing_layout not in ("flat", "rows"):
            problems.append(f"--packing_layout must be flat or rows, not {self.packing_layout!r}")
        if self.quant_type not in ("nf4", "fp4"):
            problems.append(f"--quant_type must be nf4 or fp4, not {self.quant_type!r}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets:
            problems.append(f"--lora_targets must be among {', '.join(LORA_TARGETS)}, not {', '.join(unknown) or 'none'}")
        if problems:
            raise UserError("; ".join(problems) + ".")

    # derived sizes
    @property
    def act_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def lora_bytes(self) -> int:
        """TRL casts a quantized model's LoRA to bf16; PEFT keeps it fp32 on 16-bit models, and the
        package keeps it fp32 wherever compute is not bf16 (train.make_trainer)."""
        return 2 if self.bits in (4, 8) and self.dtype == "bfloat16" else 4

    @property
    def tokens(self) -> int:
        return self.batch_size * self.max_seq_length

    @property
    def attention(self) -> str:
        if self.attn_implementation:
            return self.attn_implementation
        return "eager" if self.device == "cpu" or self.shape.model_type == "gemma2" else "sdpa"

    @property
    def row(self) -> tuple[int, int]:
        """(rows, row length) the attention sees: TRL's padding-free packing puts a whole
        micro-batch in one row, its examples kept apart by a block-diagonal mask over the row;
        row packing and padded batches keep one row per sequence."""
        flat = self.packing and self.packing_layout == "flat"
        return (1, self.tokens) if flat else (self.batch_size, self.max_seq_length)

    @classmethod
    def from_train_config(cls, cfg, *, shape: ModelShape, gpu: GPU | None = None) -> PlanInputs:
        """The plan of a `TrainConfig` on `gpu` (bf16 unless the GPU lacks it or fp16 is forced)."""
        fp16 = bool(getattr(cfg, "force_fp16", False)) or (gpu is not None and not gpu.bf16)
        return cls(
            shape=shape, bits=cfg.bits, batch_size=cfg.batch_size, max_seq_length=cfg.max_seq_length,
            grad_accum=cfg.grad_accum, lora_r=cfg.lora_r, lora_dropout=cfg.lora_dropout,
            lora_targets=tuple(cfg.lora_targets), gradient_checkpointing=cfg.gradient_checkpointing,
            offload_activations=cfg.offload_activations, packing=cfg.packing, packing_layout=cfg.packing_layout, quant_type=cfg.quant_type, double_quant=cfg.double_quant, optim=cfg.optim,
            dtype="float16" if fp16 else "bfloat16", attn_implementation=cfg.attn_implementation,
            workspace_mib=gpu.workspace_mib if gpu else 32.0,
        )


# ---------------------------------------------------------------------------------------------
# The components, in bytes.
# ---------------------------------------------------------------------------------------------


def quantized_linear_bytes(inputs: PlanInputs, *, n_in: int, n_out: int) -> int:
    """One projection as bitsandbytes stores it.

    4-bit: two weights per byte, one absmax per 64 weights (fp32; with double quantization
    uint8, plus an fp32 absmax per 256 of those and an fp32 offset), and per layer its 16-entry
    NF4/FP4 code (and the 256-entry code of the nested quantization). 8-bit (LLM.int8): one int8
    per weight and an fp32 scale per output row. 16-bit: the compute dtype.
    """
    n = n_in * n_out
    if inputs.bits == 16:
        return n * inputs.act_bytes
    if inputs.bits == 8:
        return n + 4 * n_out
    blocks = math.ceil(n / NF4_BLOCK)
    packed = (n + 1) // 2
    if not inputs.double_quant:
        return packed + 4 * blocks + 4 * 16
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + 4 * 16 + 4 * 256


def weight_bytes(inputs: PlanInputs) -> dict[str, int]:
    """{"quantized": the decoder's projections, "kept": what the quantizer leaves in the compute
    dtype (embedding, tied to lm_head, or lm_head too when untied; every norm)}."""
    s = inputs.shape
    linear = s.num_layers * sum(quantized_linear_bytes(inputs, n_in=a, n_out=b) for a, b in s.linears().values())
    norms = s.num_layers * s.norms_per_layer * s.hidden_size + s.hidden_size
    if s.qk_norm:
        norms += s.num_layers * 2 * s.head_dim
    embedding = s.vocab_size * s.hidden_size * (1 if s.tied else 2)
    return {"quantized": linear, "kept": (embedding + norms) * inputs.act_bytes}


def lora_parameters(inputs: PlanInputs) -> int:
    """r x (in + out) per adapted projection: PEFT's trainable parameter count."""
    linears = inputs.shape.linears()
    return inputs.shape.num_layers * sum(inputs.lora_r * sum(linears[t]) for t in inputs.lora_targets)


def lora_tensors(inputs: PlanInputs) -> int:
    return inputs.shape.num_layers * len(inputs.lora_targets) * 2


OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit")


def optimizer_bytes(inputs: PlanInputs) -> tuple[int, int]:
    """(on the allocator, in paged memory) of the optimizer state.

    torch's AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype and a step counter (fp32)
    per tensor; bitsandbytes' 8-bit AdamW keeps two uint8 states with an fp32 absmax per 256
    for tensors of 4096 elements or more, fp32 states below; its paged variant lives in CUDA
    managed memory, which NVML counts and the allocator does not.
    """
    tensors, params = lora_tensors(inputs), lora_parameters(inputs)
    if inputs.optim.startswith("adamw_torch"):
        return 2 * params * inputs.lora_bytes + 4 * tensors, 0
    per_tensor = [inputs.lora_r * n for t in inputs.lora_targets for n in inputs.shape.linears()[t]]
    state = inputs.shape.num_layers * sum(2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in per_tensor)
    return (0, state) if inputs.optim.startswith("paged") else (state, 0)


def layer_activation_bytes(inputs: PlanInputs) -> int:
    """What autograd keeps for the backward of one decoder layer (LoRA on, base frozen).

    Per token, a = activation bytes, m = dropout mask bytes (bool from CUDA's fused dropout,
    the activation dtype on CPU): each RMSNorm keeps its input upcast to fp32 (4H) and a
    per-token rsqrt; each adapted projection keeps its dropout output and mask ((a + m) x in)
    and LoRA-A's output (a x r); the MLP keeps gate, gelu(gate) and up (3 a I); attention keeps
    q, k, v (k and v at query size where the grouped heads get copied), its output and log-sum-exp (SDPA; with
    a mask it converts to the compute dtype per layer), or eager attention's fp32 softmax (and
    its copy in the compute dtype, and Gemma 2's tanh) over the row. The 4-bit base layers keep
    nothing (bitsandbytes keeps only the weight); 8-bit inputs are counted elsewhere, since
    bitsandbytes keeps them outside autograd's saved tensors.
    """
    s, a = inputs.shape, inputs.act_bytes
    m = 1 if inputs.device == "cuda" else a
    h, i, d = s.hidden_size, s.intermediate_size, s.head_dim
    q, kv = s.num_heads * d, s.num_kv_heads * d
    rows, length = inputs.row
    n = inputs.tokens
    per_token = s.norms_per_layer * (4 * h + 4)
    if s.qk_norm:
        per_token += 4 * q + 4 * s.num_heads + 4 * kv + 4 * s.num_kv_heads
    if inputs.lora_dropout > 0:
        lora_in = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": i}
        per_token += sum((a + m) * lora_in[t] for t in inputs.lora_targets)
    else:
        # without dropout LoRA-A keeps its input itself: the normed hidden state (shared by q/k/v,
        # and by gate/up), the attention output, the MLP product
        kept = {t for t in inputs.lora_targets}
        per_token += a * (h * bool(kept & {"q_proj", "k_proj", "v_proj"}) + q * ("o_proj" in kept)
                          + h * bool(kept & {"gate_proj", "up_proj"}) + i * ("down_proj" in kept))
    per_token += a * inputs.lora_r * len(inputs.lora_targets)
    per_token += 3 * a * i  # gate, gelu(gate), up
    # repeat_kv expands k and v to every query head: a copy when there are several KV heads; with
    # one, a view, which eager attention's matmul copies anyway once there are several rows
    # (SDPA takes the view)
    grouped = s.num_heads > s.num_kv_heads
    copied = grouped and (s.num_kv_heads > 1 or (inputs.attention == "eager" and rows > 1))
    kv_kept = a * (q if copied else kv)
    per_token += a * q + 2 * kv_kept  # q, k, v as attention gets them
    # each norm also keeps its (1 + weight) in fp32, made afresh every forward
    fixed = 4 * (s.norms_per_layer * h + (2 * d if s.qk_norm else 0))
    if inputs.attention == "eager":
        per_row = s.num_heads * length * (4 + (a if a != 4 else 0) + (a if s.softcap else 0))
        per_token += per_row
    else:
        per_token += a * q + 4 * s.num_heads  # output, log-sum-exp
        fixed += a * rows * length * length  # the bool mask converted to the compute dtype
    return n * per_token + fixed


def int8_kept_bytes(inputs: PlanInputs) -> int:
    """LLM.int8 keeps each projection's input on its autograd context (ctx.tensors), outside the
    saved tensors that gradient checkpointing frees: per layer the normed input of attention
    (shared by q, k, v) and of the MLP (gate, up), the attention output, the MLP product."""
    if inputs.bits != 8:
        return 0
    s = inputs.shape
    q = s.num_heads * s.head_dim
    return s.num_layers * inputs.tokens * inputs.act_bytes * (2 * s.hidden_size + q + s.intermediate_size)


def backward_transient_bytes(inputs: PlanInputs) -> int:
    """What a layer's backward (or its recomputed forward) holds above its saved activations.

    The MLP's backward holds the product's gradient, then gelu's and up's (3 tensors of I per
    token) while gate, gelu(gate) and up are still kept: (2a - m) I above the saved. On a 16-bit
    model PEFT casts each LoRA input to fp32 (its weights are fp32), so the recomputed forward of
    down_proj holds the product, its fp32 copy and fp32 dropout output, and the bf16 copy
    autocast makes: (a + 8) I above the saved. The incoming gradient of the layer's output and
    the residual's (2 a H) add, and a quantized layer's weight is dequantized for its backward.
    """
    s, a = inputs.shape, inputs.act_bytes
    m = 1 if inputs.device == "cuda" else a
    i = s.intermediate_size
    cast = inputs.bits == 16 and inputs.lora_bytes == 4 and a != 4
    per_token = (a + 8) * i if cast else (2 * a - m) * i
    per_token += 2 * a * s.hidden_size
    dequant = 0 if inputs.bits == 16 else a * max(x * y for x, y in s.linears().values())
    return inputs.tokens * per_token + dequant


def loss_bytes(inputs: PlanInputs) -> int:
    """TRL's fused LM head never builds the (tokens x vocab) logits: it projects 4096 tokens x
    32768 vocabulary entries at a time into one buffer (compute dtype), keeping the final norm's
    fp32 input, the hidden states it scores, and for the backward an fp32 gradient of them and
    its cast, plus a few fp32 numbers per token."""
    s, a, n = inputs.shape, inputs.act_bytes, inputs.tokens
    tile = min(n, LOSS_TOKENS) * min(s.vocab_size, LOSS_VOCAB) * a
    return n * (4 * s.hidden_size + a * s.hidden_size + 4 * s.hidden_size + a * s.hidden_size + 28) + tile


def shared_bytes(inputs: PlanInputs) -> int:
    """Per micro-batch, alive through forward and backward: the rotary tables (cos, sin per
    rope type), one attention mask per layer type (bool for SDPA, the compute dtype for eager),
    input ids, labels and position ids."""
    s, a, n = inputs.shape, inputs.act_bytes, inputs.tokens
    rows, length = inputs.row
    mask = rows * length * length * (1 if inputs.attention == "sdpa" else a) * s.mask_types
    return s.rope_types * 2 * n * s.head_dim * a + mask + 3 * 8 * n


# ---------------------------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------------------------


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
         (f"{resident} x {inputs.tokens:,} x {s.hidden_size:,}" + (f" (the rest offloaded to CPU)" if resident < s.num_layers else ""))
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
        ("CUDA context", ctx[1], "measured on H200" if (gpu is None or gpu.measured) else "estimated"),
        ("peak: NVML", plan.peak_nvml_gib, "what nvidia-smi / Colab show"),
    ]
    return plan


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


def plan_for(cfg, gpu: str | float | GPU | None = None) -> Plan:
    """The memory plan of a `TrainConfig` on `gpu` (default: the GPU in use, capped as the run
    caps it; without one, a T4, the notebooks' GPU)."""
    import torch

    if gpu is None:
        gpu = current_gpu(cfg.gpu_memory_gib) if torch.cuda.is_available() else GPUS["t4"]
    gpu = parse_gpu(gpu)
    return build_plan(PlanInputs.from_train_config(cfg, shape=load_shape(cfg.model), gpu=gpu), gpu=gpu)


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


# ---------------------------------------------------------------------------------------------
# Printing.
# ---------------------------------------------------------------------------------------------


def headline(p: Plan) -> list[str]:
    i, s = p.inputs, p.inputs.shape
    bits = {4: f"4-bit {i.quant_type.upper()}" + (" + double quant" if i.double_quant else ""), 8: "8-bit LLM.int8", 16: "16-bit"}[i.bits]
    return [
        f"Memory plan: {s.name} ({s.model_type}, {s.parameters / 1e9:.2f}B parameters, vocab {s.vocab_size:,}), {bits}, "
        f"LoRA r={i.lora_r} on {len(i.lora_targets)} projections",
        f"micro-batch {i.batch_size} x {i.max_seq_length} tokens" + (" packed" if i.packing else " padded")
        + f", gradient checkpointing {'on' if i.gradient_checkpointing else 'off'}, {i.dtype}, {i.optim}",
    ]


def verdict_lines(p: Plan) -> list[str]:
    gpus = [p.gpu] if p.gpu else [g for g in GPUS.values()]
    lines = []
    for gpu in gpus:
        mine = p if p.gpu else build_plan(replace(p.inputs, dtype="float16" if not gpu.bf16 else p.inputs.dtype,
                                                   workspace_mib=gpu.workspace_mib), gpu=gpu)
        need, ok = mine.need_gib(gpu), mine.fits(gpu)
        largest = mine.largest_micro_batch(gpu)
        lines.append(f"{gpu.name} ({gpu.total_gib:g} GiB): {'fits' if ok else 'does NOT fit'} "
                     f"(needs {need:.1f} GiB with a 10 % margin); largest micro-batch at {p.inputs.max_seq_length} tokens: "
                     f"{largest if largest else 'none'}")
    return lines


def format_table(p: Plan, *, markdown: bool = False) -> str:
    head = headline(p)
    if markdown:
        out = [f"**{head[0]}**  ", head[1], "", "| component | GiB | note |", "|---|--:|---|"]
        for name, gib, note in p.rows:
            bold = name.startswith(("after load", "peak"))
            cell = f"**{gib:.2f}**" if bold else f"{gib:.3f}"
            out.append(f"| {'**' + name + '**' if bold else name} | {cell} | {note} |")
        out += [""] + [f"- {line}" for line in verdict_lines(p)]
        return "\n".join(out)
    width = max(len(r[0]) for r in p.rows) + 2
    out = head + [""]
    for name, gib, note in p.rows:
        total = name.startswith(("after load", "peak"))
        out.append(f"{'  ' if not total else ''}{name:<{width - (0 if not total else -2)}}{gib:8.2f} GiB   {note}")
    out += [""] + verdict_lines(p)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# The command line: `python -m gemma_qlora plan ...`.
# ---------------------------------------------------------------------------------------------


@dataclass
class PlanConfig:
    """Flags of `python -m gemma_qlora plan` (TrainConfig's names, plus the GPU)."""

    model: str = field(default="embedded", metadata={"help": "Hub id (only config.json is fetched), model folder, config.json, or 'embedded'."})
    gpu: str | None = field(default=None, metadata={"help": f"{', '.join(GPUS)} or its memory in GiB; default: every one listed."})
    bits: int = field(default=4, metadata={"help": "4, 8 or 16."})
    batch_size: int = field(default=8, metadata={"help": "Micro-batch: packed sequences per step."})
    max_seq_length: int = field(default=512, metadata={"help": "Tokens per packed sequence."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step (no memory of its own)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (0 keeps no dropout copies)."})
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS), metadata={"help": "Adapted projections."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in the backward pass."})
    offload_activations: bool = field(default=True, metadata={"help": "Checkpointed layer inputs kept in CPU memory, as train's flag."})
    packing: bool = field(default=True, metadata={"help": "Pack short examples into sequences, as train does."})
    packing_layout: str = field(default="rows", metadata={"help": "rows: a row per packed sequence (train's default); flat: a micro-batch in one row."})
    quant_type: str = field(default="nf4", metadata={"help": "nf4 or fp4."})
    double_quant: bool = field(default=True, metadata={"help": "Quantize the 4-bit scales too."})
    optim: str = field(default="adamw_torch_fused", metadata={"help": f"One of {', '.join(OPTIMIZERS)}."})
    dtype: str = field(default="auto", metadata={"help": "Compute dtype: auto (bfloat16, float16 on a T4), bfloat16, float16."})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa or eager; default as train chooses."})
    markdown: bool = field(default=False, metadata={"help": "Print the table as Markdown."})

    def settings(self) -> dict:
        skip = {"model", "gpu", "markdown"}
        out = {k: v for k, v in self.__dict__.items() if k not in skip}
        out["lora_targets"] = tuple(t for item in self.lora_targets for t in item.split(",") if t)
        return out


def run_plan(cfg: PlanConfig) -> str:
    """The printed plan of `python -m gemma_qlora plan`."""
    if cfg.attn_implementation not in (None, "sdpa", "eager"):
        raise UserError(f"--attn_implementation must be sdpa or eager, not {cfg.attn_implementation!r}.")
    return plan(cfg.model, gpu=cfg.gpu, **cfg.settings()).table(markdown=cfg.markdown)
