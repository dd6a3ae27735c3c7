"""The report: bench.json, the Markdown table bench.md, and the speed and memory plots."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from arms import BAR, PACKING, PLAIN


def add_ratios(arms: list[dict]) -> None:
    """Tokens/s and allocator peak of each arm over the bar of its bits (the first arm of BAR that
    ran), and tokens/s over the old notebook recipe at the same batch shape (PLAIN)."""
    by_name = {a["arm"]: a for a in arms if a["status"] == "ok"}
    for a in arms:
        for label, refs in (("bar", BAR), ("plain", PLAIN)):
            ref_name = next((name for name in refs[a["bits"]] if name in by_name), None)
            ref = by_name.get(ref_name)
            a[f"{label}_arm"] = ref_name
            for key in ("tokens_per_second", "tokens_per_second_median", "allocated_peak_gib"):
                ok = a["status"] == "ok" and ref is not None and a.get(key) and ref.get(key)
                a[f"{key}_vs_{label}"] = a[key] / ref[key] if ok else None


def summarise_environment(report: dict) -> None:
    """The GPU and the library versions most arms ran with; the arms that ran with others (Unsloth's
    need the transformers and TRL it allows) are named with what differs."""
    ok = [a for a in report["arms"] if a["status"] == "ok"]
    env = report["environment"]
    for key in ("gpu", "gpu_total_gib", "compute_capability", "cuda"):
        env[key] = next((a.get(key) for a in ok if a.get("gpu")), None)
    runs = [a for a in report["arms"] if a.get("versions")]
    common = Counter(json.dumps(a["versions"], sort_keys=True) for a in runs if a["family"] != "unsloth").most_common(1)
    base = json.loads(common[0][0]) if common else (runs[0]["versions"] if runs else {})
    env["versions"] = base
    env["other_versions"] = {}
    for a in runs:
        differ = {lib: v for lib, v in a["versions"].items() if base.get(lib) != v}
        if differ:
            env["other_versions"][a["arm"]] = differ


def write_report(report: dict, out: Path) -> str:
    """bench.json and bench.md, rewritten after every arm so an interrupted run keeps its results."""
    add_ratios(report["arms"])
    summarise_environment(report)
    text = markdown(report)
    for name, content in (("bench.json", json.dumps(report, indent=2, default=str)), ("bench.md", text)):
        tmp = out / (name + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, out / name)
    return text


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def describe_model(m: dict) -> str:
    if not m["random_weights"]:
        return f"checkpoint `{m['path']}` (real weights)"
    f = m["fields"]
    return (f"`{m['shape']}` shape, **random weights** ({m['config_class']} hidden {f['hidden_size']}, "
            f"intermediate {f['intermediate_size']}, {f['num_hidden_layers']} layers, {f['num_attention_heads']} heads / "
            f"{f['num_key_value_heads']} KV, vocab {f['vocab_size']:,}; {m['parameters'] / 1e6:,.{0 if m['parameters'] >= 1e7 else 2}f}M parameters; "
            f"bf16 safetensors loaded with from_pretrained; BPE tokenizer of {m['tokenizer_vocab']:,} trained on the quotes)")


def batch_shape(a: dict) -> str:
    if not a.get("batch_size"):
        return ""
    if a["grad_accum"] > 1:
        return f"{a['batch_size']} x{a['grad_accum']} accum"
    return f"{a['batch_size']}x{a['max_length']}"


def markdown(report: dict) -> str:
    s, env = report["settings"], report["environment"]
    if env["gpu"]:
        device = f"{env['gpu']} ({env['gpu_total_gib']:.0f} GiB)"
        if s["gpu_memory_gib"]:
            device += f", capped at {s['gpu_memory_gib']:g} GiB per process"
    else:
        device = "CPU, no CUDA: GPU memory columns n/a, 8-bit optimizers replaced by adamw_torch"
    if s.get("cpus"):
        device += f"; each arm's process pinned to CPUs {s['cpus']}"
    dtypes = sorted({a["precision"] for a in report["arms"] if a.get("precision")})
    examples = next((a["epoch_examples"] for a in report["arms"] if a.get("epoch_examples")), None)
    lines = [
        "# Gemma QLoRA benchmark: gemma_qlora against what users pick instead",
        "",
        f"- model: {describe_model(report['model'])}",
        f"- device: {device}; compute {', '.join(dtypes) or 'n/a'}" + (" (--fp16)" if s["fp16"] else ""),
        f"- data: {fmt(examples, ',')} fortunes quotes as `Quote: ...\\nAuthor: ...<eos>`; "
        f"{s['warmup']} warm-up + {s['steps']} timed optimizer steps per arm; each arm in its own process, in the order shown",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f", python {env['python']}",
    ]
    for arm, differ in env.get("other_versions", {}).items():
        lines.append(f"  - {arm}: " + ", ".join(f"{k} {v}" for k, v in differ.items()))
    lines += [
        "",
        "| arm | what | packing | batch | LoRA dropout | alloc peak GiB | NVML peak GiB | tokens/s (window) "
        "| tokens/s (median step) | step s median | step s p90 | slow steps | epoch | final loss | window ÷ bar "
        "| median ÷ bar | peak ÷ bar | tok/s ÷ plain | warm-up s | load s | import s |",
        "|" + "---|" * 21,
    ]
    notes, slow = [], []
    for a in report["arms"]:
        speed = fmt(a.get("tokens_per_second"), ",.0f") if a["status"] == "ok" else f"**{a['status']}**"
        n_slow = a.get("slow_steps")
        slow_cell = "n/a" if n_slow is None else f"{n_slow} (+{a.get('slow_steps_extra_seconds', 0):.2f} s)"
        lines.append("| " + " | ".join([
            a["arm"], a.get("what", ""), PACKING.get(a.get("packing_layout"), ""), batch_shape(a), fmt(a.get("lora_dropout"), "g"),
            fmt(a.get("allocated_peak_gib")), fmt(a.get("nvml_peak_gib")), speed, fmt(a.get("tokens_per_second_median"), ",.0f"),
            fmt(a.get("step_seconds_median"), ".3f"), fmt(a.get("step_seconds_p90"), ".3f"), slow_cell,
            duration(a.get("epoch_seconds")), fmt(a.get("final_loss"), ".3f"),
            fmt(a.get("tokens_per_second_vs_bar"), ".2f", "×"), fmt(a.get("tokens_per_second_median_vs_bar"), ".2f", "×"),
            fmt(a.get("allocated_peak_gib_vs_bar"), ".2f", "×"),
            fmt(a.get("tokens_per_second_vs_plain"), ".2f", "×"), fmt(a.get("warmup_seconds"), ".1f"),
            fmt(a.get("load_seconds"), ".1f"), fmt(a.get("import_seconds"), ".1f"),
        ]) + " |")
        if a["status"] != "ok":
            notes.append(f"- {a['arm']}: {a['status']}: {a.get('error', '')}")
        if a.get("slowest_steps"):
            slow.append(f"- {a['arm']} (median {a['step_seconds_median']:.3f} s, {a.get('steps_per_epoch', '?')} steps an epoch): "
                        + "; ".join(slow_step(row) for row in a["slowest_steps"]))
    bars = sorted({f"{a['bar_arm']} for {a['bits']}-bit" for a in report["arms"] if a.get("bar_arm")})
    lines += [
        "",
        "tokens/s (window): non-pad tokens of the batches the trainer drew, from the end of the last warm-up step to the end of "
        "the timed steps, slow steps included; tokens/s (median step): the median step's tokens over the median step's "
        "seconds, the steady pace; p90: the 90th percentile step; slow steps: steps over twice the median, and the "
        "seconds they took beyond it (listed below with what each held); epoch: the training tokens of one pass over the "
        "quotes divided by tokens/s; final loss: mean of the last 5 logged losses (wrapped rows train on other targets "
        "than kept-apart examples, so their losses differ). warm-up s: seconds from the start of training to the end "
        "of the warm-up steps, one-off costs such as compilation included. alloc peak: torch allocator peak over training; NVML: device "
        "memory in use (what nvidia-smi shows: CUDA context and allocator cache included). "
        f"bar: {', '.join(bars) or 'none ran'}; plain: the old notebook recipe at the same batch shape "
        "(plain-4bit for 4- and 16-bit, plain-8bit for 8-bit), a reference, not the bar.",
    ]
    if slow:
        lines += ["", "Slowest timed steps (step: seconds, non-pad tokens, epoch at its end, garbage-collector seconds, "
                  "torch.compile frames compiled in it):", "", *slow]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def slow_step(row: dict) -> str:
    """One slow step for the list under the table."""
    text = f"step {row['step']}: {row['seconds']:.3f} s, {row.get('tokens', 0):,} tokens"
    if "epoch" in row:
        text += f", epoch {row['epoch']:.2f}"
    if row.get("gc_seconds"):
        text += f", gc {row['gc_seconds']:.3f} s"
    if row.get("compiled_frames"):
        text += f", {row['compiled_frames']} frames compiled"
    return text


def save_plots(report: dict, out: Path) -> None:
    """bench_speed.png (tokens/s per arm) and bench_memory.png (allocator and NVML peaks per arm),
    titled with the GPU, the model and the library versions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in report["arms"] if a["status"] == "ok"]
    if not arms:
        return
    env, model = report["environment"], report["model"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k in ("torch", "transformers", "peft", "trl", "bitsandbytes"))
    weights = "random weights" if model["random_weights"] else "real weights"
    title = f"{model['shape']} shape ({weights}) on {env['gpu'] or 'CPU'}" + (" (--fp16)" if report["settings"]["fp16"] else "")
    names = [a["arm"] for a in arms]
    palette = {"plain": "#999999", "trl": "#6a994e", "unsloth": "#b5651d", "pkg": "#1f4e79"}
    colors = [palette.get(a.get("family"), "#444444") for a in arms]
    hatches = ["//" if a.get("packing_layout") == "wrapped" else "" for a in arms]

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(arms) + 2), 4.8))
    bars = ax.bar(names, [a["tokens_per_second"] for a in arms], color=colors, hatch=hatches, edgecolor="white")
    ax.bar_label(bars, labels=[f"{a['tokens_per_second']:,.0f}" for a in arms], fontsize=8)
    ax.set_ylabel("training tokens/s (non-pad)")
    ax.set_title(f"Speed: {title}\n{versions}\nhatched: wrapped rows (examples attend to each other)", fontsize=9)
    ax.tick_params(axis="x", rotation=35, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench_speed.png", dpi=120)
    plt.close(fig)

    if arms[0].get("allocated_peak_gib") is None:
        return  # CPU: no GPU memory to draw
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(arms) + 2), 4.5))
    x = range(len(arms))
    for offset, key, label, color in ((-0.2, "allocated_peak_gib", "allocator peak", "#1f4e79"), (0.2, "nvml_peak_gib", "NVML peak", "#9dc3e6")):
        values = [a.get(key) or 0 for a in arms]
        bars = ax.bar([i + offset for i in x], values, width=0.4, label=label, color=color)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
    ax.set_xticks(list(x), names, rotation=35, fontsize=8)
    ax.set_ylabel("GPU memory while training, GiB")
    ax.set_title(f"Memory: {title}\n{versions}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench_memory.png", dpi=120)
    plt.close(fig)
