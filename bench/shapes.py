"""The model every arm loads: a random-weight checkpoint of a real Gemma's shape, or a folder.

A shape is built once (seeded, bf16 safetensors, with a BPE tokenizer trained on the quotes,
since there is no Hub) and cached, so that each arm's load time is a real from_pretrained of a
real-sized checkpoint. Speed and memory are those of the real model; losses are not.

The build runs in its own process (`python bench/shapes.py SHAPE FOLDER SEED`), on the GPU
where there is one (seconds, against a minute or two on the CPU), so that the benchmark's
parent process never holds a CUDA context.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
# byte-level BPE on the quotes: at 8,000 about 3.7 characters a token (Gemma's: about 4 on English);
# the tiny shape's is smaller, as its output layer over the vocabulary is most of its CPU time
TOKENIZER_VOCAB = {"tiny": 1000}
DEFAULT_TOKENIZER_VOCAB = 8000


def tokenizer_vocab(shape: str) -> int:
    return TOKENIZER_VOCAB.get(shape, DEFAULT_TOKENIZER_VOCAB)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_model(shape: str, *, cache: str, seed: int) -> tuple[str, dict]:
    """The folder every arm loads with from_pretrained, and what the report says about it."""
    if shape not in SHAPES:
        path = Path(shape).expanduser()
        info = {"shape": shape, "random_weights": False, "path": str(path)}
        if (path / "config.json").is_file():
            info["config"] = json.loads((path / "config.json").read_text())
        return str(path), info

    folder = Path(cache).expanduser() / f"{shape}-seed{seed}"
    marker_file = folder / "bench-shape.json"
    if marker_file.is_file() and json.loads(marker_file.read_text()).get("marker") == marker(shape, seed):
        log(f"model: cached {shape} shape with random weights in {folder}")
        return str(folder), json.loads(marker_file.read_text())["info"]
    log(f"model: building the {shape} shape with random weights in {folder} (once; cached) ...")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.abspath(__file__), shape, str(folder), str(seed)], check=True)
    info = json.loads(marker_file.read_text())["info"]
    log(f"model: {info['parameters'] / 1e6:,.0f}M parameters built on {info['built_on']} and saved in {time.perf_counter() - t0:.0f} s")
    return str(folder), info


def marker(shape: str, seed: int) -> dict:
    config_class, fields = SHAPES[shape]
    return {"shape": shape, "config_class": config_class, "fields": fields, "seed": seed, "tokenizer_vocab": tokenizer_vocab(shape)}


def build(shape: str, folder: Path, seed: int) -> None:
    """Build and save the shape into `folder` (via a sibling folder, so a crash leaves no half model)."""
    import torch
    import transformers

    from gemma_qlora.tiny import build_tokenizer

    config_class, fields = SHAPES[shape]
    tokenizer = build_tokenizer(vocab_size=tokenizer_vocab(shape), examples=None)
    fields = dict(fields, vocab_size=len(tokenizer) if fields["vocab_size"] == "tokenizer" else fields["vocab_size"])
    config = getattr(transformers, config_class)(**fields, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 2.5B weights: seconds on a GPU
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    info = {
        "shape": shape,
        "random_weights": True,
        "path": str(folder),
        "config_class": config_class,
        "fields": fields,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_vocab": len(tokenizer),
        "built_on": device,
    }
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "bench-shape.json").write_text(json.dumps({"marker": marker(shape, seed), "info": info}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def read_checkpoint(model_dir: str) -> None:
    """Read the weight files once, unmeasured, so that every arm loads from the page cache (not
    only the arms after the first)."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(64 * 2**20):
                pass


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
