"""One run's settings as far as memory goes (TrainConfig's names), checked, and the sizes
derived from them that every component uses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gemma_qlora.config import LORA_TARGETS as TRAIN_TARGETS
from gemma_qlora.errors import UserError
from gemma_qlora.plan.gpus import GPU
from gemma_qlora.plan.shapes import ModelShape

LORA_TARGETS = tuple(TRAIN_TARGETS)  # the projections the planner counts: every one train can adapt
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit")
MAX_TOKENS = 1 << 22  # a micro-batch beyond 4M tokens is a typo, not a plan


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
    fused_lora: bool = True  # gemma_qlora.fused_lora: its own autograd, not LLM.int8's (which keeps each projection's input)
    # Liger's GeGLU keeps gate and up only, and writes its backward into them; unset: as training
    # decides (TrainConfig.uses_liger), on for bf16 GPUs (compute capability 8.0+) with liger-kernel installed
    liger_kernel: bool | None = None
    dtype: str = "bfloat16"  # compute dtype: bfloat16 (Ampere and newer), float16 (T4), float32 (CPU)
    attn_implementation: str | None = None  # default as the package: eager for Gemma 2, sdpa otherwise
    device: str = "cuda"  # "cpu" only to check the arithmetic against CPU runs
    workspace_mib: float = 32.0

    def __post_init__(self):
        problems = []
        if self.bits not in (4, 8, 16):  # quant.ALLOWED_BITS, without importing torch before the checks
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
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora_dropout must be at least 0 and below 1, not {self.lora_dropout}")
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

    @property
    def method(self):
        """The quantization method (`quant.METHODS`) these settings name."""
        from gemma_qlora.quant import method_of  # torch, imported once the settings have passed their checks

        return method_of(self)

    @property
    def uses_liger(self) -> bool:
        if self.liger_kernel is not None:
            return self.liger_kernel
        from importlib.util import find_spec

        return self.device == "cuda" and self.dtype == "bfloat16" and find_spec("liger_kernel") is not None

    # derived sizes
    @property
    def act_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def lora_bytes(self) -> int:
        """TRL casts a quantized model's LoRA to bf16; PEFT keeps it fp32 on 16-bit models, and the
        package keeps it fp32 wherever compute is not bf16 (train.make_trainer)."""
        return 2 if self.method.quantized and self.dtype == "bfloat16" else 4

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
        """The plan of a `TrainConfig` (or anything with its names) on `gpu` (bf16 unless the GPU
        lacks it or fp16 is forced): every setting the arithmetic takes, by name."""
        fp16 = bool(getattr(cfg, "force_fp16", False)) or (gpu is not None and not gpu.bf16)
        settings = {name: getattr(cfg, name) for name in INPUT_NAMES if hasattr(cfg, name)}
        return cls(
            shape=shape, **{**settings, "lora_targets": tuple(cfg.lora_targets)},
            dtype="float16" if fp16 else "bfloat16", workspace_mib=gpu.workspace_mib if gpu else 32.0,
        )


# The settings a run shares with the arithmetic, by TrainConfig's names (the rest of PlanInputs is
# the planner's own: the shape, dtype, device and cuBLAS workspace).
INPUT_NAMES = tuple(f.name for f in dataclasses.fields(PlanInputs) if f.name not in ("shape", "dtype", "device", "workspace_mib"))
