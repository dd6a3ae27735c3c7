"""Proof that an export is the trained model: each file loaded back as a user loads it, scored
on the run's held-out split by the run's own trainer, its greedy continuations compared with the
adapter model's, and judged against its limit."""

from __future__ import annotations

import hashlib
import json
import tempfile
from importlib.metadata import version
from pathlib import Path

from transformers import PrinterCallback, ProgressCallback

from gemma_qlora.data import PROMPTS, quote_prompt
from gemma_qlora.evaluate import generate
from gemma_qlora.export.merge import file_sizes
from gemma_qlora.export.settings import EXPORT_RECORD, ExportConfig, REFERENCE_NAMES
from gemma_qlora.formats import format_of, generation_prompts, stop_at_end_of_turn
from gemma_qlora.quant import method_of
from gemma_qlora.trained import load_adapter_model, load_exported, release_memory
from gemma_qlora.trainer import make_trainer


CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "rms_norm_eps", "sliding_window", "layer_types", "query_pre_attn_scalar", "rope_parameters",
    "attn_logit_softcapping", "final_logit_softcapping", "hidden_activation", "tie_word_embeddings",
)

def config_mismatches(exported, reference) -> list[str]:
    """The settings that shape the computation and came back different: a GGUF stores only some
    of a config, and transformers fills the rest with the class's defaults."""
    out = []
    for key in CONFIG_KEYS:
        a, b = getattr(exported, key, None), getattr(reference, key, None)
        if isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-6 * abs(b):
            continue
        if a != b:
            out.append(f"{key}: {a!r} (file) vs {b!r} (trained)")
    return out

def eval_loss(model, tokenizer, train_cfg, *, data, precision) -> float:
    """Held-out loss computed exactly as training computed it: the run's own trainer (same
    encoding, masking, packing and batch) evaluating the run's held-out split."""

    with tempfile.TemporaryDirectory() as folder:
        trainer = make_trainer(train_cfg, model, tokenizer, data, precision=precision, output_dir=Path(folder))
        for quiet in (PrinterCallback, ProgressCallback):  # the command prints its own one line per model
            trainer.remove_callback(quiet)
        return float(trainer.evaluate()["eval_loss"])

def agreement_prompts(data, tokenizer, n: int) -> list[str]:
    """The prompts greedy continuations are compared on: for quotes, the run's prompts and the
    first `n` held-out quotes up to their `Author:`; for other formats, the first `n` held-out
    examples' prompts (chat prompts, prompts, a text's first words)."""
    if format_of(data["test"]) == "quote":
        return list(PROMPTS) + [quote_prompt(q) for q in data["test"]["quote"][:n]]
    return generation_prompts(data["test"], tokenizer, n=n)

def held_out_texts(data, tokenizer) -> list[str]:
    """The held-out examples as text, for comparing an exported tokenizer with the run's."""
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in data["test"]["input_ids"]]

def measure(model, tokenizer, train_cfg, *, data, precision, prompts: list[str]) -> dict:
    """Held-out loss, and greedy continuations one prompt at a time, as `generate` shows them:
    a batch pads its prompts, and LLM.int8 picks its outlier columns per batch, so an 8-bit
    model's batched continuations differ from what a user sees."""
    if format_of(data["test"]) == "messages":
        stop_at_end_of_turn(model, tokenizer)  # as the run generated

    return {
        "eval_loss": eval_loss(model, tokenizer, train_cfg, data=data, precision=precision),
        "continuations": generate(model, tokenizer, prompts, max_new_tokens=train_cfg.max_new_tokens, batch_size=1),
    }

def agreement(ours: list[str], reference: list[str]) -> dict:
    """How far greedy decoding agrees: prompts continued identically, and the mean share of the
    longer continuation's characters before the first difference."""
    def shared(a: str, b: str) -> float:
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return n / max(len(a), len(b), 1)

    return {
        "identical": sum(a == b for a, b in zip(ours, reference)),
        "prompts": len(reference),
        "prefix_agreement": sum(shared(a, b) for a, b in zip(ours, reference)) / max(len(reference), 1),
    }

def tokenizer_agreement(tokenizer, reference, texts: list[str]) -> float:
    """Share of `texts` the exported tokenizer turns into exactly the reference's ids."""
    return sum(tokenizer(t)["input_ids"] == reference(t)["input_ids"] for t in texts) / max(len(texts), 1)

def loss_limit(cfg: ExportConfig, kind: str, *, original: bool) -> float:
    """The largest relative rise of held-out loss `kind` may show (see `MAX_LOSS_RISE`)."""
    limit = cfg.max_loss_drift_q8_0 if kind == "q8_0" else cfg.max_loss_drift
    return limit + (cfg.max_loss_drift_original if original else 0.0)

def judge(entry: dict, reference_loss: float, *, limit: float) -> dict:
    """Pass unless the held-out loss rose past `limit`; a fall passes, and is recorded."""
    drift = (entry["eval_loss"] - reference_loss) / reference_loss
    entry["loss_drift"] = drift
    entry["max_loss_drift"] = limit
    entry["only_a_rise_fails"] = True
    entry["passed"] = drift <= limit
    return entry

def reference_key(run_dir: Path, precision, *, data, prompts: list[str]) -> dict:
    """What the adapter model's figures depend on: the adapter's bytes, the held-out examples, the
    hardware's dtype and the libraries (the base is checked separately, by its fingerprint)."""
    held_out = json.dumps([list(data["test"]["input_ids"]), list(data["test"]["labels"])]).encode()
    return {
        "adapter_sha256": hashlib.sha256((run_dir / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest(),
        "held_out_sha256": hashlib.sha256(held_out).hexdigest(),
        "device": precision.device,
        "compute_dtype": precision.name,
        "prompts": prompts,
        "generation": "greedy, one prompt at a time",
        "versions": {lib: version(lib) for lib in ("torch", "transformers", "peft", "trl", "bitsandbytes")},
    }

def adapter_reference(train_cfg, run_dir: Path, precision, *, data, prompts: list[str], dequantized: bool = False) -> dict:
    """The adapter model's held-out loss and continuations (with `dequantized`, those of the
    adapter on the dequantized base, unmerged). An earlier export of the same run on the same
    hardware and libraries has measured them already (export.json): they are taken from there
    rather than measured again."""
    key = {**reference_key(run_dir, precision, data=data, prompts=prompts), "dequantized": dequantized}
    what = REFERENCE_NAMES[dequantized]
    try:
        earlier = json.loads((run_dir / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        earlier = {}
    for entry in earlier.values():
        for field_name in ("adapter", "adapter_dequantized"):
            found = entry.get(field_name) or {}
            if found.get("key") == key:
                print(f"{what}: held-out loss {found['eval_loss']:.4f} (measured by an earlier export of this run, "
                      "same adapter, hardware and libraries)", flush=True)
                return dict(found)
    print(f"scoring {what} ({train_cfg.bits}-bit base + adapter) on {len(data['test'])} held-out examples...", flush=True)
    model, tokenizer = load_adapter_model(train_cfg, run_dir, precision, dequantized=dequantized)
    reference = measure(model, tokenizer, train_cfg, data=data, precision=precision, prompts=prompts)
    del model
    release_memory()
    print(f"{what}: held-out loss {reference['eval_loss']:.4f}", flush=True)
    return {**reference, "key": key}

def verify(kind: str, path: Path, *, reference: dict, context: dict) -> dict:
    """Load one exported model as a user would, score it, compare it with the adapter model."""
    cfg, train_cfg, data, precision = context["cfg"], context["train_cfg"], context["data"], context["precision"]
    if kind == "merged":
        model, tokenizer = load_exported(path, precision)
        entry = {"bytes": sum(file_sizes(path).values())}
    else:
        model, tokenizer = load_exported(path.parent, precision, gguf_file=path.name)
        entry = {
            "bytes": path.stat().st_size,
            "config_mismatches": config_mismatches(model.config, context["config"]),
            "tokenizer_agreement": tokenizer_agreement(tokenizer, context["tokenizer"], context["prompts"] + context["texts"]),
        }
    entry["chat_template"] = bool(tokenizer.chat_template)
    entry.update(measure(model, tokenizer, train_cfg, data=data, precision=precision, prompts=context["prompts"]))
    del model
    release_memory()
    entry["agreement"] = agreement(entry["continuations"], reference["continuations"])
    if context.get("int8"):  # what `generate --run` shows an 8-bit run
        entry["agreement_int8"] = agreement(entry["continuations"], context["int8"]["continuations"])
    # merged into the original weights, a quantized run's adapter meets weights it never saw
    original = context["base"] == "original" and method_of(train_cfg).quantized
    judge(entry, reference["eval_loss"], limit=loss_limit(cfg, kind, original=original))
    entry["passed"] = entry["passed"] and not entry.get("config_mismatches")
    return entry

def verify_all(files, *, reference: dict, context: dict, out: Path) -> list[dict]:
    """Verify each written file, printing one line each."""
    checked = []
    for kind, path, write_seconds in files:
        name = out.name if kind == "merged" else path.name
        print(f"verifying {name}...", flush=True)
        entry = {"model": kind, "file": name, "write_seconds": write_seconds}
        entry.update(verify(kind, path, reference=reference, context=context))
        checked.append(entry)
        agree, int8 = entry["agreement"], entry.get("agreement_int8")
        also = (f" ({int8['identical']}/{int8['prompts']} with the int8 adapter model `generate --run` shows)"
                if int8 else "")
        print(f"  held-out loss {entry['eval_loss']:.4f} ({entry['loss_drift']:+.3%} vs {context['reference_name']}, "
              f"limit +{entry['max_loss_drift']:.2%}): {'passed' if entry['passed'] else 'WITHHELD'}; "
              f"greedy identical on {agree['identical']}/{agree['prompts']} prompts{also}", flush=True)
    return checked
