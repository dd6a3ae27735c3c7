"""The arms: what each one trains with, and how its trainer is built.

Families:
    plain    plain Hugging Face as the old notebooks wrote it (a reference, not the bar):
             PEFT's prepare_model_for_kbit_training, LoRA dropout 0.05, 8-bit AdamW
    trl      plain TRL as its documentation shows it: SFTTrainer(model, peft_config=LoraConfig(...))
             on a BitsAndBytesConfig model, no explicit k-bit preparation, LoRA dropout 0
    unsloth  Unsloth's fast path: FastLanguageModel, LoRA dropout 0, its offloaded checkpointing
    pkg      gemma_qlora's load_model + attach_lora + make_trainer, at the TrainConfig defaults or
             with the fields named in the arm's settings (the levers, against the older defaults
             of LoRA dropout 0.05 and nothing offloaded unless they say otherwise)

Every arm trains LoRA r=8 alpha 16 on the seven projections, 8 x 512 tokens a step (but the
`-old` arms), gradient checkpointing, on the same quotes; trl, unsloth and pkg use fused AdamW.
Each builder returns a ready SFTTrainer; the worker trains and measures it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gemma_qlora.config import LORA_TARGETS

# how the examples of a batch are laid out, for the table
PACKING = {
    "wrapped": "wrapped: examples attend to each other",
    "flat": "BFD, kept apart, one flattened row",
    "rows": "BFD, kept apart, rows",
    "unpacked": "unpacked, padded",
}


@dataclass(frozen=True)
class Arm:
    bits: int
    family: str  # plain | trl | unsloth | pkg
    what: str  # one line for the table
    settings: dict = field(default_factory=dict)  # pkg: TrainConfig fields; trl, unsloth: packing_strategy


def _pkg(bits: int, what: str, **settings) -> Arm:
    return Arm(bits, "pkg", what, settings)


# The defaults the older levers were measured against (LoRA dropout 0.05, nothing offloaded): the
# lever arms keep them, so that an arm trains what its results say it trained.
BEFORE = {"lora_dropout": 0.05, "offload_activations": False}


def _lever(bits: int, what: str, **settings) -> Arm:
    return _pkg(bits, what, **{**BEFORE, **settings})


ARMS = {
    "plain-4bit-old": Arm(4, "plain", "old notebook recipe, batch 1 x accum 4, unpacked (reference)", {"old": True}),
    "plain-8bit-old": Arm(8, "plain", "old notebook recipe, batch 1 x accum 4, unpacked (reference)", {"old": True}),
    "plain-4bit": Arm(4, "plain", "old notebook recipe at 8 x 512 (reference, not the bar)"),
    "plain-8bit": Arm(8, "plain", "old notebook recipe at 8 x 512 (reference, not the bar)"),
    "trl-4bit-wrapped": Arm(4, "trl", "plain TRL, SFTTrainer(peft_config=...)", {"packing_strategy": "wrapped"}),
    "trl-4bit-bfd": Arm(4, "trl", "plain TRL, SFTTrainer(peft_config=...)", {"packing_strategy": "bfd"}),
    "trl-8bit-wrapped": Arm(8, "trl", "plain TRL, SFTTrainer(peft_config=...)", {"packing_strategy": "wrapped"}),
    "trl-8bit-bfd": Arm(8, "trl", "plain TRL, SFTTrainer(peft_config=...)", {"packing_strategy": "bfd"}),
    "unsloth-4bit": Arm(4, "unsloth", "Unsloth FastLanguageModel (its fast path)", {"packing_strategy": "wrapped"}),
    "unsloth-4bit-bfd": Arm(4, "unsloth", "Unsloth FastLanguageModel", {"packing_strategy": "bfd"}),
    "unsloth-8bit": Arm(8, "unsloth", "Unsloth FastLanguageModel, load_in_8bit", {"packing_strategy": "wrapped"}),
    "pkg-4bit": _pkg(4, "gemma_qlora defaults"),
    "pkg-8bit": _pkg(8, "gemma_qlora defaults"),
    "pkg-16bit": _pkg(16, "gemma_qlora defaults, no quantization"),
    # a run of COMPILE_FROM_STEPS steps or more compiles by default; the bench's runs are shorter
    "pkg-4bit-compiled": _pkg(4, "gemma_qlora defaults of a long run (compiled)", torch_compile=True),
    "pkg-4bit-compiled-budget50": _pkg(4, "gemma_qlora long-run defaults, compiled with activation memory budget 0.5",
                                       torch_compile=True, activation_memory_budget=0.5),
    "pkg-4bit-compiled-budget10": _pkg(4, "gemma_qlora long-run defaults, compiled with activation memory budget 0.1",
                                       torch_compile=True, activation_memory_budget=0.1),
    # the hot-path levers, each against today's defaults (fused LoRA on, varlen attention off)
    "pkg-4bit-unfused": _pkg(4, "gemma_qlora defaults, PEFT's LoRA path (fused_lora false)", fused_lora=False),
    "pkg-4bit-varlen": _pkg(4, "gemma_qlora defaults + varlen flash attention", varlen_attention=True),
    "pkg-4bit-unfused-varlen": _pkg(4, "gemma_qlora defaults, PEFT's LoRA path + varlen attention", fused_lora=False,
                                    varlen_attention=True),
    "pkg-4bit-no-offload": _pkg(4, "gemma_qlora defaults, activations kept on the GPU", offload_activations=False),
    "pkg-4bit-varlen-no-offload": _pkg(4, "gemma_qlora defaults + varlen attention, activations kept on the GPU",
                                       varlen_attention=True, offload_activations=False),
    "pkg-4bit-varlen-liger": _pkg(4, "gemma_qlora defaults + varlen attention + Liger kernels", varlen_attention=True,
                                  liger_kernel=True),
    "pkg-4bit-compiled-unfused": _pkg(4, "gemma_qlora long-run defaults (compiled), PEFT's LoRA path", torch_compile=True,
                                      fused_lora=False),
    "pkg-4bit-compiled-varlen": _pkg(4, "gemma_qlora long-run defaults (compiled) + varlen attention", torch_compile=True,
                                     varlen_attention=True),
    # Liger's layer kernels: on by default on GPUs of compute capability 8.0+ (TrainConfig.liger_kernel);
    # off, and one at a time on the instance (bench only: the package applies all three or none)
    "pkg-4bit-no-liger": _pkg(4, "gemma_qlora defaults without Liger's kernels", liger_kernel=False),
    "pkg-8bit-no-liger": _pkg(8, "gemma_qlora defaults without Liger's kernels", liger_kernel=False),
    "pkg-4bit-liger-rmsnorm": _pkg(4, "gemma_qlora defaults, of Liger's kernels only RMSNorm", liger={"rms_norm": True}),
    "pkg-4bit-liger-rope": _pkg(4, "gemma_qlora defaults, of Liger's kernels only RoPE", liger={"rope": True}),
    "pkg-4bit-liger-geglu": _pkg(4, "gemma_qlora defaults, of Liger's kernels only GeGLU", liger={"geglu": True}),
    # TRL's activation offloading empties the CUDA cache at every step once bitsandbytes is imported
    # (trl/models/activation_offloading.py, OffloadActivations.__enter__): the same step keeping its cache
    "pkg-4bit-keep-cache": _pkg(4, "gemma_qlora defaults, TRL's offloading without its per-step empty_cache", keep_cache=True),
    "pkg-8bit-keep-cache": _pkg(8, "gemma_qlora defaults, TRL's offloading without its per-step empty_cache", keep_cache=True),
    # double quantization dequantizes each weight's scales as a launch of its own at every use (756
    # host-side calls in two profiled steps of Gemma-2B): the same step with fp32 scales (~0.09 GiB more)
    "pkg-4bit-no-double-quant": _pkg(4, "gemma_qlora defaults, 4-bit scales kept in fp32 (double_quant false)",
                                     double_quant=False),
    "pkg-4bit-reentrant": _pkg(4, "gemma_qlora defaults, reentrant gradient checkpointing", reentrant=True),
    "pkg-8bit-reentrant": _pkg(8, "gemma_qlora defaults, reentrant gradient checkpointing", reentrant=True),
    "pkg-8bit-unfused": _pkg(8, "gemma_qlora defaults, PEFT's LoRA path (LLM.int8 matmul)", fused_lora=False),
    "pkg-8bit-varlen": _pkg(8, "gemma_qlora defaults + varlen flash attention", varlen_attention=True),
    # levers: the package with one or two TrainConfig fields changed
    "pkg-4bit-rows": _lever(4, "gemma_qlora, packing_layout rows", packing_layout="rows"),
    "pkg-4bit-rows-no-dropout": _lever(4, "gemma_qlora, rows, LoRA dropout 0", packing_layout="rows", lora_dropout=0.0),
    "pkg-4bit-rows-compile": _lever(4, "gemma_qlora, rows, torch_compile", packing_layout="rows", torch_compile=True),
    "pkg-4bit-rows-compile-no-dropout": _lever(
        4, "gemma_qlora, rows, torch_compile, LoRA dropout 0", packing_layout="rows", torch_compile=True, lora_dropout=0.0
    ),
    "pkg-4bit-offload": _lever(4, "gemma_qlora, activations offloaded", offload_activations=True),
    "pkg-4bit-compile-no-dropout-offload": _lever(
        4, "gemma_qlora, torch_compile, LoRA dropout 0, activations offloaded", torch_compile=True, lora_dropout=0.0,
        offload_activations=True,
    ),
    "pkg-4bit-no-dropout-offload": _lever(4, "gemma_qlora, LoRA dropout 0, activations offloaded", lora_dropout=0.0,
                                          offload_activations=True),
    "pkg-4bit-no-dropout-offload-liger": _lever(
        4, "gemma_qlora, LoRA dropout 0, activations offloaded, Liger kernels", lora_dropout=0.0, offload_activations=True,
        liger_kernel=True,
    ),
    "pkg-4bit-compile-no-dropout-offload-liger": _lever(
        4, "gemma_qlora, torch_compile, LoRA dropout 0, activations offloaded, Liger kernels", torch_compile=True,
        lora_dropout=0.0, offload_activations=True, liger_kernel=True,
    ),
    "pkg-4bit-compile-offload": _lever(4, "gemma_qlora, torch_compile, activations offloaded", torch_compile=True,
                                       offload_activations=True),
    "pkg-8bit-compile-no-dropout-offload": _lever(
        8, "gemma_qlora, torch_compile, LoRA dropout 0, activations offloaded", torch_compile=True, lora_dropout=0.0,
        offload_activations=True,
    ),
    "pkg-8bit-no-dropout-offload": _lever(8, "gemma_qlora, LoRA dropout 0, activations offloaded", lora_dropout=0.0,
                                          offload_activations=True),
    "pkg-8bit-no-dropout": _lever(8, "gemma_qlora, LoRA dropout 0", lora_dropout=0.0),
    "pkg-8bit-compile-no-dropout": _lever(8, "gemma_qlora, torch_compile, LoRA dropout 0", torch_compile=True, lora_dropout=0.0),
    "pkg-4bit-rows-flex": _lever(4, "gemma_qlora, rows, flex attention", packing_layout="rows", attn_implementation="flex_attention"),
    "pkg-4bit-flat": _lever(4, "gemma_qlora, packing_layout flat", packing_layout="flat"),
    "pkg-8bit-rows": _lever(8, "gemma_qlora, packing_layout rows", packing_layout="rows"),
    "pkg-8bit-flat": _lever(8, "gemma_qlora, packing_layout flat", packing_layout="flat"),
    "pkg-8bit-compile": _lever(8, "gemma_qlora, torch_compile", torch_compile=True),
    "pkg-4bit-peft-prepare": _lever(4, "gemma_qlora, PEFT's k-bit preparation (fp32 copy)", lean_prepare=False),
    "pkg-4bit-no-checkpointing": _lever(4, "gemma_qlora, no gradient checkpointing", gradient_checkpointing=False),
    "pkg-4bit-unpacked": _lever(4, "gemma_qlora, padded batches of 8 quotes", packing=False),
    "pkg-4bit-no-dropout": _lever(4, "gemma_qlora, LoRA dropout 0", lora_dropout=0.0),
    "pkg-4bit-liger": _lever(4, "gemma_qlora, Liger kernels", liger_kernel=True),
    "pkg-4bit-compile": _lever(4, "gemma_qlora, torch_compile", torch_compile=True),
    "pkg-4bit-16x512": _lever(4, "gemma_qlora, micro-batch 16 x 512", batch_size=16),
    "pkg-4bit-paged-adamw": _lever(4, "gemma_qlora, bitsandbytes' paged 8-bit AdamW", optim="paged_adamw_8bit"),
}
# in the order they run: the bars and the package's 4-bit path first, so that a run cut short by
# its time limit keeps the comparison that matters most
DEFAULT_ARMS = [
    "unsloth-4bit", "trl-4bit-wrapped", "pkg-4bit", "pkg-4bit-compiled", "pkg-4bit-flat", "trl-4bit-bfd", "unsloth-4bit-bfd",
    "plain-4bit", "trl-8bit-wrapped", "pkg-8bit", "pkg-8bit-flat",
]

# Ratios set each arm against the bar of its bits (the first of these that ran) and against the
# old notebook recipe at the same batch shape. 16-bit is set against 4-bit, the setting it would replace.
BAR = {4: ["unsloth-4bit", "trl-4bit-wrapped"], 8: ["trl-8bit-wrapped"], 16: ["unsloth-4bit", "trl-4bit-wrapped"]}
PLAIN = {4: ["plain-4bit"], 8: ["plain-8bit"], 16: ["plain-4bit"]}


def compute_dtype(force_fp16: bool):
    """The package's hardware rule (bf16 GPU, fp16 T4, fp32 CPU): a fair baseline differs in
    its recipe, not in the dtype it is given."""
    from gemma_qlora.quant import detect_precision

    return detect_precision(force_fp16=force_fp16).compute_dtype


def quote_dataset(records: list[dict], eos_token: str):
    """The one `text` column the plain, trl and unsloth arms train on: the text the package builds."""
    from datasets import Dataset

    from gemma_qlora.data import format_quote

    return Dataset.from_list([{"text": format_quote(r["quote"], r["author"], eos_token)} for r in records])


def sft_config(s, dtype, output_dir: Path, **fields):
    """SFTConfig for the non-package arms: 8 x 512 packed, every step logged, nothing saved.
    On CPU the 8-bit optimizers do not exist: adamw_torch."""
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        # explicit: Unsloth's patched SFTConfig defaults to 2 where it is not given
        gradient_accumulation_steps=1,
        max_length=512,
        packing=True,
        optim="adamw_torch_fused",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        learning_rate=2e-4,
        warmup_steps=2,
        max_steps=s.warmup + s.steps + s.profile,
        logging_steps=1,
        seed=s.seed,
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        use_cpu=not cuda,
    )
    settings.update(fields)
    if not cuda and "8bit" in settings["optim"]:
        settings["optim"] = "adamw_torch"
    return SFTConfig(**settings)


def bnb_config(bits: int, dtype):
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_quantized(s, bits: int, dtype):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(s.model_dir)
    # dtype given explicitly: a bf16 model under fp16=True fails at the first optimizer step
    model = AutoModelForCausalLM.from_pretrained(
        s.model_dir, quantization_config=bnb_config(bits, dtype), dtype=dtype,
        device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"},
    )
    return model, tokenizer


def build_plain(arm: str, s, records: list[dict], recorder, timer):
    """The old notebooks' recipe, written inline as they wrote it: BitsAndBytesConfig,
    from_pretrained, prepare_model_for_kbit_training, LoraConfig, SFTTrainer. Deliberately not the package."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from trl import SFTTrainer

    spec, dtype = ARMS[arm], compute_dtype(s.fp16)
    with recorder.phase("load"):
        model, tokenizer = load_quantized(s, spec.bits, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, bias="none",
                                             task_type="CAUSAL_LM"))
    old = spec.settings.get("old", False)
    args = sft_config(
        s, dtype, Path(s.out) / "arms" / arm, gradient_checkpointing=True,
        per_device_train_batch_size=1 if old else 8, gradient_accumulation_steps=4 if old else 1, packing=not old,
        max_length=1024 if old else 512,  # 1024: TRL's default, which the old notebooks kept
        optim="paged_adamw_8bit" if old else "adamw_8bit",
    )
    return SFTTrainer(model=model, args=args, train_dataset=quote_dataset(records, tokenizer.eos_token),
                      processing_class=tokenizer, callbacks=[timer])


def build_trl(arm: str, s, records: list[dict], recorder, timer):
    """Plain TRL as its PEFT documentation shows it: the quantized model and a LoraConfig handed
    to SFTTrainer, which attaches the adapter itself."""
    from peft import LoraConfig
    from trl import SFTTrainer

    spec, dtype = ARMS[arm], compute_dtype(s.fp16)
    with recorder.phase("load"):
        model, tokenizer = load_quantized(s, spec.bits, dtype)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    args = sft_config(s, dtype, Path(s.out) / "arms" / arm, gradient_checkpointing=True, **spec.settings)
    return SFTTrainer(model=model, args=args, train_dataset=quote_dataset(records, tokenizer.eos_token),
                      processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])


def build_unsloth(arm: str, s, records: list[dict], recorder, timer):
    """Unsloth's loader and LoRA as its notebooks use them (dropout 0, its offloaded gradient
    checkpointing), with TRL's trainer, which Unsloth patches when it is imported first."""
    from trl import SFTTrainer
    from unsloth import FastLanguageModel

    spec, dtype = ARMS[arm], compute_dtype(s.fp16)
    with recorder.phase("load"):
        model, tokenizer = FastLanguageModel.from_pretrained(
            s.model_dir, max_seq_length=512, dtype=dtype, load_in_4bit=spec.bits == 4, load_in_8bit=spec.bits == 8
        )
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, lora_dropout=0, target_modules=LORA_TARGETS, bias="none",
        use_gradient_checkpointing="unsloth", random_state=s.seed,
    )
    args = sft_config(s, dtype, Path(s.out) / "arms" / arm, **spec.settings)
    return SFTTrainer(model=model, args=args, train_dataset=quote_dataset(records, tokenizer.eos_token),
                      processing_class=tokenizer, callbacks=[timer])


def build_pkg(arm: str, s, records: list[dict], recorder, timer):
    """The package's own path, called as its training recipe calls it, at the TrainConfig
    defaults but for the arm's settings. Evaluation is pushed past the last step so that it
    never runs inside the timed steps."""
    import torch
    from datasets import Dataset, DatasetDict

    from gemma_qlora.config import TrainConfig, from_file
    from gemma_qlora.lora import attach_lora
    from gemma_qlora.model import load_model
    from gemma_qlora.quant import detect_precision
    from gemma_qlora.trainer import make_trainer

    max_steps = s.warmup + s.steps + s.profile
    settings = dict(ARMS[arm].settings)
    budget = settings.pop("activation_memory_budget", None)
    liger = settings.pop("liger", None)
    reentrant = settings.pop("reentrant", False)
    if settings.pop("keep_cache", False):
        import trl.models.activation_offloading as offloading

        enter = offloading.OffloadActivations.__enter__

        def enter_keeping_cache(self):
            empty_cache, torch.cuda.empty_cache = torch.cuda.empty_cache, lambda: None
            try:
                return enter(self)
            finally:
                torch.cuda.empty_cache = empty_cache

        offloading.OffloadActivations.__enter__ = enter_keeping_cache
    if liger:
        settings["liger_kernel"] = False  # the package's three off; the arm's one applied below
    if budget is not None:
        # AOTAutograd's partitioner: below 1, compiled graphs save less for the backward and recompute more
        import torch._functorch.config

        torch._functorch.config.activation_memory_budget = budget
    cfg = from_file(  # what every arm shares (batch, sequence, LoRA): the bench-8x512 preset
        TrainConfig, "bench-8x512",
        model=s.model_dir, bits=ARMS[arm].bits, steps=max_steps, logging_steps=1, eval_steps=max_steps + 1, seed=s.seed,
        force_fp16=s.fp16, gpu_memory_gib=s.gpu_memory_gib, output_dir=str(Path(s.out) / "arms"), run_name=arm,
        **settings,
    )
    precision = detect_precision(force_fp16=cfg.force_fp16)
    with recorder.phase("load"):
        model, tokenizer = load_model(cfg, precision)
    if liger:
        # one Liger kernel at a time on this model instance; the logits stay (TRL's entropy and
        # accuracy need them), so fused linear cross-entropy is not among these arms
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        kernels = dict(rope=False, rms_norm=False, geglu=False, cross_entropy=False, fused_linear_cross_entropy=False)
        _apply_liger_kernel_to_instance(model=model, **{**kernels, **liger})
    model = attach_lora(model, cfg)
    # all quotes train, as in the other arms; the held-out split make_trainer wants is never evaluated
    quotes = DatasetDict(train=Dataset.from_list(records), test=Dataset.from_list(records[: cfg.batch_size]))
    trainer = make_trainer(cfg, model, tokenizer, quotes, precision=precision, output_dir=Path(s.out) / "arms" / arm,
                           callbacks=[timer])
    if reentrant:  # torch's reentrant checkpoint (one autograd function a layer, no saved-tensor hooks)
        trainer.args.activation_checkpointing_kwargs = {"use_reentrant": True}
    return trainer


BUILDERS = {"plain": build_plain, "trl": build_trl, "unsloth": build_unsloth, "pkg": build_pkg}


def describe(arm: str, trainer) -> dict:
    """What the table says about an arm's recipe, read off the trainer it built."""
    args, model, spec = trainer.args, trainer.model, ARMS[arm]
    if not args.packing:
        layout = "unpacked"
    elif args.packing_strategy == "wrapped":
        layout = "wrapped"
    else:
        layout = "rows" if type(trainer.data_collator).__name__ == "RowCollator" else "flat"
    dropout = next((m.p for name, m in model.named_modules() if name.endswith("lora_dropout.default") and hasattr(m, "p")), 0.0)
    if spec.bits == 16:
        preparation = "none (16-bit)"
    elif spec.family == "pkg":
        preparation = "gemma_qlora lean (no fp32 copy)" if spec.settings.get("lean_prepare", True) else "prepare_model_for_kbit_training"
    else:
        preparation = {"plain": "prepare_model_for_kbit_training", "trl": "none (TRL with peft_config)", "unsloth": "unsloth"}[spec.family]
    return {
        "what": spec.what,
        "packing_layout": layout,
        "lora_dropout": dropout,
        "kbit_preparation": preparation,
        "gradient_checkpointing": "unsloth (offloaded)" if spec.family == "unsloth" else args.gradient_checkpointing,
        "compiled": bool(spec.settings.get("torch_compile")),
        "fused_lora": any(hasattr(m, "_peft_forward") for m in model.modules()),
    }
