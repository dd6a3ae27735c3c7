"""Quote/author data: load it, check it, split it and format it as training text.

Each example becomes `Quote: ...\\nAuthor: ...<eos>` in a `text` column, and that text is
what `SFTTrainer` tokenizes. (The seed notebooks pre-tokenized the quotes, so the trainer
ignored their formatting function and the authors never reached the labels.)
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from gemma_qlora.errors import UserError

EVAL_SPLIT_SEED = 1234  # the held-out split stays the same whatever the training seed
PROMPTS = ["Quote: Imagination is more", "Quote: Outside of a dog, a book is man's"]


def format_quote(quote: str, author: str, eos_token: str = "") -> str:
    return f"Quote: {quote.strip()}\nAuthor: {author.strip()}{eos_token}"


def quote_prompt(quote: str) -> str:
    """The prompt whose continuation is the author: everything before the author's name."""
    return f"Quote: {quote.strip()}\nAuthor:"


def _read(name: str) -> Dataset:
    if name == "embedded":
        from gemma_qlora.fortunes import load_fortunes

        return Dataset.from_list(load_fortunes())
    path = Path(name).expanduser()
    if path.suffix in {".json", ".jsonl", ".csv", ".parquet"}:
        if not path.is_file():
            raise UserError(f"Data file {name} does not exist.")
        kind = {".jsonl": "json"}.get(path.suffix, path.suffix[1:])
        return load_dataset(kind, data_files=str(path), split="train")
    if path.is_dir():
        loaded = load_from_disk(str(path))
        return loaded["train"] if isinstance(loaded, DatasetDict) else loaded
    if name.startswith((".", "/", "~")):
        raise UserError(f"Data path {name} does not exist.")
    from gemma_qlora.model import hf_token

    try:
        return load_dataset(name, split="train", token=hf_token())
    except Exception as error:  # datasets raises many types for a missing/unreachable dataset
        raise UserError(
            f"Could not load dataset {name} ({type(error).__name__}): check the id (e.g. Abirate/english_quotes), "
            "your connection, or use --data embedded / a local file."
        ) from None


def load_quotes(
    name: str,
    *,
    quote_column: str = "quote",
    author_column: str = "author",
    eval_size: int = 200,
    max_train_examples: int | None = None,
) -> DatasetDict:
    """Records with `quote` and `author`, split into `train` and a fixed held-out `test`."""
    data = _read(name)
    missing = [c for c in (quote_column, author_column) if c not in data.column_names]
    if missing:
        raise UserError(
            f"Dataset {name} has no column {', '.join(map(repr, missing))} (it has {data.column_names}): "
            "use --quote_column/--author_column to name the right ones."
        )
    data = data.select_columns([quote_column, author_column])
    if (quote_column, author_column) != ("quote", "author"):
        data = data.rename_columns({quote_column: "quote", author_column: "author"})
    data = data.filter(lambda r: bool(r["quote"] and r["author"] and r["quote"].strip() and r["author"].strip()))
    if len(data) < 2:
        raise UserError(f"Dataset {name} has {len(data)} usable quote/author rows: it needs at least 2 (one to train, one to evaluate).")
    eval_size = min(eval_size, max(1, len(data) // 5))
    split = data.train_test_split(test_size=eval_size, seed=EVAL_SPLIT_SEED)
    if max_train_examples:
        split["train"] = split["train"].select(range(min(max_train_examples, len(split["train"]))))
    return split


def to_text(data: Dataset, eos_token: str) -> Dataset:
    """The one `text` column SFTTrainer trains on."""
    return data.map(lambda r: {"text": format_quote(r["quote"], r["author"], eos_token)}, remove_columns=data.column_names)


def check_fits(texts: Dataset, tokenizer, max_seq_length: int) -> None:
    """Refuse a dataset none of whose examples fits the sequence length."""
    lengths = [len(ids) for ids in tokenizer(texts["text"][:1000])["input_ids"]]
    if min(lengths) > max_seq_length:
        raise UserError(
            f"Every example is longer than --max_seq_length {max_seq_length} tokens (shortest: {min(lengths)}): "
            "raise --max_seq_length or use shorter texts."
        )
