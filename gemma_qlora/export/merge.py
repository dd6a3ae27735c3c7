"""Merging the adapter into its base and saving it: in fp32, then in the dtype that keeps the
adapter's update (`--save_dtype auto`), carrying a chat template only for chat runs."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer

from gemma_qlora.export.gguf import write_gguf
from gemma_qlora.export.settings import BF16_MIN_SURVIVING, ExportConfig
from gemma_qlora.formats import stop_at_end_of_turn, use_chat_template
from gemma_qlora.lora import load_adapter
from gemma_qlora.model import load_model
from gemma_qlora.quant import method_of


def merged_model(train_cfg, run_dir: Path, precision, *, base: str):
    """The base with the adapter merged in, as a plain transformers model in fp32, and how much
    of the adapter's update survives each save dtype (`update_survival`).

    `base="dequantized"` (the default) loads the base quantized exactly as it trained and turns
    every bitsandbytes `Linear4bit`/`Linear8bitLt` back into an `nn.Linear` holding the weights
    the adapter saw (transformers' `dequantize`, i.e. bitsandbytes' `dequantize_4bit` /
    `int8_vectorwise_dequant`), then merges. It is the default because it is the model that was
    trained and evaluated: its held-out loss and greedy outputs are the adapter model's up to
    the save dtype's rounding, which the verification can hold to a tight limit.

    `base="original"` merges into the unquantized checkpoint, which the adapter never saw: the
    adapter learned to correct the quantized weights, so its correction lands on other weights
    and the result is a different model, better or worse depending on how much of the
    quantization error training absorbed (docs/export.md measures both).

    The merge is done in fp32 whatever the compute dtype: a short run's update is often smaller
    than half a bf16 step of the weight it lands on, so merging in bf16 would round it away
    before anything could be measured. Merging into the quantized layers themselves (PEFT's
    merge on a bnb layer) would re-quantize the sum and lose it too, so neither path does that.
    """
    fp32 = dataclasses.replace(precision, compute_dtype=torch.float32)
    if not method_of(train_cfg).quantized or base == "original":
        model, tokenizer = load_model(dataclasses.replace(train_cfg, bits=16), fp32)
    else:
        model, tokenizer = load_model(train_cfg, fp32)
        model = model.dequantize(dtype=torch.float32)
    use_chat_template(tokenizer, train_cfg)  # the template the run trained with
    model = load_adapter(model, str(run_dir / "adapter"))
    survival = update_survival(model)
    model = model.merge_and_unload()
    model.config.use_cache = True  # the loader turned it off for training
    return model.eval(), tokenizer, survival

@torch.no_grad()
def update_survival(peft_model) -> dict[str, float]:
    """For each save dtype, the share of adapted weights whose saved value differs from the
    base weight's saved value: how much of the adapter's update a checkpoint in that dtype
    keeps. Counted over the weights the update changes in fp32, one layer at a time.

    Written here because PEFT merges but does not say what a later cast keeps; the delta is
    PEFT's own (`get_delta_weight`), so it is exactly what `merge_and_unload` adds."""
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    kept, changed = dict.fromkeys(dtypes, 0), 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer().weight.float()
        merged = base.clone()
        for name in module.active_adapters:
            merged += module.get_delta_weight(name).float()
        moved = merged != base
        changed += int(moved.sum())
        for key, dtype in dtypes.items():
            kept[key] += int((moved & (merged.to(dtype) != base.to(dtype))).sum())
    return {key: kept[key] / changed if changed else 1.0 for key in dtypes}

def choose_save_dtype(requested: str, survival: dict[str, float]) -> tuple[str, str]:
    """The merged checkpoint's dtype and why.

    `auto` (the default) saves bf16, half the size and the dtype Gemma is run in, when at least
    90 % of the adapted weights keep their update in bf16; otherwise fp32, twice the size. The
    weights bf16 rounds back to the base are those the update changed least relative to their
    size, so losing a tenth of them costs little; a short run's update, though, is often under
    half a bf16 step for most weights: after 15 steps of an 8-bit run of the 270M model only
    51-56 % survived, and the bf16 save was no longer the trained model where the fp32 one was
    (docs/export.md). fp16 keeps more, but Gemma's activations overflow it. A dtype asked for by
    name is used as asked; export.json records what each keeps either way.
    """
    if requested != "auto":
        return requested, "asked for"
    share = survival["bfloat16"]
    if share >= BF16_MIN_SURVIVING:
        return "bfloat16", f"{share:.1%} of the adapter's updates survive bf16 rounding (at least {BF16_MIN_SURVIVING:.0%})"
    return "float32", f"only {share:.1%} of the adapter's updates survive bf16 rounding (under {BF16_MIN_SURVIVING:.0%})"

def save_merged(model, tokenizer, folder: Path, *, dtype: str) -> None:
    """The checkpoint with its tokenizer and generation config (which says where to stop)."""
    model.to(getattr(torch, dtype)).save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))

def ship_as(model, tokenizer, *, chat: bool) -> None:
    """What the export tells its users about turns: a chat run's keeps the chat template it
    trained with and stops at `<end_of_turn>` as well as EOS; any other run's carries no chat
    template, since llama.cpp's CLI and `generate --model` switch to chat whenever one is
    present, and this model never learned it."""
    if chat:
        stop_at_end_of_turn(model, tokenizer)
    else:
        tokenizer.chat_template = None

def file_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}

def write_export(cfg: ExportConfig, train_cfg, run_dir: Path, partial: Path, *, precision, base: str, chat: bool):
    """Merge, then write the checkpoint or the GGUF files into `partial`. Returns the files as
    (kind, path, seconds to write), the merged model's config and tokenizer, the merge's seconds,
    and what the saved weights keep of the update."""
    t0 = time.perf_counter()
    model, tokenizer, survival = merged_model(train_cfg, run_dir, precision, base=base)
    ship_as(model, tokenizer, chat=chat)
    merge_seconds, files = time.perf_counter() - t0, []
    kept = {"update_survival": survival}
    if cfg.into == "merged":
        dtype, why = choose_save_dtype(cfg.save_dtype, survival)
        kept.update(save_dtype=dtype, save_dtype_reason=why)
        warn_if_update_lost(survival[dtype], what=f"the {dtype} checkpoint")
        save_merged(model, tokenizer, partial, dtype=dtype)
        files.append(("merged", partial, time.perf_counter() - t0 - merge_seconds))
    else:
        if "f16" in cfg.gguf_types:
            warn_if_update_lost(survival["float16"], what="the GGUF F16")
        for qtype in cfg.gguf_types:
            t1, path = time.perf_counter(), partial / f"model-{qtype}.gguf"
            write_gguf(model, tokenizer, path, qtype=qtype, name=f"{train_cfg.name} ({Path(train_cfg.model).name})")
            files.append((qtype, path, time.perf_counter() - t1))
    return files, model.config, tokenizer, merge_seconds, kept

def warn_if_update_lost(share: float, *, what: str) -> None:
    if share < 0.5:
        print(f"warning: {what} keeps the adapter's update in only {share:.1%} of the weights it changed; "
              "the rest round back to the base's values (--save_dtype float32 keeps all of it).", file=sys.stderr)
