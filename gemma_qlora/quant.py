"""Quantization: the methods that hold the frozen base, and the dtypes for the hardware.

A `Method` is everything the package knows about one way of holding the base: the config
`from_pretrained` loads it with, what the memory planner counts per projection, whether long
runs compile it by default, and what an export of it is held to. `METHODS` lists them
(bitsandbytes NF4, FP4 and LLM.int8, and no quantization); `method_of(cfg)` picks one from a
run's `--bits` and `--quant_type`. Adding a method is one entry here and its tests.

Dtypes are decided in one place so that the model, the LoRA compute and the trainer's
mixed precision always agree. (The seed notebooks' `fp16=True` on a bf16 model crashes at
the first optimizer step with today's transformers/PEFT.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import BitsAndBytesConfig

from gemma_qlora.errors import UserError



@dataclass(frozen=True)
class Precision:
    """The dtypes one run uses, chosen from the hardware."""

    device: str  # "cuda" or "cpu"
    compute_dtype: torch.dtype  # dtype of matmuls and of the non-quantized weights as loaded
    bf16: bool  # trainer mixed precision flags
    fp16: bool

    @property
    def name(self) -> str:
        return str(self.compute_dtype).removeprefix("torch.")


def detect_precision(device: str | None = None, force_fp16: bool = False) -> Precision:
    """bf16 on GPUs that support it, fp16 on older GPUs (a T4, compute capability 7.5),
    fp32 on CPU (exact, and bf16 matmuls are slow on most CPUs).

    `force_fp16` emulates a T4 on a newer GPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return Precision("cpu", torch.float32, bf16=False, fp16=False)
    if torch.cuda.is_bf16_supported(including_emulation=False) and not force_fp16:
        return Precision("cuda", torch.bfloat16, bf16=True, fp16=False)
    return Precision("cuda", torch.float16, bf16=False, fp16=True)


def cap_gpu_memory(gib: float) -> None:
    """Let this process use at most `gib` of GPU memory (15 emulates a T4's capacity, not its speed)."""
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 1024**3 / total))


def keep_4bit_weights_trainable_on_cpu(model) -> None:
    """Keep bitsandbytes' 4-bit weights in their training layout on CPU.

    On CPUs with AVX512-BF16, bitsandbytes (0.49-0.50) repacks a `Linear4bit` weight in place
    for fast CPU inference at its first forward in eval mode under `no_grad`
    (`Linear4bit.forward` -> `functional._convert_weight_packed_for_cpu`, flagged by
    `quant_state.packing_format_for_cpu`) and never unpacks it on `model.train()`. From then on
    `matmul_4bit` takes the `gemv_4bit` branch, which has no autograd: LoRA gradients stop at
    every base projection, and widths not divisible by 32 fail the repacking outright. The
    recipe evaluates and generates before it trains, so we switch the repacking off for every
    4-bit module (and undo one already done; bitsandbytes' own inverse re-quantizes the scales,
    so it is only a fallback). Other CPUs and GPUs are unaffected.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)


def _bnb_4bit(cfg, precision: Precision) -> BitsAndBytesConfig:
    return make_bnb_config(4, compute_dtype=precision.compute_dtype, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                           quant_storage=getattr(torch, cfg.quant_storage) if cfg.quant_storage else None)


def _bnb_int8(cfg, precision: Precision) -> BitsAndBytesConfig:
    return make_bnb_config(8)


def _no_quantization(cfg, precision: Precision) -> None:
    return None


NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes' 4-bit block, and the block of its nested (double) quantization


def _bnb_4bit_bytes(n_in: int, n_out: int, *, double_quant: bool, act_bytes: int) -> int:
    """Two weights per byte, one absmax per 64 weights (fp32; with double quantization uint8,
    plus an fp32 absmax per 256 of those and an fp32 offset), and per layer its 16-entry NF4/FP4
    code (and the 256-entry code of the nested quantization)."""
    n = n_in * n_out
    blocks, packed = math.ceil(n / NF4_BLOCK), (n + 1) // 2
    if not double_quant:
        return packed + 4 * blocks + 4 * 16
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + 4 * 16 + 4 * 256


def _int8_bytes(n_in: int, n_out: int, *, double_quant: bool, act_bytes: int) -> int:
    return n_in * n_out + 4 * n_out  # one int8 a weight, an fp32 scale per output row


def _dense_bytes(n_in: int, n_out: int, *, double_quant: bool, act_bytes: int) -> int:
    return n_in * n_out * act_bytes


@dataclass(frozen=True)
class Method:
    """One way of holding the frozen base, and what the rest of the package asks of it."""

    name: str
    bits: int
    summary: str
    load_config: Callable  # (cfg, precision) -> the quantization_config from_pretrained takes, or None
    linear_bytes: Callable  # (n_in, n_out, *, double_quant, act_bytes) -> bytes one projection holds (the planner)
    compiles_by_default: bool = False  # a long run on one GPU compiles unless told (measured faster in 4-bit only)
    # LLM.int8 also rounds activations at inference, which no exported checkpoint carries: its
    # exports are held to the adapter on the dequantized weights
    rounds_activations: bool = False
    # LLM.int8's autograd keeps each projection's input outside what checkpointing frees (the planner counts it)
    keeps_layer_inputs: bool = False

    @property
    def quantized(self) -> bool:
        return self.bits < 16


METHODS = {
    "nf4": Method("nf4", 4, "bitsandbytes 4-bit NormalFloat (QLoRA)", _bnb_4bit, _bnb_4bit_bytes, compiles_by_default=True),
    "fp4": Method("fp4", 4, "bitsandbytes 4-bit float", _bnb_4bit, _bnb_4bit_bytes, compiles_by_default=True),
    "int8": Method("int8", 8, "bitsandbytes LLM.int8", _bnb_int8, _int8_bytes, rounds_activations=True, keeps_layer_inputs=True),
    "none": Method("none", 16, "no quantization (16-bit LoRA)", _no_quantization, _dense_bytes),
}
ALLOWED_BITS = tuple(sorted({m.bits for m in METHODS.values()}))
ALLOWED_QUANT_TYPES = tuple(name for name, m in METHODS.items() if m.bits == 4)


def method_of(cfg) -> Method:
    """The method a run's `bits` (and, in 4-bit, `quant_type`) name."""
    check_bits(cfg.bits)
    if cfg.bits == 4:
        if cfg.quant_type not in ALLOWED_QUANT_TYPES:
            raise UserError(f"--quant_type {cfg.quant_type!r} is not supported: choose one of {', '.join(ALLOWED_QUANT_TYPES)}.")
        return METHODS[cfg.quant_type]
    return next(m for m in METHODS.values() if m.bits == cfg.bits)


def check_bits(bits: int) -> int:
    if bits not in ALLOWED_BITS:
        raise UserError(f"--bits {bits!r} is not supported: choose 4 (NF4/FP4 QLoRA), 8 (LLM.int8) or 16 (no quantization).")
    return bits


def bnb_config_for(cfg, precision: Precision) -> BitsAndBytesConfig | None:
    """The quantization a run's settings ask for, in the compute dtype of its hardware."""
    return method_of(cfg).load_config(cfg, precision)


def make_bnb_config(
    bits: int,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    quant_type: str = "nf4",
    double_quant: bool = True,
    quant_storage: torch.dtype | None = None,
) -> BitsAndBytesConfig | None:
    """The `BitsAndBytesConfig` for `bits`: 4 -> NF4 (or FP4) with double quantization,
    8 -> LLM.int8, 16 -> None (the unquantized reference arm).

    `quant_storage` is the dtype the packed 4-bit weights are stored in; FSDP needs it to
    match the float dtype of the rest of the model.
    """
    check_bits(bits)
    if bits == 16:
        return None
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant_type not in ALLOWED_QUANT_TYPES:
        raise UserError(f"--quant_type {quant_type!r} is not supported: choose one of {', '.join(ALLOWED_QUANT_TYPES)}.")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage or torch.uint8,
    )
