"""Quantization settings: which `BitsAndBytesConfig` and which dtypes for which hardware.

Dtypes are decided in one place so that the model, the LoRA compute and the trainer's
mixed precision always agree. (The seed notebooks' `fp16=True` on a bf16 model crashes at
the first optimizer step with today's transformers/PEFT.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import BitsAndBytesConfig

from gemma_qlora.errors import UserError

ALLOWED_BITS = (4, 8, 16)
ALLOWED_QUANT_TYPES = ("nf4", "fp4")


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


def check_bits(bits: int) -> int:
    if bits not in ALLOWED_BITS:
        raise UserError(f"--bits {bits!r} is not supported: choose 4 (NF4/FP4 QLoRA), 8 (LLM.int8) or 16 (no quantization).")
    return bits


def bnb_config_for(cfg, precision: Precision) -> BitsAndBytesConfig | None:
    """The quantization a run's settings ask for, in the compute dtype of its hardware."""
    return make_bnb_config(
        cfg.bits,
        compute_dtype=precision.compute_dtype,
        quant_type=cfg.quant_type,
        double_quant=cfg.double_quant,
        quant_storage=getattr(torch, cfg.quant_storage) if cfg.quant_storage else None,
    )


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
