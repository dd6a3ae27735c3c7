"""Benchmark: plain Hugging Face QLoRA (as the old notebooks wrote it) vs the gemma_qlora package.

One command, one GPU. Every arm trains in its own process (this script re-run with
`--worker ARM`), one after the other, on the same data and the same model folder, so
that no arm inherits another's CUDA context, allocator cache or library patches. The
parent process never touches CUDA. It collects each arm's JSON and writes

    <out>/bench.json   settings, environment, model, every arm's figures and ratios
    <out>/bench.md     the same as one Markdown table (also printed)
    <out>/arms/        each arm's result JSON and log

Arms:
    plain-4bit-old, plain-8bit-old   plain HF exactly as an old notebook: batch 1 x grad accum 4,
                                     unpacked, paged_adamw_8bit
    plain-4bit, plain-8bit           the same plain code at micro-batch 8 x 512 packed, adamw_8bit
    pkg-4bit, pkg-8bit, pkg-16bit    gemma_qlora load_model + attach_lora + make_trainer at the
                                     package's defaults (TrainConfig: 8 x 512 packed, fused AdamW)
    unsloth-4bit                     optional: only where `import unsloth` works
    pkg-4bit-<lever>                 the ablation, only when named: pkg-4bit with one setting changed
                                     (LEVERS below: PEFT's preparation, no checkpointing, unpacked,
                                     no LoRA dropout, Liger kernels, torch.compile, 16 x 512,
                                     paged 8-bit AdamW); pkg-8bit-compile, pkg-8bit compiled

With --profile N, each arm runs N more steps under torch.profiler after the timed ones (they do
not count in the speed figures) and writes <out>/arms/<arm>.profile.txt: the GPU's busy share of
those steps and the kernels that took the time.

Usage:
    python bench/bench.py                                  # Gemma-2B shape, random weights, all arms
    python bench/bench.py --shape 270m --arms plain-4bit,pkg-4bit
    python bench/bench.py --shape /models/gemma-2b         # a real checkpoint folder
    python bench/bench.py --fp16 --gpu-memory-gib 15       # T4 emulation on a bigger GPU
    python bench/bench.py --shape tiny --steps 3 --warmup 1  # CPU smoke test
    python bench/bench.py --arms plain-4bit,pkg-4bit --profile 3  # where the time goes
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before any import, so a worker can time its imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from importlib.metadata import PackageNotFoundError, version  # noqa: E402
from importlib.util import find_spec  # noqa: E402
from pathlib import Path  # noqa: E402

# arm -> weight bits. Ratios compare each arm with the plain arm of its family (16-bit is set
# against 4-bit, the setting it would replace) at the same batch shape ("ref") and at the old
# notebook's batch shape ("old").
ARMS = {
    "plain-4bit-old": 4,
    "plain-8bit-old": 8,
    "plain-4bit": 4,
    "plain-8bit": 8,
    "pkg-4bit": 4,
    "pkg-8bit": 8,
    "pkg-16bit": 16,
    "unsloth-4bit": 4,
}
# The ablation: the package's 4-bit (or 8-bit) arm with one setting changed (TrainConfig fields). Run
# only when named in --arms (e.g. --arms plain-4bit,pkg-4bit,pkg-4bit-peft-prepare,pkg-4bit-liger).
LEVERS = {
    "pkg-4bit-peft-prepare": {"lean_prepare": False},  # PEFT's prepare_model_for_kbit_training (fp32 copy)
    "pkg-4bit-no-checkpointing": {"gradient_checkpointing": False},
    "pkg-4bit-unpacked": {"packing": False},  # padded batches of 8 quotes instead of 8 x 512 packed
    "pkg-4bit-no-dropout": {"lora_dropout": 0.0},  # PEFT then skips the dropout copy of each LoRA input
    "pkg-4bit-liger": {"liger_kernel": True},  # Liger's RMSNorm, GeGLU and RoPE kernels
    "pkg-4bit-compile": {"torch_compile": True},
    "pkg-4bit-16x512": {"batch_size": 16},  # micro-batch sizing: twice the tokens per step
    "pkg-4bit-paged-adamw": {"optim": "paged_adamw_8bit"},  # the old default: bitsandbytes' paged 8-bit AdamW
    "pkg-8bit-compile": {"torch_compile": True},
}
ARMS.update({arm: int(arm.split("-")[1].removesuffix("bit")) for arm in LEVERS})
DEFAULT_ARMS = ",".join(arm for arm in ARMS if arm not in LEVERS)
REF = {4: "plain-4bit", 8: "plain-8bit", 16: "plain-4bit"}
OLD = {4: "plain-4bit-old", 8: "plain-8bit-old", 16: "plain-4bit-old"}

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "unsloth")
GIB = 1024**3

# Random-weight model shapes: (config class, fields). "tokenizer" as vocab means the tokenizer's size.
SHAPES = {
    "2b": ("GemmaConfig", dict(  # google/gemma-2b
        hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
        num_key_value_heads=1, head_dim=256, vocab_size=256000, max_position_embeddings=8192)),
    "270m": ("Gemma3TextConfig", dict(  # google/gemma-3-270m
        hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512,
        max_position_embeddings=32768)),
    "tiny": ("GemmaConfig", dict(  # CPU tests; one head, as attention over a packed 4096-token row is what costs there
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        num_key_value_heads=1, head_dim=16, vocab_size="tokenizer", max_position_embeddings=1024)),
}
TOKENIZER_VOCAB = 8000  # byte-level BPE on the quotes: about 3.7 characters a token (Gemma's: about 4 on English)


@dataclass
class Settings:
    shape: str = "2b"  # 2b | 270m | tiny | a checkpoint folder
    arms: str = DEFAULT_ARMS
    warmup: int = 5  # optimizer steps left out of the speed figures
    steps: int = 30  # timed optimizer steps after the warm-up
    out: str = "results/bench"
    fp16: bool = False  # fp16 compute even where bf16 works (T4 emulation)
    gpu_memory_gib: float | None = None  # per-process GPU memory cap (T4 emulation: 15)
    cache: str = "~/.cache/gemma_qlora_bench"  # where random-weight models are built once
    seed: int = 42
    timeout: int = 1800  # seconds one arm may take before it is killed and marked so
    profile: int = 0  # steps profiled after the timed ones (0: none)
    replot: bool = False  # only redraw the plots of <out>/bench.json
    worker: str | None = None  # internal: run this one arm in this process
    model_dir: str | None = None  # internal: the model folder the parent prepared


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("Usage:")[1])
    p.add_argument("--shape", default=Settings.shape, help="2b (Gemma-2B), 270m (Gemma 3 270M), tiny (CPU tests), or a checkpoint folder")
    p.add_argument("--arms", default=Settings.arms, help=f"comma list, default: {Settings.arms}; ablation: {', '.join(LEVERS)}")
    p.add_argument("--warmup", type=int, default=Settings.warmup, help="warm-up optimizer steps, not timed")
    p.add_argument("--steps", type=int, default=Settings.steps, help="timed optimizer steps after the warm-up")
    p.add_argument("--out", default=Settings.out, help="folder for bench.json, bench.md and the arms' logs")
    p.add_argument("--fp16", action="store_true", help="fp16 compute even where bf16 works (T4 emulation)")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="cap each arm's GPU memory (T4 emulation: 15)")
    p.add_argument("--cache", default=Settings.cache, help="folder for the random-weight models, built once per shape")
    p.add_argument("--seed", type=int, default=Settings.seed)
    p.add_argument("--timeout", type=int, default=Settings.timeout, help="seconds one arm may run")
    p.add_argument("--profile", type=int, default=0, help="steps to profile after the timed ones (0: none)")
    p.add_argument("--replot", action="store_true", help="only redraw the plots from <out>/bench.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    s = Settings(**vars(p.parse_args(argv)))
    unknown = [a for a in arm_list(s) if a not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}: choose from {', '.join(ARMS)}")
    if s.shape not in SHAPES and s.shape.startswith((".", "/", "~")) and not Path(s.shape).expanduser().is_dir():
        p.error(f"--shape {s.shape}: no such folder (give 2b, 270m, tiny or a checkpoint folder)")
    if s.warmup < 1 or s.steps < 1:
        p.error("--warmup and --steps must be at least 1 (the clock starts at the end of the last warm-up step)")
    return s


def arm_list(s: Settings) -> list[str]:
    return [a.strip() for a in s.arms.split(",") if a.strip()]


# ---------------------------------------------------------------------------------------------
# The parent: model folder, one process per arm, the report.
# ---------------------------------------------------------------------------------------------


def build_tokenizer(texts: list[str]):
    """There is no Hub here: a byte-level BPE trained on the quotes, with Gemma's special tokens
    at Gemma's ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3). The model's vocabulary is the shape's;
    ids above the tokenizer's are simply never used, as most of a real vocabulary is not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def prepare_model(s: Settings) -> tuple[str, dict]:
    """The folder every arm loads with from_pretrained, and what the report says about it.

    A random-weight shape is built once (seeded, bf16 safetensors, with its tokenizer) and
    cached, so the arms' load time is a real from_pretrained of a real-sized checkpoint.
    """
    if s.shape not in SHAPES:
        path = Path(s.shape).expanduser()
        info = {"shape": s.shape, "random_weights": False, "path": str(path)}
        if (path / "config.json").is_file():
            info["config"] = json.loads((path / "config.json").read_text())
        return str(path), info

    config_class, fields = SHAPES[s.shape]
    folder = Path(s.cache).expanduser() / f"{s.shape}-seed{s.seed}"
    marker = {"shape": s.shape, "config_class": config_class, "fields": fields, "seed": s.seed, "tokenizer_vocab": TOKENIZER_VOCAB}
    marker_file = folder / "bench-shape.json"
    if marker_file.is_file() and json.loads(marker_file.read_text()).get("marker") == marker:
        saved = json.loads(marker_file.read_text())
        log(f"model: cached {s.shape} shape with random weights in {folder}")
        return str(folder), saved["info"]

    import shutil

    import torch
    import transformers

    from gemma_qlora.data import format_quote
    from gemma_qlora.fortunes import load_fortunes

    log(f"model: building the {s.shape} shape with random weights in {folder} (once; cached) ...")
    t0 = time.perf_counter()
    tokenizer = build_tokenizer([format_quote(r["quote"], r["author"]) for r in load_fortunes()])
    fields = dict(fields, vocab_size=len(tokenizer) if fields["vocab_size"] == "tokenizer" else fields["vocab_size"])
    config = getattr(transformers, config_class)(**fields, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(s.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    info = {
        "shape": s.shape,
        "random_weights": True,
        "path": str(folder),
        "config_class": config_class,
        "fields": fields,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_vocab": len(tokenizer),
    }
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "bench-shape.json").write_text(json.dumps({"marker": marker, "info": info}, indent=2))
    del model
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    log(f"model: {info['parameters'] / 1e6:,.0f}M parameters built and saved in {time.perf_counter() - t0:.0f} s")
    return str(folder), info


def read_checkpoint(model_dir: str) -> None:
    """Read the weight files once, unmeasured, so that every arm loads from the page cache (not
    only the arms after the first)."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(64 * 2**20):
                pass


def nvml_used_gib() -> float | None:
    """GPU memory in use before an arm starts (other processes, leftovers), read through NVML
    so that the parent never creates a CUDA context of its own. None without a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(first) if first.isdigit() else 0)
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / GIB
    except Exception:  # no driver, no GPU, no nvidia-ml-py
        return None


def run_arm(arm: str, s: Settings, model_dir: str, random_weights: bool) -> dict:
    """Train one arm in a fresh process; its figures come back as JSON in <out>/arms/<arm>.json."""
    arms_dir = Path(s.out) / "arms"
    result_file, log_file = arms_dir / f"{arm}.json", arms_dir / f"{arm}.log"
    result_file.unlink(missing_ok=True)
    if arm == "unsloth-4bit" and find_spec("unsloth") is None:
        return {"arm": arm, "bits": ARMS[arm], "status": "skipped", "error": "unsloth is not installed"}

    cmd = [sys.executable, os.path.abspath(__file__), "--worker", arm, "--model-dir", model_dir, "--out", s.out,
           "--warmup", str(s.warmup), "--steps", str(s.steps), "--seed", str(s.seed), "--profile", str(s.profile)]
    if s.fp16:
        cmd.append("--fp16")
    if s.gpu_memory_gib:
        cmd += ["--gpu-memory-gib", str(s.gpu_memory_gib)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if random_weights:
        env["HF_HUB_OFFLINE"] = "1"  # everything is local: no Hub calls in the timings

    nvml_before = nvml_used_gib()
    t0 = time.perf_counter()
    with open(log_file, "w") as log_stream:
        try:
            rc = subprocess.run(cmd, stdout=log_stream, stderr=subprocess.STDOUT, env=env, timeout=s.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = time.perf_counter() - t0

    result = json.loads(result_file.read_text()) if result_file.is_file() else {"arm": arm, "bits": ARMS[arm], "status": "failed"}
    if rc is None:
        result.update(status="timeout", error=f"killed after --timeout {s.timeout} s")
    elif rc != 0 and result["status"] == "ok":
        result["status"] = "failed"
    if result["status"] == "failed" and not result.get("error"):
        result["error"] = " | ".join(log_file.read_text(errors="replace").strip().splitlines()[-3:])
    result.update(process_seconds=seconds, nvml_before_gib=nvml_before, log=str(log_file))
    return result


def add_ratios(arms: list[dict]) -> None:
    """Tokens/s and allocator peak of each arm over its reference arms (see REF and OLD)."""
    by_name = {a["arm"]: a for a in arms if a["status"] == "ok"}
    for a in arms:
        for label, refs in (("ref", REF), ("old", OLD)):
            ref = by_name.get(refs[a["bits"]])
            a[f"{label}_arm"] = refs[a["bits"]]
            for key in ("tokens_per_second", "allocated_peak_gib"):
                ok = a["status"] == "ok" and ref is not None and a.get(key) and ref.get(key)
                a[f"{key}_vs_{label}"] = a[key] / ref[key] if ok else None


def environment() -> dict:
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = version(lib)
        except PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def write_report(report: dict, out: Path) -> str:
    """bench.json and bench.md, rewritten after every arm so an interrupted run keeps its results."""
    add_ratios(report["arms"])
    ok = [a for a in report["arms"] if a["status"] == "ok"]
    report["environment"]["gpu"] = next((a.get("gpu") for a in ok if a.get("gpu")), None)
    for key in ("gpu_total_gib", "compute_capability", "cuda"):
        report["environment"][key] = next((a.get(key) for a in ok if a.get("gpu")), None)
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


def markdown(report: dict) -> str:
    s, m, env = report["settings"], report["model"], report["environment"]
    if m["random_weights"]:
        f = m["fields"]
        model = (f"`{m['shape']}` shape, **random weights** ({m['config_class']} hidden {f['hidden_size']}, "
                 f"intermediate {f['intermediate_size']}, {f['num_hidden_layers']} layers, {f['num_attention_heads']} heads / "
                 f"{f['num_key_value_heads']} KV, vocab {f['vocab_size']:,}; {m['parameters'] / 1e6:,.0f}M parameters; "
                 f"bf16 safetensors loaded with from_pretrained; BPE tokenizer of {m['tokenizer_vocab']:,} trained on the quotes)")
    else:
        model = f"checkpoint `{m['path']}` (real weights)"
    if env["gpu"]:
        device = f"{env['gpu']} ({env['gpu_total_gib']:.0f} GiB)"
        if s["gpu_memory_gib"]:
            device += f", capped at {s['gpu_memory_gib']:g} GiB per process"
    else:
        device = "CPU, no CUDA: GPU memory columns n/a, optimizer adamw_torch"
    dtypes = sorted({a["precision"] for a in report["arms"] if a.get("precision")})
    examples = next((a["epoch_examples"] for a in report["arms"] if a.get("epoch_examples")), None)
    lines = [
        "# Gemma QLoRA benchmark: plain Hugging Face vs gemma_qlora",
        "",
        f"- model: {model}",
        f"- device: {device}; compute {', '.join(dtypes) or 'n/a'}" + (" (--fp16)" if s["fp16"] else ""),
        f"- data: {fmt(examples, ',')} fortunes quotes as `Quote: ...\\nAuthor: ...<eos>`; "
        f"{s['warmup']} warm-up + {s['steps']} timed optimizer steps per arm; each arm in its own process, in the order shown",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f", python {env['python']}",
        "",
        "| arm | batch | import s | load s | NVML after load GiB | alloc after load GiB | alloc peak GiB | NVML peak GiB "
        "| tokens/s | step s | epoch | final loss | tok/s ÷ ref | peak ÷ ref | tok/s ÷ old | peak ÷ old |",
        "|" + "---|" * 16,
    ]
    notes = []
    for a in report["arms"]:
        if a.get("batch_size"):
            batch = (f"{a['batch_size']}×{a['max_length']} packed" if a["packing"]
                     else f"{a['batch_size']} ×{a['grad_accum']} accum, unpacked")
        else:
            batch = ""
        speed = fmt(a.get("tokens_per_second"), ",.0f") if a["status"] == "ok" else f"**{a['status']}**"
        lines.append("| " + " | ".join([
            a["arm"], batch, fmt(a.get("import_seconds"), ".1f"), fmt(a.get("load_seconds"), ".1f"),
            fmt(a.get("nvml_after_load_gib")), fmt(a.get("allocated_after_load_gib")),
            fmt(a.get("allocated_peak_gib")), fmt(a.get("nvml_peak_gib")),
            speed, fmt(a.get("step_seconds_median"), ".3f"), duration(a.get("epoch_seconds")), fmt(a.get("final_loss"), ".3f"),
            fmt(a.get("tokens_per_second_vs_ref"), ".2f", "×"), fmt(a.get("allocated_peak_gib_vs_ref"), ".2f", "×"),
            fmt(a.get("tokens_per_second_vs_old"), ".2f", "×"), fmt(a.get("allocated_peak_gib_vs_old"), ".2f", "×"),
        ]) + " |")
        if a["status"] != "ok":
            notes.append(f"- {a['arm']}: {a['status']}: {a.get('error', '')}")
    lines += [
        "",
        "tokens/s: non-pad tokens of the batches the trainer drew, from the end of the last warm-up step to the end of "
        "the run; step s: median seconds per optimizer step; epoch: the training tokens of one pass over the quotes "
        "divided by tokens/s; final loss: mean of the last 5 logged losses (not comparable across batch shapes). "
        "NVML: device memory in use (what nvidia-smi shows: CUDA context and allocator cache included); alloc: torch "
        "allocator (peak over training). ref: plain-4bit for 4- and 16-bit arms, plain-8bit for 8-bit arms (same batch "
        "shape, plain code); old: plain-4bit-old / plain-8bit-old (the old notebook's batch 1 × accum 4).",
    ]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


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
    colors = ["#999999" if n.startswith("plain") else "#1f4e79" if n.startswith("pkg") else "#b5651d" for n in names]

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(arms) + 2), 4.5))
    bars = ax.bar(names, [a["tokens_per_second"] for a in arms], color=colors)
    ax.bar_label(bars, labels=[f"{a['tokens_per_second']:,.0f}" for a in arms], fontsize=8)
    ax.set_ylabel("training tokens/s (non-pad)")
    ax.set_title(f"Speed: {title}\n{versions}", fontsize=9)
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench_speed.png", dpi=120)
    plt.close(fig)

    if arms[0].get("allocated_peak_gib") is None:
        return  # CPU: no GPU memory to draw
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(arms) + 2), 4.5))
    x = range(len(arms))
    for offset, key, label, color in ((-0.2, "allocated_peak_gib", "allocator peak", "#1f4e79"), (0.2, "nvml_peak_gib", "NVML peak", "#9dc3e6")):
        bars = ax.bar([i + offset for i in x], [a[key] for a in arms], width=0.4, label=label, color=color)
        ax.bar_label(bars, labels=[f"{a[key]:.1f}" for a in arms], fontsize=8)
    ax.set_xticks(list(x), names, rotation=30, fontsize=8)
    ax.set_ylabel("GPU memory while training, GiB")
    ax.set_title(f"Memory: {title}\n{versions}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench_memory.png", dpi=120)
    plt.close(fig)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main_parent(s: Settings) -> int:
    """Every arm in turn; exit status 1 if an arm crashed or timed out (running out of memory is a result)."""
    out = Path(s.out)
    (out / "arms").mkdir(parents=True, exist_ok=True)
    # the libraries are imported once, unmeasured, for the same reason as read_checkpoint; in a
    # separate process, so that this one never creates a CUDA context on the GPU being measured
    warm_imports = subprocess.Popen([sys.executable, "-c", "import torch, transformers, peft, trl, bitsandbytes, gemma_qlora.train"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model_dir, model_info = prepare_model(s)
    read_checkpoint(model_dir)
    warm_imports.wait()
    report = {"settings": asdict(s), "environment": environment(), "model": model_info, "arms": []}
    arms = arm_list(s)
    for i, arm in enumerate(arms, 1):
        log(f"[{i}/{len(arms)}] {arm} ...")
        result = run_arm(arm, s, model_dir, model_info["random_weights"])
        report["arms"].append(result)
        write_report(report, out)
        if result["status"] == "ok":
            log(f"[{i}/{len(arms)}] {arm}: {result['tokens_per_second']:,.0f} tokens/s, allocator peak "
                f"{fmt(result.get('allocated_peak_gib'))} GiB, {result['process_seconds']:.0f} s")
        else:
            where = f" (log: {result['log']})" if result.get("log") else ""
            log(f"[{i}/{len(arms)}] {arm}: {result['status']}: {result.get('error', '')}{where}")
    print(write_report(report, out))
    save_plots(report, out)
    log(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 1 if any(a["status"] in ("failed", "timeout") for a in report["arms"]) else 0


# ---------------------------------------------------------------------------------------------
# A worker: one arm, in its own process.
# ---------------------------------------------------------------------------------------------


def compute_dtype(force_fp16: bool):
    """The package's hardware rule (bf16 GPU, fp16 T4, fp32 CPU): a fair baseline differs in
    its recipe, not in the dtype it is given."""
    from gemma_qlora.quant import detect_precision

    return detect_precision(force_fp16=force_fp16).compute_dtype


def quote_dataset(records: list[dict], eos_token: str):
    """The one `text` column the plain arms train on: the same text the package builds."""
    from datasets import Dataset

    from gemma_qlora.data import format_quote

    return Dataset.from_list([{"text": format_quote(r["quote"], r["author"], eos_token)} for r in records])


def plain_sft_config(old: bool, s: Settings, dtype, output_dir: str):
    """The old notebook's SFTConfig (batch 1, accum 4, unpacked, paged 8-bit AdamW), or the same at
    8 x 512 packed with plain 8-bit AdamW. On CPU the 8-bit optimizers do not exist: adamw_torch."""
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=1 if old else 8,
        gradient_accumulation_steps=4 if old else 1,
        packing=not old,
        max_length=1024 if old else 512,  # 1024: TRL's default, which the old notebooks kept
        optim=("paged_adamw_8bit" if old else "adamw_8bit") if cuda else "adamw_torch",
        gradient_checkpointing=True,
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


def build_plain(arm: str, s: Settings, records: list[dict], recorder, timer):
    """The baseline, written inline as the old notebooks wrote it: BitsAndBytesConfig, from_pretrained,
    prepare_model_for_kbit_training, LoraConfig, SFTTrainer. Deliberately not the package."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTTrainer

    dtype = compute_dtype(s.fp16)
    if ARMS[arm] == 4:
        bnb_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    else:
        bnb_config = BitsAndBytesConfig(load_in_8bit=True)
    with recorder.phase("load"):
        tokenizer = AutoTokenizer.from_pretrained(s.model_dir)
        # dtype given explicitly: a bf16 model under fp16=True fails at the first optimizer step
        model = AutoModelForCausalLM.from_pretrained(
            s.model_dir, quantization_config=bnb_config, dtype=dtype,
            device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"},
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = prepare_model_for_kbit_training(model)
    lora_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora_config)
    return SFTTrainer(
        model=model,
        args=plain_sft_config(arm.endswith("-old"), s, dtype, str(Path(s.out) / "arms" / arm)),
        train_dataset=quote_dataset(records, tokenizer.eos_token),
        processing_class=tokenizer,
        callbacks=[timer],
    )


def build_pkg(arm: str, s: Settings, records: list[dict], recorder, timer):
    """The package's own path at its defaults (TrainConfig: batch 8 x 512 packed, paged 8-bit AdamW,
    k-bit preparation without PEFT's fp32 copy of frozen weights), called as `train()` calls it.
    Evaluation is pushed past the last step so that it never runs inside the timed steps."""
    from datasets import Dataset, DatasetDict

    from gemma_qlora.config import TrainConfig
    from gemma_qlora.lora import attach_lora
    from gemma_qlora.model import load_model
    from gemma_qlora.quant import detect_precision
    from gemma_qlora.train import make_trainer

    max_steps = s.warmup + s.steps + s.profile
    cfg = TrainConfig(
        model=s.model_dir, bits=ARMS[arm], steps=max_steps, logging_steps=1, eval_steps=max_steps + 1, seed=s.seed,
        force_fp16=s.fp16, gpu_memory_gib=s.gpu_memory_gib, output_dir=str(Path(s.out) / "arms"), run_name=arm,
        **LEVERS.get(arm, {}),
    )
    precision = detect_precision(force_fp16=cfg.force_fp16)
    with recorder.phase("load"):
        model, tokenizer = load_model(cfg.model, cfg.bits, precision, cfg.quant_type, cfg.double_quant, cfg.attn_implementation)
    model = attach_lora(
        model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.gradient_checkpointing, cfg.lean_prepare
    )
    # all quotes train, as in the plain arms; the held-out split make_trainer wants is never evaluated
    quotes = DatasetDict(train=Dataset.from_list(records), test=Dataset.from_list(records[: cfg.batch_size]))
    return make_trainer(cfg, model, tokenizer, quotes, precision, callbacks=[timer])


def build_unsloth(arm: str, s: Settings, records: list[dict], recorder, timer):
    """Unsloth's 4-bit loader and LoRA, with the plain-4bit trainer settings (8 x 512 packed)."""
    from trl import SFTTrainer
    from unsloth import FastLanguageModel

    dtype = compute_dtype(s.fp16)
    with recorder.phase("load"):
        model, tokenizer = FastLanguageModel.from_pretrained(s.model_dir, max_seq_length=512, dtype=dtype, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, bias="none",
        use_gradient_checkpointing="unsloth", random_state=s.seed,
    )
    return SFTTrainer(
        model=model,
        args=plain_sft_config(False, s, dtype, str(Path(s.out) / "arms" / arm)),
        train_dataset=quote_dataset(records, tokenizer.eos_token),
        processing_class=tokenizer,
        callbacks=[timer],
    )


def steady_speed(steps: list[tuple[int, float, int]], warmup: int, last: int | None = None) -> dict:
    """Speed over the timed steps. `steps` holds (optimizer step, time, non-pad tokens seen so far)
    at the end of every step; the clock starts at the end of step `warmup`, so kernel autotuning,
    allocator growth and the optimizer's first allocations stay out of the figure, and stops at the
    end of step `last` (the profiled steps after it run slower)."""
    timed = [step for step in steps if step[0] >= warmup and (last is None or step[0] <= last)]
    if len(timed) < 2:
        return {"tokens_per_second": None, "step_seconds_median": None, "timed_steps": 0, "timed_tokens": 0}
    (_, t0, n0), (_, t1, n1) = timed[0], timed[-1]
    return {
        "tokens_per_second": (n1 - n0) / (t1 - t0),
        "step_seconds_median": statistics.median(b[1] - a[1] for a, b in zip(timed, timed[1:])),
        "timed_steps": len(timed) - 1,
        "timed_tokens": n1 - n0,
    }


def make_profiler_callback(first_step: int, steps: int, path: Path):
    """A TrainerCallback that profiles optimizer steps first_step+1 .. first_step+steps and writes
    the GPU's busy share of them and the top kernels to `path`."""
    import torch
    from transformers import TrainerCallback

    class ProfileSteps(TrainerCallback):
        def __init__(self):
            self.profiler, self.start = None, None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first_step and self.profiler is None:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is None or state.global_step != first_step + steps:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.start
            self.profiler.__exit__(None, None, None)
            events = self.profiler.key_averages()
            device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
            head = f"{steps} profiled steps: wall {wall:.3f} s"
            if torch.cuda.is_available():
                head += f", GPU kernels {device_us / 1e6:.3f} s (busy {100 * device_us / 1e6 / wall:.0f} %)"
            sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            path.write_text(head + "\n\n" + events.table(sort_by=sort, row_limit=40, max_name_column_width=90))
            self.profiler = None

    return ProfileSteps()


def measure_arm(arm: str, s: Settings, result: dict) -> None:
    """Import, load, set up and train one arm, filling `result` as figures become known (so a
    failure halfway still reports what was measured before it)."""
    if arm == "unsloth-4bit":
        try:
            import unsloth  # noqa: F401  (first: it patches transformers and TRL as they import)
        except Exception as error:  # unsloth raises plain Exceptions without a supported GPU
            result.update(status="skipped", error=f"import unsloth failed: {type(error).__name__}: {error}")
            return
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers
    import trl  # noqa: F401

    if arm.startswith("pkg-"):
        import gemma_qlora.train  # noqa: F401  (and through it the rest of the package)
    result["import_seconds"] = time.perf_counter() - PROCESS_START

    from gemma_qlora.fortunes import load_fortunes
    from gemma_qlora.memory import MemoryRecorder
    from gemma_qlora.train import StepTimer

    transformers.set_seed(s.seed)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        result.update(gpu=props.name, gpu_total_gib=props.total_memory / GIB, compute_capability=f"{props.major}.{props.minor}",
                      cuda=torch.version.cuda)
        if s.gpu_memory_gib:
            from gemma_qlora.quant import cap_gpu_memory

            cap_gpu_memory(s.gpu_memory_gib)
    recorder, timer = MemoryRecorder(), StepTimer()  # NVML sampled every 0.1 s in a thread (RSS on CPU)
    gpu = recorder.record.kind == "nvml"
    records = load_fortunes()

    build = {"plain": build_plain, "pkg": build_pkg, "unsloth": build_unsloth}[arm.split("-")[0]]
    t0 = time.perf_counter()
    trainer = build(arm, s, records, recorder, timer)
    if s.profile:
        trainer.add_callback(make_profiler_callback(s.warmup + s.steps, s.profile, Path(s.out) / "arms" / f"{arm}.profile.txt"))
    load = recorder.record.phases[0]
    result["load_seconds"] = load.end_s - load.start_s
    result["setup_seconds"] = time.perf_counter() - t0 - result["load_seconds"]
    result["nvml_after_load_gib"] = load.end_sampled_gib if gpu else None
    result["allocated_after_load_gib"] = load.end_allocated_gib

    args, model = trainer.args, trainer.model
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    result.update(
        batch_size=args.per_device_train_batch_size,
        grad_accum=args.gradient_accumulation_steps,
        max_length=args.max_length,
        packing=args.packing,
        optim=getattr(args.optim, "value", str(args.optim)),
        precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        attention=getattr(model.config, "_attn_implementation", None),
        gradient_checkpointing=args.gradient_checkpointing,
        kbit_preparation=("none (16-bit)" if ARMS[arm] == 16 else "unsloth" if arm.startswith("unsloth")
                          else "gemma_qlora lean (no fp32 copy)" if arm.startswith("pkg") and LEVERS.get(arm, {}).get("lean_prepare", True)
                          else "prepare_model_for_kbit_training"),
        trainable_parameters=model.get_nb_trainable_parameters()[0],
        epoch_examples=len(records),
        epoch_sequences=len(lengths),
        epoch_tokens=sum(lengths),
    )

    try:
        with recorder.phase("train"):
            trainer.train()
    finally:  # also after an out-of-memory error: the peak that hit the wall
        train = recorder.record.phases[-1]
        result.update(
            allocated_peak_gib=torch.cuda.max_memory_allocated() / GIB if gpu else None,
            reserved_peak_gib=torch.cuda.max_memory_reserved() / GIB if gpu else None,
            nvml_peak_gib=train.peak_sampled_gib if gpu else None,
            rss_peak_gib=None if gpu else train.peak_sampled_gib,
        )
        recorder.stop()
    result["train_seconds"] = train.end_s - train.start_s
    result.update(steady_speed(timer.steps, s.warmup, last=s.warmup + s.steps))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] <= s.warmup + s.steps]
    result["losses"] = losses
    result["final_loss"] = statistics.fmean(losses[-5:]) if losses else None
    if result["tokens_per_second"]:
        result["epoch_seconds"] = result["epoch_tokens"] / result["tokens_per_second"]


def main_worker(s: Settings) -> int:
    result = {"arm": s.worker, "bits": ARMS[s.worker], "status": "ok"}
    code = 0
    try:
        measure_arm(s.worker, s, result)
    except Exception as error:
        traceback.print_exc()
        oom = type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()
        message = " ".join(str(error).split())[:500]  # one line: it ends up in a Markdown list
        result.update(status="oom" if oom else "failed", error=f"{type(error).__name__}: {message}")
        code = 1
    path = Path(s.out) / "arms" / f"{s.worker}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return code


if __name__ == "__main__":
    settings = parse_args()
    if settings.replot:
        save_plots(json.loads((Path(settings.out) / "bench.json").read_text()), Path(settings.out))
        sys.exit(0)
    if settings.worker:
        sys.exit(main_worker(settings))
    sys.exit(main_parent(settings))
