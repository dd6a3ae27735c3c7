"""Gemma 3 4B, multimodal, trained on text: GPU memory of its language model loaded alone (the
package's way) against the whole multimodal model, in 4-bit and 8-bit, and whether 4-bit fits a
T4 (fp16, 15 GiB) at the default micro-batch.

The checkpoint is random, of google/gemma-3-4b's shape (SigLIP vision tower, projector,
34-layer language model, 262,208-token vocabulary), built once on the GPU into --cache with a BPE
tokenizer trained on the quotes and Gemma 3's chat template; memory and speed are the real
model's, losses are not. Every arm runs in its own process and trains on the fortunes as chat
(assistant turns only): allocator memory after loading, peak while training, and tokens/s.

    python bench/lab/gemma3_4b.py --out OUT [--arms text-4bit,text-8bit,whole-4bit,whole-8bit,t4-text-4bit] [--steps 6]

Arms: text-B (the language model alone, the package's load_model), whole-B (the multimodal
Gemma3ForConditionalGeneration, as a plain from_pretrained loads it, with the same LoRA settings;
PEFT then also puts LoRA on the vision tower's q/k/v projections, which share the names), and
t4-text-4bit (fp16 under a 15 GiB cap, micro-batch 8, then 4, 2, 1 until one fits). Writes
OUT/gemma3_4b.json, OUT/gemma3_4b.md and OUT/gemma3_4b.log. `--shape tiny` runs the same on a
tiny model, on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

SHAPES = {
    "4b": dict(  # google/gemma-3-4b-pt / -it
        text=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                  head_dim=256, query_pre_attn_scalar=256, sliding_window=1024, max_position_embeddings=131072),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=896,
                    patch_size=14, vision_use_head=False),
        vocab_size=262208, mm_tokens_per_image=256,
    ),
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=16, sliding_window=32, max_position_embeddings=1024),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
        vocab_size=None, mm_tokens_per_image=4,
    ),
}
ARMS = ("text-4bit", "text-8bit", "whole-4bit", "whole-8bit", "t4-text-4bit")
T4_BATCHES = (8, 4, 2, 1)
GIB = 2**30


def build(shape: str, folder: Path) -> None:
    """The random checkpoint, once (via a sibling folder, so that a crash leaves no half model)."""
    import shutil

    import torch

    from gemma_qlora.tiny import build_chat_tokenizer, save_gemma3_multimodal

    if (folder / "config.json").is_file():
        return
    t0 = time.perf_counter()
    spec = SHAPES[shape]
    tokenizer = build_chat_tokenizer(vocab_size=8000 if shape == "4b" else 600, examples=None if shape == "4b" else 2000)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = save_gemma3_multimodal(partial, tokenizer=tokenizer, text=dict(spec["text"]), vision=dict(spec["vision"]),
                               vocab_size=spec["vocab_size"], mm_tokens_per_image=spec["mm_tokens_per_image"],
                               device=device, dtype=torch.bfloat16)
    os.replace(partial, folder)
    print(f"built the {shape} shape ({n / 1e9:.2f}B parameters) in {time.perf_counter() - t0:.0f} s", flush=True)


def arm(name: str, folder: str, data: str, *, steps: int, batch_size: int) -> dict:
    """One arm in this process: load, LoRA, train `steps` steps; memory and speed."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

    from gemma_qlora.config import TrainConfig
    from gemma_qlora.formats import load_examples
    from gemma_qlora.lora import attach_lora, parameter_counts
    from gemma_qlora.model import default_attention, load_model
    from gemma_qlora.quant import bnb_config_for, cap_gpu_memory, detect_precision
    from gemma_qlora.trainer import make_trainer

    t4, whole, bits = name.startswith("t4-"), "whole" in name, int(name.rsplit("-", 1)[1].rstrip("bit"))
    cuda = torch.cuda.is_available()
    precision = detect_precision(force_fp16=t4) if cuda else detect_precision("cpu")
    if t4 and cuda:
        cap_gpu_memory(15)
    cfg = TrainConfig(model=folder, data=data, bits=bits, steps=steps, batch_size=batch_size, max_seq_length=512, eval_size=16,
                      max_train_examples=1000, eval_steps=steps + 1, logging_steps=1, output_dir="/tmp/gemma3_4b_runs", run_name=name)
    allocated = (lambda: torch.cuda.memory_allocated() / GIB) if cuda else (lambda: 0.0)
    t0 = time.perf_counter()
    if whole:  # what a plain from_pretrained of a multimodal checkpoint loads
        model = Gemma3ForConditionalGeneration.from_pretrained(
            folder, dtype=precision.compute_dtype, quantization_config=bnb_config_for(cfg, precision),
            attn_implementation=default_attention("gemma3", precision.device), device_map={"": 0 if cuda else "cpu"},
        )
        model.config.use_cache = False
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        model, tokenizer = load_model(cfg, precision)
    result = {
        "arm": name, "bits": bits, "whole_model": whole, "t4_emulation": t4, "batch_size": batch_size, "steps": steps,
        "model_class": type(model).__name__, "load_seconds": time.perf_counter() - t0,
        "vision_modules_on_gpu": sum(1 for n, _ in model.named_modules() if "vision" in n),
        "weights_gib": model.get_memory_footprint() / GIB, "allocated_after_load_gib": allocated(),
        "dtype": precision.name,
    }
    if cuda:
        result["peak_while_loading_gib"] = torch.cuda.max_memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
    model = attach_lora(model, cfg)
    result["lora"] = parameter_counts(model)
    trainer = make_trainer(cfg, model, tokenizer, load_examples(cfg), precision=precision, output_dir=Path("/tmp/gemma3_4b_runs") / name)
    t0 = time.perf_counter()
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        result.update(fits=False, peak_training_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None)
        return result
    seconds = time.perf_counter() - t0
    result.update(
        fits=True, train_seconds=seconds, tokens_per_second=trainer.state.num_input_tokens_seen / seconds,
        final_loss=next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
    )
    if cuda:
        result["peak_training_gib"] = torch.cuda.max_memory_allocated() / GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    return result


def run_arm(name: str, args, data: Path, batch_size: int, log) -> dict:
    """`arm` in a fresh process (its own CUDA context and allocator), its result read back."""
    result_file = Path(args.cache) / f"{name}-{batch_size}.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--arm", name, "--model", str(model_folder(args)), "--data", str(data),
               "--steps", str(args.steps), "--batch_size", str(batch_size), "--result", str(result_file)]
    t0 = time.perf_counter()
    try:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=args.arm_timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        status = f"timed out after {args.arm_timeout} s"
    if status != 0 or not result_file.is_file():
        return {"arm": name, "batch_size": batch_size, "error": f"exit status {status}", "seconds": time.perf_counter() - t0}
    return json.loads(result_file.read_text())


def model_folder(args) -> Path:
    return Path(args.cache) / f"gemma3-{args.shape}-random"


def table(results: list[dict], args) -> str:
    def gib(x):
        return "–" if x is None else f"{x:.2f}"

    lines = [
        f"Gemma 3 {args.shape} shape (random weights, multimodal checkpoint), chat fortunes, micro-batch × 512 packed tokens, "
        f"{args.steps} steps; GPU allocator (torch) memory.",
        "",
        "| arm | loads | dtype | micro-batch | weights, GiB | after load, GiB | peak training, GiB | tokens/s | fits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['arm']} | – | – | {r['batch_size']} | – | – | – | – | failed ({r['error']}) |")
            continue
        loads = "whole multimodal model" if r["whole_model"] else "language model alone"
        speed = f"{r['tokens_per_second']:,.0f}" if r.get("tokens_per_second") else "–"
        lines.append(
            f"| {r['arm']} | {loads} | {r['dtype']} | {r['batch_size']} | {gib(r['weights_gib'])} | {gib(r['allocated_after_load_gib'])} "
            f"| {gib(r.get('peak_training_gib'))} | {speed} | {'yes' if r['fits'] else 'out of memory'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--shape", default="4b", choices=sorted(SHAPES))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cache", default="/tmp/gemma3_4b")
    parser.add_argument("--arm_timeout", type=int, default=150)
    # one arm, in its own process
    parser.add_argument("--arm")
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--result")
    args = parser.parse_args()

    if args.arm:
        result = arm(args.arm, args.model, args.data, steps=args.steps, batch_size=args.batch_size)
        Path(args.result).write_text(json.dumps(result, indent=2))
        return

    from chat_fortunes import write_chat

    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    data = write_chat(cache / "chat.jsonl")
    results = []
    with open(out / "gemma3_4b.log", "w") as log:
        build(args.shape, model_folder(args))
        for name in [a for a in args.arms.split(",") if a]:
            for batch_size in T4_BATCHES if name.startswith("t4-") else (8,):
                print(f"arm {name}, micro-batch {batch_size} ...", flush=True)
                log.flush()
                result = run_arm(name, args, data, batch_size, log)
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "lora"}), flush=True)
                if result.get("fits", False) or "error" in result and not name.startswith("t4-"):
                    break
            (out / "gemma3_4b.json").write_text(json.dumps(results, indent=2))
            (out / "gemma3_4b.md").write_text(table(results, args))
    print(table(results, args))


if __name__ == "__main__":
    main()
