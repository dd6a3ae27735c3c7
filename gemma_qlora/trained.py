"""A trained run, loaded back: its settings and metrics, its base checked against the one it
trained on, the adapter model as it trained (or on the dequantized weights), and an exported
model as a user loads it. `generate` and `export` share these.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gemma_qlora.config import TrainConfig
from gemma_qlora.errors import UserError
from gemma_qlora.formats import use_chat_template
from gemma_qlora.lora import load_adapter
from gemma_qlora.model import base_fingerprint, default_attention, load_model
from gemma_qlora.quant import method_of


def read_run(run: str | Path):
    """The run's `TrainConfig` and metrics, refusing a folder that holds no finished run."""
    run_dir = Path(run).expanduser()
    if run_dir.is_file():
        raise UserError(f"--run {run_dir} is a file, not a folder: give a run folder written by `python -m gemma_qlora train`.")
    if not run_dir.is_dir():
        raise UserError(f"Run folder {run_dir} does not exist: give a folder written by `python -m gemma_qlora train`.")
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise UserError(f"{run_dir} holds no adapter (adapter/adapter_model.safetensors): train it to the end first, "
                        "or point --run to another run folder.")
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        settings = metrics["config"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{run_dir} has no readable metrics.json with the run's settings: it did not finish; train it again.") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in settings.items() if k in known}), metrics

def check_base(train_cfg, metrics: dict) -> str:
    """'matches', or 'not recorded' (older runs: warned about); raises for a base that differs."""
    recorded = metrics.get("base")
    if not recorded:
        print(f"warning: this run did not record its base's fingerprint; cannot check that {train_cfg.model} "
              "is the model it trained on.", file=sys.stderr)
        return "not recorded"
    current = base_fingerprint(train_cfg.model)
    if current["config_sha256"] != recorded.get("config_sha256"):
        what = "its config.json"
    elif current["weights"] != recorded.get("weights"):
        what = "its weights"
    else:
        return "matches"
    raise UserError(f"The base model {train_cfg.model} differs from the one this run trained on ({what} changed): "
                    "export with the same base checkpoint, or train again on this one.")

def load_adapter_model(train_cfg, run_dir: Path, precision, *, dequantized: bool = False):
    """The model as trained: the base quantized as the run had it, with the run's adapter.

    `dequantized=True` turns the quantized layers back into plain ones first (see `merged_model`)
    and leaves the adapter unmerged: the trained weights computed without bitsandbytes' kernels.
    """
    model, tokenizer = load_model(train_cfg, precision)
    use_chat_template(tokenizer, train_cfg)  # the template the run trained with
    if dequantized and method_of(train_cfg).quantized:
        model = model.dequantize(dtype=precision.compute_dtype)
    return load_adapter(model, str(run_dir / "adapter")).eval(), tokenizer

def load_exported(folder: Path, precision, *, gguf_file: str | None = None):
    """An exported model as a user loads it, with plain transformers and no PEFT (a GGUF through
    transformers' GGUF loader), in the compute dtype: the model and its own tokenizer."""

    config = AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=gguf_file, dtype=precision.compute_dtype,
        attn_implementation=default_attention(config.model_type, precision.device),
    ).to(precision.device)
    if gguf_file and getattr(model, "hf_quantizer", None) is not None:
        # transformers reads a Gemma GGUF into ordinary float weights but leaves the model marked
        # quantized, and the Trainer then refuses to evaluate it
        if any(not p.is_floating_point() for p in model.parameters()):
            raise UserError(f"transformers kept {gguf_file} packed, so it cannot be scored here: export --into merged.")
        model.hf_quantizer.remove_quantization_config(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer

def release_memory() -> None:
    """Return the memory of models the caller has dropped, before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
