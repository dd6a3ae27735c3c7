"""Fine-tune Google's Gemma with QLoRA in 4-bit NF4 or 8-bit, and measure what each costs.

Modules, each small and named for what it holds:
    config    TrainConfig, the settings of one run (also the command line's flags)
    train     the recipe as named steps (Run.load ... Run.save) that train() and the notebooks call
    quant     BitsAndBytesConfig and dtypes per hardware
    model     loading Gemma and its tokenizer (token handling, clear errors)
    lora      PEFT adapters
    data      the data, split; formats: text, prompt/completion and chat, with their loss masks
    packing   packed batches kept as rows (examples never attend to each other)
    trainer   TRL's SFTTrainer configured from a TrainConfig
    rundir    the run folder: names, locks, atomic writes, checkpoints
    memory    NVML / RSS recorder; metrics: versions, timing, losses, speed
    evaluate  generation, author accuracy, quantization error
    compare   4-bit vs 8-bit vs 16-bit, each arm in its own process; plots
    plan      a run's GPU memory predicted from config.json
    export    merged or GGUF export, verified; chat: streaming generation
    fortunes, embedded, tiny   the embedded quotes and Gemma 3 270M; tiny models for tests
"""

__version__ = "0.1.0"
