"""Quote/author data: load it, check it, split it and format it as training text.

Each example becomes `Quote: ...\\nAuthor: ...<eos>` in a `text` column, and that text is
what `SFTTrainer` tokenizes. (The seed notebooks pre-tokenized the quotes, so the trainer
ignored their formatting function and the authors never reached the labels.)
"""

from __future__ import annotations

import codecs
import json
import logging
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from gemma_qlora.errors import UserError
from gemma_qlora.fortunes import load_fortunes
from gemma_qlora.model import hf_token

EVAL_SPLIT_SEED = 1234  # the held-out split stays the same whatever the training seed
PROMPTS = ["Quote: Imagination is more", "Quote: Outside of a dog, a book is man's"]


def format_quote(quote: str, author: str, eos_token: str = "") -> str:
    return f"Quote: {quote.strip()}\nAuthor: {author.strip()}{eos_token}"


def quote_prompt(quote: str) -> str:
    """The prompt whose continuation is the author: everything before the author's name."""
    return f"Quote: {quote.strip()}\nAuthor:"


# suffix -> (datasets' builder, the format's name in messages)
FILE_FORMATS = {".json": ("json", "JSON"), ".jsonl": ("json", "JSON Lines"), ".csv": ("csv", "CSV"), ".parquet": ("parquet", "Parquet")}


def read_data(name: str) -> Dataset:
    """`--data` as one dataset: the embedded quotes, a local file or folder, or a Hub dataset."""
    if name == "embedded":
        return Dataset.from_list(load_fortunes())
    path = Path(name).expanduser()
    if path.suffix.lower() in FILE_FORMATS:
        if not path.is_file():
            raise UserError(f"Data file {name} does not exist.")
        return _read_file(path)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        raise UserError(f"Data file {name} is not a format this tool reads ({path.suffix or 'no extension'}): "
                        f"give a {', '.join(FILE_FORMATS)} file.")
    if name.startswith((".", "/", "~")):
        raise UserError(f"Data path {name} does not exist.")
    try:
        return load_dataset(name, split="train", token=hf_token())
    except Exception as error:  # datasets raises many types for a missing/unreachable dataset
        raise UserError(
            f"Could not load dataset {name} ({type(error).__name__}): check the id (e.g. Abirate/english_quotes), "
            "your connection, or use --data embedded / a local file."
        ) from None


def _read_file(path: Path) -> Dataset:
    """A local data file, or one line naming the file, its format, what is wrong and what to do.
    The cheap checks (empty, not UTF-8, no rows, not Parquet) come first because datasets reports
    each of them as a traceback of its own internals."""
    builder, kind = FILE_FORMATS[path.suffix.lower()]
    what = f"Data file {path} ({kind})"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(4)
            if builder == "parquet" and size >= 8:
                f.seek(-4, 2)
                tail = f.read(4)
    except OSError as error:
        raise UserError(f"{what} cannot be read ({error.strerror}).") from None
    if size == 0:
        raise UserError(f"{what} is empty: it needs a {_shape(builder)}.")
    if builder == "parquet":
        if size < 8 or head != b"PAR1" or tail != b"PAR1":
            raise UserError(f"{what} is not a Parquet file (no PAR1 marker at its start and end): is it another format, or truncated?")
    else:
        rows = _text_rows(path, what)
        if rows == 0 or (builder == "csv" and rows == 1):
            raise UserError(f"{what} holds {'only a header and ' if rows else ''}no rows: it needs a {_shape(builder)}.")
    try:
        with _quiet_datasets():
            return load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets/pyarrow raise many types for a malformed file
        detail = _bad_json_line(path) if path.suffix.lower() == ".jsonl" else None
        raise UserError(f"{what} could not be read: {detail or _root_cause(error)}. Fix the file or convert it to a {_shape(builder)}.") from None


def _shape(builder: str) -> str:
    return {
        "json": "JSON object per line with quote and author fields (or a JSON list of such objects)",
        "csv": "header line (e.g. quote,author) and one row per example",
        "parquet": "Parquet table with quote and author columns",
    }[builder]


def _text_rows(path: Path, what: str) -> int:
    """Non-blank lines (counted up to 2) of a text file that must be UTF-8: anything else is
    refused here with where it stops being UTF-8 (datasets would decode some rows and fail later)."""
    decoder, rows, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 0, 1
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            if offset == 0 and chunk[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise UserError(f"{what} is UTF-16 text: convert it to UTF-8, e.g. iconv -f utf-16 -t utf-8 {path.name} > utf8-{path.name}.")
            if b"\0" in chunk:
                raise UserError(f"{what} is binary (it holds NUL bytes), not text: is it compressed, or another format?")
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as error:
                at = offset + error.start
                line += chunk[: error.start].count(b"\n")
                raise UserError(
                    f"{what} is not UTF-8 (byte 0x{chunk[error.start]:02x} on line {line}, offset {at}): convert it to UTF-8, "
                    f"e.g. iconv -f cp1252 -t utf-8 {path.name} > utf8-{path.name} for a Windows or Latin-1 file."
                ) from None
            if rows < 2:
                rows += sum(1 for ln in text.splitlines() if ln.strip())
            offset += len(chunk)
            line += chunk.count(b"\n")
    return min(rows, 2)


def _bad_json_line(path: Path) -> str | None:
    """The first line of a JSON Lines file that is not a JSON object, said the way a user finds it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            parsed, ok = True, isinstance(json.loads(ln), dict)
        except ValueError:
            parsed, ok = False, False
        if not ok:
            cut = " (the file looks truncated)" if i == last and not parsed else ""
            return f"line {i + 1} is not a JSON object{cut}: {ln.strip()[:60]!r}"
    return None


def _root_cause(error: BaseException) -> str:
    """The innermost error of datasets' chain: the one that names what is wrong with the file."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:200]}"


class _quiet_datasets:
    """datasets logs its own error line before raising; the one-line message here says it better."""

    def __enter__(self):
        self.logger = logging.getLogger("datasets")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        return False


def _read_folder(path: Path) -> Dataset:
    """A dataset saved with save_to_disk: its train split, or its only one."""
    try:
        with _quiet_datasets():
            loaded = load_from_disk(str(path))
    except Exception as error:  # FileNotFoundError for a plain folder, pyarrow errors for damaged files
        raise UserError(
            f"Data folder {path} is not a dataset saved with save_to_disk ({_root_cause(error)}): "
            f"give that folder, or a {', '.join(FILE_FORMATS)} file."
        ) from None
    if not isinstance(loaded, DatasetDict):
        return loaded
    if "train" in loaded or len(loaded) == 1:
        return loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    raise UserError(f"Data folder {path} holds the splits {list(loaded)} but no 'train' split: save the training split as train.")


CHAT_QUESTION = 'Who said: "{quote}"?'


def quote_conversation(quote: str, author: str) -> dict:
    """A quote as a chat example: the user asks who said it, the assistant names the author."""
    return {"messages": [{"role": "user", "content": CHAT_QUESTION.format(quote=quote)}, {"role": "assistant", "content": author}]}


def write_quotes_as_chat(data: DatasetDict, path: str | Path) -> Path:
    """Every quote of `data`'s splits as a chat example, one JSON line each (the `messages`
    format of `gemma_qlora.formats`); returns the file."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [quote_conversation(q, a) for split in data.values() for q, a in zip(split["quote"], split["author"])]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
