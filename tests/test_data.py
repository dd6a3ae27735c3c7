import json

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from gemma_qlora.config import TrainConfig
from gemma_qlora.data import format_quote
from gemma_qlora.errors import UserError
from gemma_qlora.formats import load_examples


def load_quotes(data, **settings):
    return load_examples(TrainConfig(data=data, data_format="quote", **settings))


def to_text(data: Dataset, eos_token: str) -> Dataset:
    """The formatted text alone, as a plain TRL user trains on it."""
    return data.map(lambda r: {"text": format_quote(r["quote"], r["author"], eos_token)}, remove_columns=data.column_names)


def test_format():
    assert format_quote(" Be yourself. ", "Oscar Wilde", "<eos>") == "Quote: Be yourself.\nAuthor: Oscar Wilde<eos>"


def test_split_is_fixed_and_disjoint(quotes_file):
    a = load_quotes(quotes_file, eval_size=8)
    b = load_quotes(quotes_file, eval_size=8)
    assert len(a["test"]) == 8 and len(a["train"]) == 52
    assert a["test"]["quote"] == b["test"]["quote"]
    assert not set(a["test"]["quote"]) & set(a["train"]["quote"])


def trained_text(trainer, index=0):
    """The text of the tokens that carry a label in the batch the trainer would train on."""
    batch = trainer.data_collator([trainer.train_dataset[index]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    return trainer.processing_class.decode(ids[labels != -100])


def make_trainer(tiny_model, tmp_path, dataset, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    args = SFTConfig(output_dir=str(tmp_path), max_length=128, report_to="none", use_cpu=True)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs)


def test_author_reaches_the_labels(tiny_model, quotes_file, tmp_path):
    quotes = load_quotes(quotes_file, eval_size=8)["train"]
    trainer = make_trainer(tiny_model, tmp_path, to_text(quotes, "<eos>"))
    text = trained_text(trainer)
    assert f"Author: {quotes[0]['author']}" in text
    assert text.endswith("<eos>")


def test_seed_notebooks_bug_pretokenized_drops_the_author(tiny_model, quotes_file, tmp_path):
    """What the seed notebooks did: tokenized quotes plus a formatting_func. TRL ignores the
    function, so no author is ever trained on. Our to_text() path is the fix (test above)."""
    quotes = load_quotes(quotes_file, eval_size=8)["train"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pretokenized = quotes.map(lambda r: tokenizer(r["quote"]))
    trainer = make_trainer(
        tiny_model, tmp_path, pretokenized, formatting_func=lambda r: format_quote(r["quote"], r["author"])
    )
    assert quotes[0]["author"] not in trained_text(trainer)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_missing_columns_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "who": "b"}] * 5)
    with pytest.raises(UserError, match="no column 'quote', 'author'.*--quote_column"):
        load_quotes(path)


def test_configured_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"q{i}", "who": "b"} for i in range(10)])
    data = load_quotes(path, quote_column="text", author_column="who", eval_size=2)
    assert data["train"].column_names == ["quote", "author", "row"]


def test_empty_dataset(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"quote": "", "author": ""}] * 3)
    with pytest.raises(UserError, match="0 usable"):
        load_quotes(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_quotes(str(tmp_path / "none.jsonl"))


def test_all_examples_too_long(tiny_model):
    from gemma_qlora.formats import encode_split

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = Dataset.from_dict({"text": ["word " * 200] * 3})
    with pytest.raises(UserError, match="longer than --max_seq_length 16"):
        encode_split(texts, tokenizer, max_length=16)
