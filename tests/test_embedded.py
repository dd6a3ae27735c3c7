"""The real embedded Gemma 3 270M (from PyPI, no Hub): slow on CPU, so marked `slow`."""

import pytest

from gemma_qlora.data import PROMPTS
from gemma_qlora.formats import load_examples
from gemma_qlora.evaluate import generate
from gemma_qlora.lora import attach_lora
from gemma_qlora.model import load_model
from gemma_qlora.quant import detect_precision
from gemma_qlora.trainer import make_trainer

pytestmark = pytest.mark.slow


def test_embedded_gemma_in_4bit_generates_and_learns(tmp_path):
    from gemma_qlora.config import TrainConfig

    cpu = detect_precision("cpu")
    model, tokenizer = load_model(TrainConfig(model="embedded", bits=4), cpu)
    assert model.config.model_type == "gemma3_text" and model.is_loaded_in_4bit
    # a real model, not random-level weights: it continues the famous quote with real words
    text = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=8)[0]
    assert len(text.split()) >= 3, text

    cfg = TrainConfig(model="embedded", data="embedded", steps=4, batch_size=1, max_seq_length=64, eval_size=8,
                      max_train_examples=8, learning_rate=1e-3, output_dir=str(tmp_path), packing=False)
    quotes = load_examples(cfg)
    quotes["test"] = quotes["train"]  # a few steps on 8 quotes must lower the loss on those quotes
    trainer = make_trainer(cfg, attach_lora(model, cfg), tokenizer, quotes, precision=cpu, output_dir=tmp_path)
    before = trainer.evaluate()["eval_loss"]
    assert 1.0 < before < 8.0  # sane: far below ln(262144) = 12.5 of a random model
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before
