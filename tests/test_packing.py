"""Packed rows (gemma_qlora.packing): examples kept apart, the same loss as TRL's flattened
batches, padding never trained on or counted, one shape for compiled code."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer, pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from gemma_qlora.data import format_quote
from gemma_qlora.errors import UserError
from gemma_qlora.fortunes import load_fortunes
from gemma_qlora.packing import make_collator

MAX_LENGTH = 128


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def bins(tokenizer):
    """TRL's BFD bins of 16 quotes: rows of several examples each, some shorter than MAX_LENGTH."""
    ids = [tokenizer(format_quote(r["quote"], r["author"], tokenizer.eos_token))["input_ids"] for r in load_fortunes()[:16]]
    packed = list(pack_dataset(Dataset.from_dict({"input_ids": ids}), MAX_LENGTH, "bfd"))
    assert all(sum(b["seq_lengths"]) == len(b["input_ids"]) <= MAX_LENGTH for b in packed)
    return packed


def batch_of(bins):
    """Three bins: two of several examples, and one shorter than the others (so padded)."""
    several = [b for b in bins if len(b["seq_lengths"]) > 1]
    chosen = sorted(several, key=lambda b: len(b["input_ids"]), reverse=True)[:3]
    assert len(chosen) == 3 and len(chosen[-1]["input_ids"]) < len(chosen[0]["input_ids"])
    return chosen


def load(path, attn):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()


def worst_gap(model, batch, examples) -> float:
    """Largest difference between each example's logits inside the packed batch and alone."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        gap = 0.0
        for row, example in enumerate(examples):
            start = 0
            for length in example["seq_lengths"]:
                alone = model(torch.tensor([example["input_ids"][start : start + length]]), use_cache=False).logits[0]
                gap = max(gap, (logits[row, start : start + length] - alone).abs().max().item())
                start += length
    return gap


@pytest.mark.parametrize(
    "family,attn,fixed_shape",
    [("gemma3_text", "eager", False), ("gemma3_text", "sdpa", False), ("gemma", "sdpa", False), ("gemma2", "eager", False),
     ("gemma3_text", "sdpa", True)],
)
def test_examples_in_rows_do_not_attend_to_each_other(tiny_models, tokenizer, bins, family, attn, fixed_shape):
    """Each example's logits inside a batch of packed rows (batch > 1, padding at a row's end)
    equal its logits alone. Gemma 3's sliding window (32 tokens here) is shorter than the quotes."""
    examples = batch_of(bins)
    collate = make_collator(tokenizer, max_length=MAX_LENGTH, fixed_shape=fixed_shape, batch_size=4)
    batch = collate(examples)
    assert batch["input_ids"].shape[0] == (4 if fixed_shape else 3)
    assert worst_gap(load(tiny_models[family], attn), batch, examples) < 1e-4


def test_the_check_has_teeth_position_ids_that_do_not_restart_mix_examples(tiny_model, tokenizer, bins):
    """The same check fails on the same rows when the position ids run on across examples:
    transformers then sees one sequence per row and the examples attend to each other."""
    examples = batch_of(bins)
    batch = make_collator(tokenizer, max_length=MAX_LENGTH)(examples)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    assert worst_gap(load(tiny_model, "sdpa"), batch, examples) > 1e-2


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_loss_equals_trl_flattened_batch(tiny_model, tokenizer, bins, attn):
    """Rows and TRL's padding-free single row hold the same targets, so the same loss."""
    examples = batch_of(bins)
    rows = make_collator(tokenizer, max_length=MAX_LENGTH)(examples)
    flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
    assert flat["input_ids"].shape[0] == 1 and rows["input_ids"].shape[0] == 3
    assert (rows["labels"] != -100).sum() == (flat["labels"] != -100).sum()
    model = load(tiny_model, attn)
    with torch.no_grad():
        row_loss = model(**rows, use_cache=False).loss
        flat_loss = model(**flat, use_cache=False).loss
    torch.testing.assert_close(row_loss, flat_loss, atol=1e-5, rtol=1e-5)


def test_padding_is_neither_a_target_nor_a_counted_token(tokenizer, bins):
    examples = batch_of(bins)
    batch = make_collator(tokenizer, max_length=MAX_LENGTH)(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    real = batch["input_ids"] != tokenizer.pad_token_id  # how the Trainer counts non-padding tokens
    assert real.sum(dim=1).tolist() == lengths
    # targets: every token but each example's first (no target across examples), never padding
    assert (batch["labels"][~real] == -100).all()
    assert (batch["labels"] != -100).sum() == sum(sum(e["seq_lengths"]) - len(e["seq_lengths"]) for e in examples)
    # position ids restart at every example and run on through the padding
    positions = batch["position_ids"][2].tolist()
    expected = [p for n in examples[2]["seq_lengths"] for p in range(n)]
    assert positions[: len(expected)] == expected
    assert positions[len(expected) :] == list(range(expected[-1] + 1, expected[-1] + 1 + len(positions) - len(expected)))


def test_fixed_shape_is_batch_by_max_length(tokenizer, bins):
    """For compiled code: every batch batch_size x max_length, a short one filled with padding rows."""
    batch = make_collator(tokenizer, max_length=MAX_LENGTH, fixed_shape=True, batch_size=4)(batch_of(bins)[:2])
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].shape == (4, MAX_LENGTH)
    assert (batch["input_ids"][2:] == tokenizer.pad_token_id).all() and (batch["labels"][2:] == -100).all()
    assert batch["position_ids"][3].tolist() == list(range(MAX_LENGTH))


def test_attention_that_ignores_the_mask_is_refused(tokenizer):
    with pytest.raises(UserError, match="need attention that takes a mask"):
        make_collator(tokenizer, max_length=MAX_LENGTH, attn_implementation="flash_attention_2")


def test_sft_trainer_trains_on_rows_and_counts_real_tokens(tiny_model, tokenizer, tmp_path):
    """TRL's BFD packing with the row collator set on the trainer: batches of rows, one epoch
    counts exactly the dataset's tokens (padding not counted), and the loss is finite."""
    texts = [format_quote(r["quote"], r["author"]) for r in load_fortunes()[:24]]
    args = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=MAX_LENGTH, packing=True, packing_strategy="bfd",
        num_train_epochs=1, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
        include_num_input_tokens_seen="non_padding", dataloader_drop_last=False,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer)
    trainer.data_collator = make_collator(tokenizer, max_length=MAX_LENGTH)
    first = next(iter(trainer.get_train_dataloader()))
    assert first["input_ids"].shape[0] == 2 and "attention_mask" not in first
    trainer.train()
    assert trainer.state.num_input_tokens_seen == sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
