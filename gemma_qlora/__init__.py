"""Fine-tune Google's Gemma with QLoRA in 4-bit NF4 or 8-bit, and measure what each costs.

Modules, each small and named for what it holds:
    config    the settings, one dataclass per concern, and settings files (presets/)
    train     the recipe as named steps (Run.load ... Run.save) that train() and the notebooks call
    quant     the quantization methods (bitsandbytes NF4, FP4, LLM.int8, none) and dtypes per hardware
    model     loading Gemma and its tokenizer (token handling, clear errors)
    lora      PEFT adapters; fused_lora: their projections as one autograd function per group
    data      reading --data; formats: quote, text, prompt/completion and chat, split and encoded
    packing   packed batches kept as rows (examples never attend to each other)
    trainer   TRL's SFTTrainer configured from a TrainConfig
    rundir    the run folder: names, locks, atomic writes, checkpoints, what --overwrite may remove
    memory    NVML / RSS recorder; metrics: versions, timing, losses, speed
    evaluate  generation, author accuracy, quantization error
    compare   4-bit vs 8-bit vs 16-bit, each arm in its own process; plots
    plan/     a run's GPU memory predicted from config.json
    trained   a trained run loaded back (generate, export); chat: streaming generation
    export/   merged or GGUF export, verified
    fortunes, embedded, tiny   the embedded quotes and Gemma 3 270M; tiny models for tests and the bench
"""

import logging

__version__ = "0.1.0"


def _quiet_optional_kernel_fetch(record: logging.LogRecord) -> bool:
    """On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch an optional CPU kernel from
    the Hub through the `kernels` package (which transformers installs) and warns, in two log
    lines, wherever that cannot happen (offline, or the publisher not trusted). Nothing here uses
    that kernel, so the warnings would only break the one-line errors the commands promise."""
    message = record.getMessage()
    return not ("gemm_4bit_forward from kernels-community" in message or "publisher trust" in message)


for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub", "kernels"):
    logging.getLogger(_name).addFilter(_quiet_optional_kernel_fetch)
