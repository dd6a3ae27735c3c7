"""What `python -m gemma_qlora export` takes, and the limits each exported file is held to."""

from __future__ import annotations

from dataclasses import dataclass, field

from gemma_qlora.errors import UserError


INTO = ("merged", "gguf")

BASES = ("dequantized", "original")

GGUF_TYPES = ("f16", "q8_0")

SAVE_DTYPES = ("auto", "bfloat16", "float16", "float32")

GGUF_ARCHS = {"gemma2": "gemma2", "gemma3_text": "gemma3"}  # the ones transformers' GGUF loader reads back

EXPORT_RECORD = "export.json"

REFERENCE_NAMES = {False: "the adapter model", True: "the adapter on the dequantized weights"}  # by `dequantized`

# How far each export's held-out loss may RISE above the reference's, as a fraction: the one
# place the limits live (the --max_loss_drift* flags default to them, docs/export.md quotes them).
# A fall is never a failure: the exported model predicts the held-out split better, and the loss
# it shows is recorded either way. Each file is judged on its own.
MAX_LOSS_RISE = {
    "merged": 0.005,  # the trained weights in bf16 or fp32: only the save dtype's rounding
    "f16": 0.005,  # the same in fp16
    "q8_0": 0.01,  # every weight rounded again, to 8-bit blocks of 32
}

# added to the type's limit when a 4-/8-bit run is merged into the original 16-bit weights: a
# model the adapter never saw, better or worse by how much quantization error training absorbed
ORIGINAL_BASE_ALLOWANCE = 0.05

# `--save_dtype auto` saves bf16 when at least this share of the adapted weights still differs
# from the base's after rounding to bf16, and fp32 otherwise (see `choose_save_dtype`)
BF16_MIN_SURVIVING = 0.9

@dataclass
class ExportConfig:
    run: str = field(metadata={"help": "Run folder written by `train` (holds metrics.json and adapter/)."})
    into: str = field(
        default="merged", metadata={"help": "merged (safetensors checkpoint) or gguf (F16 and Q8_0 files).", "choices": INTO}
    )
    base: str = field(
        default="dequantized",
        metadata={"help": "Merge into the 4-/8-bit weights the adapter trained on, dequantized (dequantized), or into the "
                  "original 16-bit checkpoint (original). 16-bit runs have only the original.", "choices": BASES},
    )
    out: str | None = field(default=None, metadata={"help": "Output folder; default <run>/<into>."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})
    gguf_types: list[str] = field(
        default_factory=lambda: list(GGUF_TYPES), metadata={"help": "GGUF files to write.", "choices": GGUF_TYPES}
    )
    save_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the merged checkpoint; auto: bfloat16 where at least 90%% of the adapter's updates "
                  "survive bf16 rounding, else float32 (export.json says which and why).", "choices": SAVE_DTYPES},
    )
    max_loss_drift: float = field(
        default=MAX_LOSS_RISE["merged"],
        metadata={"help": "Largest relative rise of held-out loss allowed for a merged checkpoint or a GGUF F16 "
                  "(0.005 = 0.5%%); a fall is never a failure."},
    )
    max_loss_drift_q8_0: float = field(
        default=MAX_LOSS_RISE["q8_0"], metadata={"help": "The same for a GGUF Q8_0, which rounds every weight to 8 bits."}
    )
    max_loss_drift_original: float = field(
        default=ORIGINAL_BASE_ALLOWANCE,
        metadata={"help": "Added to those limits when a 4-/8-bit run is merged into the original weights, a model the "
                  "adapter never saw."},
    )
    agreement_prompts: int = field(
        default=8, metadata={"help": "Held-out examples whose greedy continuations are compared (for quotes, besides the run's prompts)."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.gguf_types, str):
            self.gguf_types = [t for t in self.gguf_types.split(",") if t]
        self.gguf_types = [t.lower() for t in self.gguf_types]
        problems = []
        if self.into not in INTO:
            problems.append(f"--into must be one of {', '.join(INTO)}, not {self.into!r}")
        if self.base not in BASES:
            problems.append(f"--base must be one of {', '.join(BASES)}, not {self.base!r}")
        bad = [t for t in self.gguf_types if t not in GGUF_TYPES]
        if bad or not self.gguf_types:
            problems.append(f"--gguf_types must name one or more of {', '.join(GGUF_TYPES)}, not {' '.join(bad) or 'nothing'}")
        if self.save_dtype not in SAVE_DTYPES:
            problems.append(f"--save_dtype must be auto, bfloat16, float16 or float32, not {self.save_dtype!r}")
        for name in ("max_loss_drift", "max_loss_drift_q8_0", "max_loss_drift_original"):
            if not getattr(self, name) > 0:
                problems.append(f"--{name} must be a positive fraction, not {getattr(self, name)}")
        if problems:
            raise UserError("; ".join(problems) + ".")
