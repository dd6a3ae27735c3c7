"""Training data in four formats, and the tokens each trains on.

    quote/author       `Quote: ...\\nAuthor: ...<eos>`, every token trained (the quotes' recipe)
    text               language modelling: the text and an EOS, every token trained
    prompt/completion  the prompt masked; the completion and its EOS trained
    messages           a conversation rendered with the tokenizer's chat template; only the
                       assistant turns trained, each with the end-of-turn the template closes it with

The format comes from the columns (`--data_format` to choose where several fit). Every example
becomes `input_ids` and `labels` (-100 where there is no loss) here, before TRL's SFTTrainer
sees it, so that one encoding serves the trainer, the count of examples too long for
`--max_seq_length`, and the label audit (`python -m gemma_qlora data`): what the audit shows is
what trains. TRL packs such a dataset as it is. Too-long examples are dropped and counted, never
cut: TRL's best-fit packing would cut them silently, and a cut conversation can lose the
answer it exists for.

Chat masks come from TRL's copy of the chat template with `{% generation %}` markers around the
assistant turns (TRL ships one for Gemma's and Gemma 3's templates; transformers turns the
markers into the assistant mask). Gemma's own template has no markers, so
`assistant_only_loss` would otherwise train nothing; in TRL's copy each assistant turn's
`<end_of_turn>` and the newline after it are inside the markers, so the model learns to stop.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict
from jinja2 import TemplateError
from transformers import AutoTokenizer
from trl.chat_template_utils import (
    gemma3_chat_template,
    get_training_chat_template,
    has_generation_markers,
    is_chat_template_stop_token_trained,
)
from trl.data_utils import common_prefix_length, maybe_convert_to_chatml

from gemma_qlora.config import DataSettings, ModelSettings, SequenceSettings, setting
from gemma_qlora.data import EVAL_SPLIT_SEED, format_quote, read_data
from gemma_qlora.errors import UserError
from gemma_qlora.model import _explain_hub_error, check_model_folder, hf_token, resolve_model

FORMATS = ("quote", "text", "prompt_completion", "messages")
COLUMNS = {"quote": ("quote", "author"), "text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",)}
FLAGS = "--quote_column/--author_column, --text_column, --prompt_column/--completion_column or --messages_column"


def data_columns(cfg) -> dict[str, tuple[str, ...]]:
    """Each format's columns as `cfg` names them."""
    return {
        "quote": (cfg.quote_column, cfg.author_column),
        "text": (cfg.text_column,),
        "prompt_completion": (cfg.prompt_column, cfg.completion_column),
        "messages": (cfg.messages_column,),
    }


def format_of(data: Dataset) -> str:
    """The format of a dataset whose columns have their canonical names (`COLUMNS`)."""
    for fmt in ("messages", "prompt_completion", "quote", "text"):
        if all(c in data.column_names for c in COLUMNS[fmt]):
            return fmt
    raise ValueError(f"no format's columns in {data.column_names}")


def _filled(data: Dataset, columns: tuple[str, ...]) -> list[bool]:
    values = [data[c] for c in columns]
    return [all(v is not None for v in row) for row in zip(*values)]


def detect_format(data: Dataset, cfg, name: str) -> str:
    """The format whose columns `data` has: `cfg.data_format`, or the only one that fits."""
    if cfg.data_format not in ("auto", *FORMATS):
        raise UserError(f"--data_format must be auto or one of {', '.join(FORMATS)}, not {cfg.data_format!r}.")
    columns = data_columns(cfg)
    present = [f for f in FORMATS if all(c in data.column_names for c in columns[f])]
    if cfg.data_format != "auto":
        if cfg.data_format not in present:
            raise UserError(
                f"Dataset {name} has no column {', '.join(repr(c) for c in columns[cfg.data_format] if c not in data.column_names)} "
                f"for --data_format {cfg.data_format} (it has {data.column_names}): name yours with {FLAGS}."
            )
        return cfg.data_format
    if not present:
        raise UserError(
            f"Dataset {name} has columns {data.column_names}, none of a known format (quote/author, text, prompt/completion, "
            f"messages): name yours with {FLAGS}."
        )
    if len(present) == 1:
        return present[0]
    filled = {f: _filled(data, columns[f]) for f in present}
    complete = [f for f in present if all(filled[f])]
    if len(complete) == len(present):
        raise UserError(
            f"Dataset {name} has the columns of several formats ({', '.join(present)}): choose one with --data_format."
        )
    counts = ", ".join(f"{sum(filled[f])} rows {f}" for f in present)
    raise UserError(f"Dataset {name} mixes formats ({counts}): keep one format per dataset, or choose one with --data_format.")


def _text(content, row: int) -> str:
    """A turn's content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text") or "" for p in content)
    raise UserError(f"Row {row}: a turn's content must be text (this recipe trains on text only), not {str(content)[:60]!r}.")


def _conversation(messages, row: int) -> list[dict]:
    """One conversation as [{role, content}] with text content; the roles are left to the chat
    template to accept or refuse, but Gemma's "model" is the assistant, and an answer is needed."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise UserError(f"Row {row}: messages must be a non-empty list of {{role, content}}, not {str(messages)[:60]!r}.")
    messages = maybe_convert_to_chatml({"messages": messages})["messages"]  # ShareGPT's from/value, as TRL reads them
    turns = []
    for message in messages:
        role = message.get("role")
        if not isinstance(role, str) or "content" not in message:
            raise UserError(f"Row {row}: every message needs a role and a content, not {str(message)[:60]!r}.")
        turns.append({"role": "assistant" if role == "model" else role, "content": _text(message["content"], row)})
    answers = [t for t in turns if t["role"] == "assistant"]
    if not answers:
        raise UserError(f"Row {row} has no assistant turn, so nothing to learn: give each conversation an answer.")
    if any(not t["content"].strip() for t in answers):
        raise UserError(f"Row {row} has an empty assistant turn: remove it or give it the answer.")
    return turns


def select_format(data: Dataset, fmt: str, cfg, name: str) -> Dataset:
    """The format's columns under their canonical names, each example checked, and its `row` in
    `data` (from 1), by which an error found after the split still names it."""
    columns = data_columns(cfg)[fmt]
    data = data.select_columns(list(columns))
    renames = {c: canon for c, canon in zip(columns, COLUMNS[fmt]) if c != canon}
    if renames:
        data = data.rename_columns(renames)
    rows = list(range(1, len(data) + 1))
    if fmt == "quote":  # as always: rows without a quote or an author are left out
        for column in COLUMNS[fmt]:
            for row, value in zip(rows, data[column]):
                if value is not None and not isinstance(value, str):
                    raise UserError(f"Row {row} of {name}: {column} must be text, not {str(value)[:60]!r}: "
                                    "write it in quotes in your file, or remove the row.")
        data = data.add_column("row", rows)
        return data.filter(lambda r: bool(r["quote"] and r["author"] and r["quote"].strip() and r["author"].strip()))
    if fmt == "messages":
        return Dataset.from_dict({"messages": [_conversation(m, row) for row, m in zip(rows, data["messages"])], "row": rows})
    for column in COLUMNS[fmt]:
        for row, value in zip(rows, data[column]):
            if not isinstance(value, str):
                hint = ": for conversations use a messages column" if isinstance(value, list) else ""
                raise UserError(f"Row {row} of {name}: {column} must be text, not {str(value)[:60]!r}{hint}.")
            if column != "prompt" and not value.strip():
                raise UserError(f"Row {row} of {name} has an empty {column}: remove it or fill it in.")
    return data.add_column("row", rows)


# --- the chat template ---------------------------------------------------------------------


def use_chat_template(tokenizer, cfg) -> None:
    """Give `tokenizer` the chat template `cfg.chat_template` names: 'gemma3' (Gemma 3's own) or
    a .jinja file; by default it keeps its own. The embedded Gemma 3 270M gets Gemma 3's: Google
    ships that model with it, but the GGUF the embedded copy comes from left it out."""
    choice = cfg.chat_template
    if choice is None and cfg.model == "embedded" and not tokenizer.chat_template:
        choice = "gemma3"
    if choice is None:
        return
    if choice == "gemma3":
        tokenizer.chat_template = gemma3_chat_template
        return
    path = Path(choice).expanduser()
    if not path.is_file():
        raise UserError(f"--chat_template {choice} is neither gemma3 nor an existing .jinja file.")
    tokenizer.chat_template = path.read_text()


def training_template(tokenizer) -> str:
    """The chat template to render conversations with: the tokenizer's, with `{% generation %}`
    markers around each assistant turn and its end-of-turn (TRL's marked copy where it has none)."""
    template = tokenizer.chat_template
    if not template:
        raise UserError(
            "The model's tokenizer has no chat template, which messages data needs: pass --chat_template gemma3 "
            "(Gemma 3's) or a .jinja file, or use a model whose tokenizer has one."
        )
    if isinstance(template, dict):
        template = template.get("default")
    if not has_generation_markers(template):
        try:
            template = get_training_chat_template(tokenizer) or template
        except ValueError:
            raise UserError(
                "The tokenizer's chat template marks no assistant turn ({% generation %}) and is not one whose marked copy "
                "TRL ships (Gemma's, Gemma 3's): pass --chat_template gemma3, or a .jinja file with the markers around "
                "each assistant turn and its end-of-turn."
            ) from None
    if not is_chat_template_stop_token_trained(tokenizer, chat_template=template):
        raise UserError(
            "The chat template leaves the assistant's end-of-turn token outside its {% generation %} markers, so the model "
            "would never learn to stop: move the end-of-turn inside them (--chat_template FILE) or use --chat_template gemma3."
        )
    return template


# --- encoding ------------------------------------------------------------------------------


@dataclass
class Counts:
    """What one split trains on."""

    examples: int = 0  # kept
    too_long: int = 0  # dropped: longer than --max_seq_length
    trained: int = 0  # tokens with a label
    masked: int = 0  # tokens without one (prompts, user and system turns, the first token)
    longest_kept: int = 0
    shortest_dropped: int | None = None
    format: str = ""


def _encoder(tokenizer, fmt: str):
    """The function from one example (with its 1-based row) to `input_ids` and `labels`."""
    eos = tokenizer.eos_token
    template = training_template(tokenizer) if fmt == "messages" else None

    def with_eos(text: str) -> str:
        return text if text.endswith(eos) else text + eos

    def encode(example: dict, row: int) -> dict:
        if fmt == "messages":
            try:
                out = tokenizer.apply_chat_template(
                    example["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=template
                )
            except TemplateError as error:
                raise UserError(f"Row {row}: the chat template refuses this conversation ({error.message}).") from None
            ids = list(out["input_ids"])
            labels = [i if m else -100 for i, m in zip(ids, out["assistant_masks"])]
        elif fmt == "prompt_completion":
            # As TRL does: the completion starts where the prompt's tokens and the whole example's differ
            prompt = tokenizer(example["prompt"])["input_ids"]
            ids = tokenizer(with_eos(example["prompt"] + example["completion"]))["input_ids"]
            start = common_prefix_length(prompt, ids)
            labels = [-100] * start + ids[start:]
        else:
            if fmt == "quote":
                text = format_quote(example["quote"], example["author"], eos)
            else:
                text = with_eos(example["text"])
            ids = tokenizer(text)["input_ids"]
            labels = list(ids)
        labels[0] = -100  # nothing comes before the first token, so it is never a target
        if all(label == -100 for label in labels):
            why = ": the chat template marks none of its assistant text" if fmt == "messages" else ""
            raise UserError(f"Row {row} has no token to train on{why}.")
        return {"input_ids": ids, "labels": labels}

    return encode


def encode_split(data: Dataset, tokenizer, *, max_length: int, what: str = "example") -> tuple[Dataset, Counts]:
    """`data` (canonical columns) with `input_ids` and `labels` added, examples longer than
    `max_length` tokens dropped; and its counts. Refuses a split none of whose examples fits."""
    fmt = format_of(data)
    encode = _encoder(tokenizer, fmt)
    rows = [encode(example, example.get("row", i + 1)) for i, example in enumerate(data)]
    encoded = data.add_column("input_ids", [r["input_ids"] for r in rows]).add_column("labels", [r["labels"] for r in rows])
    lengths = [len(r["input_ids"]) for r in rows]
    keep = [i for i, n in enumerate(lengths) if n <= max_length]
    too_long = [n for n in lengths if n > max_length]
    if not keep:
        raise UserError(
            f"Every {what} is longer than --max_seq_length {max_length} tokens (shortest: {min(lengths)}): "
            "raise --max_seq_length or use shorter examples."
        )
    if too_long:
        encoded = encoded.select(keep)
    trained = sum(sum(label != -100 for label in labels) for labels in encoded["labels"])
    counts = Counts(
        examples=len(keep), too_long=len(too_long), trained=trained, masked=sum(lengths[i] for i in keep) - trained,
        longest_kept=max(lengths[i] for i in keep), shortest_dropped=min(too_long) if too_long else None, format=fmt,
    )
    return encoded, counts


def encode_splits(data: DatasetDict, tokenizer, *, max_length: int) -> tuple[DatasetDict, dict[str, Counts]]:
    """`encode_split` on the `train` and `test` splits."""
    out, counts = {}, {}
    for split, what in (("train", "training example"), ("test", "held-out example")):
        out[split], counts[split] = encode_split(data[split], tokenizer, max_length=max_length, what=what)
    return DatasetDict(out), counts


def load_examples(cfg) -> DatasetDict:
    """`cfg.data` in its format, the format's columns under their usual names (`select_format`),
    split into `train` and a held-out `test` that stays the same whatever the training seed.
    `cfg` is a `TrainConfig` (or anything with its data fields)."""
    data = read_data(cfg.data)
    data = select_format(data, detect_format(data, cfg, cfg.data), cfg, cfg.data)
    if len(data) < 2:
        raise UserError(f"Dataset {cfg.data} has {len(data)} usable examples: it needs at least 2 (one to train, one to evaluate).")
    eval_size = min(cfg.eval_size, max(1, len(data) // 5))
    split = data.train_test_split(test_size=eval_size, seed=EVAL_SPLIT_SEED)
    if cfg.max_train_examples:
        split["train"] = split["train"].select(range(min(cfg.max_train_examples, len(split["train"]))))
    return split


def encoded_examples(cfg) -> tuple[DatasetDict, dict[str, Counts], object]:
    """`cfg.data` read, split and encoded with the model's tokenizer (chat template as `cfg`
    asks): the examples a run trains and evaluates on, its counts, and that tokenizer. Reads no
    weights, so bad data is said before a model loads."""
    data = load_examples(cfg)
    tokenizer = load_tokenizer(cfg.model)
    use_chat_template(tokenizer, cfg)
    data, counts = encode_splits(data, tokenizer, max_length=cfg.max_seq_length)
    return data, counts, tokenizer


def trainable(data: Dataset, tokenizer, *, max_length: int) -> Dataset:
    """The `input_ids` and `labels` TRL trains on: `data`'s own once encoded, else encoded here
    (dropping too-long examples, said on stderr)."""
    if "labels" not in data.column_names:
        data, counts = encode_split(data, tokenizer, max_length=max_length)
        if counts.too_long:
            print(too_long_line(counts, max_length), file=sys.stderr, flush=True)
    return data.select_columns(["input_ids", "labels"])


def too_long_line(counts: Counts, max_length: int) -> str:
    return (
        f"{counts.too_long} of {counts.examples + counts.too_long} examples are longer than --max_seq_length {max_length} "
        f"tokens (shortest of them: {counts.shortest_dropped}) and are left out, not cut: raise --max_seq_length to keep them."
    )


def counts_line(counts: Counts, max_length: int) -> str:
    total = counts.trained + counts.masked
    line = (
        f"{counts.examples:,} examples ({counts.format}), {total:,} tokens: {counts.trained:,} trained, {counts.masked:,} "
        f"masked; longest {counts.longest_kept}; {counts.too_long} longer than --max_seq_length {max_length}"
    )
    return line + (f" (left out; shortest {counts.shortest_dropped})" if counts.too_long else "")


# --- generation prompts ----------------------------------------------------------------------


def chat_prompt(messages: list[dict], tokenizer) -> str:
    """The conversation up to its first assistant turn, rendered as the model sees it when it is
    to answer, without the BOS the tokenizer adds again when it encodes the prompt."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = tokenizer.apply_chat_template(messages[:first], tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    return text[len(bos):] if bos and text.startswith(bos) else text


def generation_prompts(data: Dataset, tokenizer, *, n: int = 2) -> list[str]:
    """Prompts to generate from before and after training, from held-out examples of non-quote
    formats: chat prompts, prompts, or a text's first words."""
    fmt = format_of(data)
    rows = data.select(range(min(n, len(data))))
    if fmt == "messages":
        return [chat_prompt(m, tokenizer) for m in rows["messages"]]
    if fmt == "prompt_completion":
        return list(rows["prompt"])
    return [" ".join(t.split()[:6]) for t in rows["text"]]


def stop_at_end_of_turn(model, tokenizer) -> None:
    """Generation stops at `<end_of_turn>` as well as at EOS: a chat-trained Gemma ends its
    answer with the former (as Google's Gemma 3 generation configs say)."""
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if end is None or end == tokenizer.unk_token_id:
        return
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    model.generation_config.eos_token_id = eos + [end] if end not in eos else eos


# --- the audit: python -m gemma_qlora data ---------------------------------------------------


def show_example(ids: list[int], labels: list[int], tokenizer, *, tty: bool = False) -> str:
    """The example's text, its masked tokens [in brackets] (dim on a terminal) and its trained
    tokens plain."""
    out, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] == -100) != (labels[start] == -100):
            text = tokenizer.decode(ids[start:end])
            if labels[start] == -100:
                text = f"\033[2m{text}\033[0m" if tty else f"[{text}]"
            out.append(text)
            start = end
    return "".join(out)


@dataclass
class AuditConfig(SequenceSettings, DataSettings, ModelSettings):
    """The data audit's settings: the data, model (its tokenizer) and sequence groups a training
    run has, checked the same way, and how many examples to show."""

    show: int = setting(2, help="Training examples to print, trained tokens plain, masked ones [in brackets].")

    def _problems(self) -> list[str]:
        return [] if self.show >= 0 else [f"--show must be 0 or more, not {self.show}"]


def load_tokenizer(name: str):
    """The tokenizer of a model (hub id, folder or 'embedded'), alone."""
    path, token = resolve_model(name), hf_token()
    checked = check_model_folder(path)  # a local folder: the same checks as train (no tokenizer files, ...)
    if checked is not None:
        return checked
    try:
        return AutoTokenizer.from_pretrained(path, token=token)
    except (OSError, ValueError) as error:
        raise _explain_hub_error(name, error, token) from None


def audit(cfg: AuditConfig, *, out=None) -> dict[str, Counts]:
    """Print `cfg.show` training examples with their masked tokens apart from their trained ones,
    and each split's counts; return the counts. Writes nothing."""
    out = out or sys.stdout
    encoded, counts, tokenizer = encoded_examples(cfg)
    tty = out.isatty() if hasattr(out, "isatty") else False
    print(f"{cfg.data}: {counts['train'].format} format; trained tokens plain, masked tokens "
          f"{'dim' if tty else '[in brackets]'}", file=out)
    for i in range(min(cfg.show, len(encoded["train"]))):
        row = encoded["train"][i]
        print(f"\n--- training example {i + 1}\n{show_example(row['input_ids'], row['labels'], tokenizer, tty=tty)}", file=out)
    print(file=out)
    for split, label in (("train", "train"), ("test", "held out")):
        print(f"{label}: {counts_line(counts[split], cfg.max_seq_length)}", file=out)
    return counts
