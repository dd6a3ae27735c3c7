"""Tiny random Gemma models and a tiny tokenizer, built here: no test touches the Hub."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.pop("HF_TOKEN", None)
torch.set_num_threads(2)

FAMILIES = ("gemma", "gemma2", "gemma3_text")

from gemma_qlora.tiny import build_tokenizer  # noqa: E402  (re-exported: tests import it from here)


def build_config(family: str, vocab_size: int):
    from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    if family == "gemma":
        return GemmaConfig(**common)
    if family == "gemma2":
        return Gemma2Config(**common, sliding_window=32)
    return Gemma3TextConfig(**common, sliding_window=32)


def save_tiny_model(path, family: str = "gemma3_text", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_config(build_config(family, len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: folder} for Gemma 1, Gemma 2 and Gemma 3 text."""
    root = tmp_path_factory.mktemp("models")
    return {f: str(save_tiny_model(root / f, f)) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_model(tiny_models):
    return tiny_models["gemma3_text"]


@pytest.fixture(scope="session")
def quotes_file(tmp_path_factory):
    """60 real fortunes records (parsed by the package) as a local .jsonl dataset."""
    from gemma_qlora.fortunes import load_fortunes

    path = tmp_path_factory.mktemp("data") / "quotes.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in load_fortunes()[:60]))
    return str(path)


@pytest.fixture
def fast_cfg(tiny_model, quotes_file, tmp_path):
    """Settings for a run that takes seconds on CPU."""
    from gemma_qlora.config import TrainConfig

    def make(**overrides):
        settings = dict(
            model=tiny_model,
            data=quotes_file,
            steps=4,
            batch_size=4,
            max_seq_length=128,
            eval_size=8,
            logging_steps=1,
            output_dir=str(tmp_path / "runs"),
            max_new_tokens=4,
            learning_rate=1e-3,
        )
        settings.update(overrides)
        return TrainConfig(**settings)

    return make
