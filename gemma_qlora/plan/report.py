"""The plan printed: its table (plain or Markdown), the verdict for each GPU, and the
`python -m gemma_qlora plan` command."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from gemma_qlora.config import BatchSettings, HardwareSettings, LoraSettings, ModelSettings, QuantSettings, SequenceSettings
from gemma_qlora.errors import UserError
from gemma_qlora.plan.estimate import Plan, build_plan, plan
from gemma_qlora.plan.gpus import GPUS
from gemma_qlora.plan.inputs import INPUT_NAMES


def headline(p: Plan) -> list[str]:
    i, s = p.inputs, p.inputs.shape
    bits = {4: f"4-bit {i.quant_type.upper()}" + (" + double quant" if i.double_quant else ""), 8: "8-bit LLM.int8", 16: "16-bit"}[i.bits]
    return [
        f"Memory plan: {s.name} ({s.model_type}, {s.parameters / 1e9:.2f}B parameters, vocab {s.vocab_size:,}), {bits}, "
        f"LoRA r={i.lora_r} on {len(i.lora_targets)} projections",
        f"micro-batch {i.batch_size} x {i.max_seq_length} tokens" + (" packed" if i.packing else " padded")
        + f", gradient checkpointing {'on' if i.gradient_checkpointing else 'off'}, {i.dtype}, {i.optim}",
    ]


def verdict_lines(p: Plan) -> list[str]:
    gpus = [p.gpu] if p.gpu else [g for g in GPUS.values()]
    lines = []
    for gpu in gpus:
        mine = p if p.gpu else build_plan(replace(p.inputs, dtype="float16" if not gpu.bf16 else p.inputs.dtype,
                                                   workspace_mib=gpu.workspace_mib), gpu=gpu)
        need, ok = mine.need_gib(gpu), mine.fits(gpu)
        largest = mine.largest_micro_batch(gpu)
        lines.append(f"{gpu.name} ({gpu.total_gib:g} GiB): {'fits' if ok else 'does NOT fit'} "
                     f"(needs {need:.1f} GiB with a 10 % margin); largest micro-batch at {p.inputs.max_seq_length} tokens: "
                     f"{largest if largest else 'none'}")
    return lines


def format_table(p: Plan, *, markdown: bool = False) -> str:
    head = headline(p)
    if markdown:
        out = [f"**{head[0]}**  ", head[1], "", "| component | GiB | note |", "|---|--:|---|"]
        for name, gib, note in p.rows:
            bold = name.startswith(("after load", "peak"))
            cell = f"**{gib:.2f}**" if bold else f"{gib:.3f}"
            out.append(f"| {'**' + name + '**' if bold else name} | {cell} | {note} |")
        out += [""] + [f"- {line}" for line in verdict_lines(p)]
        return "\n".join(out)
    width = max(len(r[0]) for r in p.rows) + 2
    out = head + [""]
    for name, gib, note in p.rows:
        total = name.startswith(("after load", "peak"))
        out.append(f"{'  ' if not total else ''}{name:<{width - (0 if not total else -2)}}{gib:8.2f} GiB   {note}")
    out += [""] + verdict_lines(p)
    return "\n".join(out)


@dataclass
class PlanConfig(HardwareSettings, BatchSettings, LoraSettings, QuantSettings, SequenceSettings, ModelSettings):
    """Flags of `python -m gemma_qlora plan`: train's own groups for the model, quantization,
    LoRA, sequence, batch and hardware (so they are the same flags with the same defaults and
    checks), plus the GPU to plan for."""

    gpu: str | None = field(default=None, metadata={"help": f"{', '.join(GPUS)}, a device name as nvidia-smi shows it, or the GPU's memory in GiB; default: every one listed (or --gpu_memory_gib)."})
    dtype: str = field(default="auto", metadata={"help": "Compute dtype: auto (bfloat16, float16 on a T4 or with --force_fp16), bfloat16, float16."})
    markdown: bool = field(default=False, metadata={"help": "Print the table as Markdown."})

    def settings(self) -> dict:
        """The settings the arithmetic takes (`PlanInputs`' fields), by name."""
        out = {name: getattr(self, name) for name in INPUT_NAMES if hasattr(self, name)}
        out["lora_targets"] = tuple(self.lora_targets)
        if self.force_fp16 and self.dtype == "auto":
            out["dtype"] = "float16"
        return out


def run_plan(cfg: PlanConfig) -> str:
    """The printed plan of `python -m gemma_qlora plan`."""
    if cfg.attn_implementation not in (None, "sdpa", "eager"):
        raise UserError(f"--attn_implementation must be sdpa or eager, not {cfg.attn_implementation!r}.")
    gpu = cfg.gpu if cfg.gpu is not None or cfg.gpu_memory_gib is None else cfg.gpu_memory_gib
    return plan(cfg.model, gpu=gpu, **cfg.settings()).table(markdown=cfg.markdown)
