"""Each component of a run's GPU memory, in bytes, as exact arithmetic on shapes.

Read from the code of bitsandbytes 0.50, PEFT 0.21, transformers 5.24, TRL 1.16 and torch;
the tests check the weights, LoRA, optimizer state and per-layer activations against what
those libraries allocate on CPU.
"""

from __future__ import annotations

import math

from gemma_qlora.plan.inputs import PlanInputs

# From the libraries' code.
LOSS_TOKENS, LOSS_VOCAB = 4096, 32768  # trl.kernels.chunked_logprob: logits tile of the fused loss
# TRL's activation offloading keeps this many of the latest saved tensors on the GPU while the
# forward runs (get_act_offloading_ctx_manager's max_fwd_stash_size), so that copies overlap compute
OFFLOAD_STASH = 5


def quantized_linear_bytes(inputs: PlanInputs, *, n_in: int, n_out: int) -> int:
    """One projection as the run's quantization method stores it (`quant.Method.linear_bytes`)."""
    return inputs.method.linear_bytes(n_in, n_out, double_quant=inputs.double_quant, act_bytes=inputs.act_bytes)


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
    per_token += (2 if inputs.uses_liger else 3) * a * i  # gate, gelu(gate), up (Liger's GeGLU: gate, up)
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
    if not inputs.method.keeps_layer_inputs or (inputs.fused_lora and inputs.lora_dropout == 0):
        return 0  # the fused LoRA path (dropout 0) runs its own autograd over the dequantized weight
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
    cast = not inputs.method.quantized and inputs.lora_bytes == 4 and a != 4
    per_token = (a + 8) * i if cast else (2 * a - m) * i
    if inputs.uses_liger and not cast:  # Liger's GeGLU backward writes both gradients into gate and up
        per_token = (a - m) * i
    per_token += 2 * a * s.hidden_size
    dequant = a * max(x * y for x, y in s.linears().values()) if inputs.method.quantized else 0
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
