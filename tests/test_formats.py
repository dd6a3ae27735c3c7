"""Your own data (gemma_qlora.formats): quote/author, text, prompt/completion and chat, with the
labels that reach the model through the real trainer and the package's row collator checked
against what each format must train; the label audit; multimodal Gemma 3 trained text-only;
bad input."""

import json

import pytest
import torch

from gemma_qlora.cli import main
from gemma_qlora.config import TrainConfig
from gemma_qlora.errors import UserError
from gemma_qlora.formats import load_examples
from gemma_qlora.fortunes import load_fortunes
from gemma_qlora.quant import detect_precision
from gemma_qlora.tiny import GEMMA3_CHAT_TEMPLATE, build_chat_tokenizer, save_gemma3_multimodal

CPU = detect_precision("cpu")
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
            head_dim=16, sliding_window=32, max_position_embeddings=512)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
LONG = "word " * 400  # longer than any --max_seq_length used here


@pytest.fixture(scope="module")
def records():
    """Short ASCII quotes (a token run never splits a character when decoded on its own)."""
    return [r for r in load_fortunes() if len(r["quote"]) < 90 and r["quote"].isascii() and r["author"].isascii()][:24]


@pytest.fixture(scope="module")
def tokenizer():
    return build_chat_tokenizer()


@pytest.fixture(scope="module")
def mm_model(tmp_path_factory, tokenizer):
    """A tiny multimodal Gemma 3 (SigLIP tower, projector, language model) with the chat tokenizer."""
    path = tmp_path_factory.mktemp("models") / "gemma3-multimodal"
    save_gemma3_multimodal(path, tokenizer=tokenizer, text=dict(TEXT), vision=dict(VISION))
    return str(path)


def conversation(r, i):
    """Chat examples of several shapes: a system prompt, two assistant turns, Gemma's 'model' role."""
    ask = {"role": "user", "content": f"Who said: {r['quote']}"}
    if i % 3 == 0:
        return [{"role": "system", "content": "Answer with a name."}, ask, {"role": "assistant", "content": r["author"]}]
    if i % 3 == 1:
        return [ask, {"role": "assistant", "content": r["author"]}, {"role": "user", "content": "Sure?"},
                {"role": "model", "content": "Yes."}]
    return [ask, {"role": "assistant", "content": f" {r['author']} "}]


def rows_of(fmt, records):
    """Each format's rows for `records`, plus one example longer than any length used here."""
    if fmt == "quote":
        return [dict(r) for r in records] + [{"quote": LONG, "author": "Long"}]
    if fmt == "text":
        return [{"text": r["quote"]} for r in records] + [{"text": LONG}]
    if fmt == "prompt_completion":
        return [{"prompt": f"Who said: {r['quote']}\nAnswer:", "completion": f" {r['author']}"} for r in records] + [
            {"prompt": LONG, "completion": " Long"}]
    return [{"messages": conversation(r, i)} for i, r in enumerate(records)] + [
        {"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "Long"}]}]


def expected(fmt, row, tokenizer):
    """(the example's whole text, the texts its trained token runs must decode to, in order): what
    each format trains, written down independently of the package's encoding."""
    if fmt == "messages":
        whole = tokenizer.apply_chat_template(row["messages"], tokenize=False)  # the template as it is, no markers
        return whole, [m["content"].strip() + "<end_of_turn>\n" for m in row["messages"] if m["role"] in ("assistant", "model")]
    if fmt == "prompt_completion":
        return f"<bos>{row['prompt']}{row['completion']}<eos>", [f"{row['completion']}<eos>"]
    text = f"Quote: {row['quote']}\nAuthor: {row['author']}<eos>" if fmt == "quote" else f"{row['text']}<eos>"
    return f"<bos>{text}", [text]


def trained_runs(ids, labels, tokenizer) -> list[str]:
    """The decoded runs of consecutive tokens that carry a label."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def model_inputs(trainer):
    """Every example as the model receives it: each packed row of the train and eval sets through
    the trainer's collator, cut at the examples' boundaries -> [(ids, labels)]."""
    examples = []
    for dataset in (trainer.train_dataset, trainer.eval_dataset):
        rows = [dataset[i] for i in range(len(dataset))]
        batch = trainer.data_collator(rows)
        for r, row in enumerate(rows):
            start = 0
            for length in row["seq_lengths"]:
                ids = batch["input_ids"][r, start : start + length].tolist()
                labels = batch["labels"][r, start : start + length].tolist()
                assert batch["position_ids"][r, start].item() == 0  # each example starts its own positions
                examples.append((ids, labels))
                start += length
    return examples


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.mark.parametrize("fmt", ["quote", "text", "prompt_completion", "messages"])
def test_labels_that_reach_the_model(fmt, records, tokenizer, mm_model, tmp_path, capsys):
    """Through load_examples, make_trainer (TRL's packing) and the package's row collator: every
    example that fits arrives whole, with exactly its format's tokens trained (assistant turns with
    their <end_of_turn> and newline; a completion or a text with its EOS) and every other token
    (prompt, user, system, template) masked; the one too-long example is counted and left out."""
    from gemma_qlora.model import load_model
    from gemma_qlora.trainer import make_trainer

    rows = rows_of(fmt, records)
    cfg = TrainConfig(model=mm_model, data=write_jsonl(tmp_path / f"{fmt}.jsonl", rows), bits=16, max_seq_length=192,
                      batch_size=4, eval_size=5, output_dir=str(tmp_path / "runs"))
    model, _ = load_model(cfg, CPU)
    data = load_examples(cfg)
    trainer = make_trainer(cfg, model, tokenizer, data, precision=CPU, output_dir=tmp_path / "checkpoints")
    assert "1 of" in capsys.readouterr().err  # the too-long example, said

    wanted = {}
    for row in rows[:-1]:
        whole, runs = expected(fmt, row, tokenizer)
        wanted[whole] = runs
    seen = {}
    for ids, labels in model_inputs(trainer):
        whole = tokenizer.decode(ids)
        assert whole in wanted, f"an example arrived cut or altered: {whole[:80]!r}"
        seen[whole] = trained_runs(ids, labels, tokenizer)
    assert set(seen) == set(wanted)  # all that fit, none cut, the long one left out
    for whole, runs in wanted.items():
        assert seen[whole] == runs, whole


def test_the_label_check_has_teeth(records, tokenizer):
    """The check above fails on a chat example trained whole (the prompt not masked) and on one
    whose end-of-turn is masked (a model that never learns to stop)."""
    messages = conversation(records[0], 0)
    whole, runs = expected("messages", {"messages": messages}, tokenizer)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert trained_runs(ids, list(ids), tokenizer) != runs
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    from gemma_qlora.formats import encode_split

    encoded, _ = encode_split(load_rows([{"messages": messages}]), tokenizer, max_length=512)
    labels = [-100 if t == end else label for t, label in zip(encoded[0]["input_ids"], encoded[0]["labels"])]
    assert trained_runs(encoded[0]["input_ids"], encoded[0]["labels"], tokenizer) == runs
    assert trained_runs(encoded[0]["input_ids"], labels, tokenizer) != runs


def load_rows(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def test_quote_format_trains_what_it_trained_before(records, tokenizer, tmp_path):
    """Quote data: the same token ids and trained tokens as TRL's own tokenization of the
    formatted text, as the recipe trained before the formats existed."""
    from gemma_qlora.formats import encode_split
    from test_data import to_text

    quotes = load_rows(records)
    encoded, _ = encode_split(quotes, tokenizer, max_length=512)
    texts = to_text(quotes, tokenizer.eos_token)["text"]
    for row, text in zip(encoded, texts):
        ids = tokenizer(text)["input_ids"]  # what TRL's text path does (add_special_tokens, EOS already there)
        assert row["input_ids"] == ids and row["labels"] == [-100] + ids[1:]


def test_tiny_template_is_gemma3s_verbatim(tokenizer):
    """The test tokenizer's template is Gemma 3's as shipped (which TRL recognises and marks), and
    renders as Gemma's turns."""
    from trl.chat_template_utils import gemma3_chat_template

    assert GEMMA3_CHAT_TEMPLATE == gemma3_chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        tokenize=False,
    )
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"


def test_data_command_shows_masked_apart_and_counts(records, mm_model, tmp_path, capsys):
    rows = rows_of("messages", records)
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert main(["data", "--data", path, "--model", mm_model, "--show", "2", "--max_seq_length", "192", "--eval_size", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- training example") == 2
    assert "[<bos><start_of_turn>user\n" in out  # masked, in brackets
    assert "<start_of_turn>model\n]" in out  # the prompt's end masked; the answer after it plain
    # an answer and its end-of-turn trained (plain, right after the masked prompt)
    assert any(f"]{r['author']}<end_of_turn>\n" in out for r in records)
    train_line = next(line for line in out.splitlines() if line.startswith("train:"))
    held_line = next(line for line in out.splitlines() if line.startswith("held out:"))
    assert "messages" in train_line and "trained" in train_line and "masked" in train_line
    long_total = [line for line in (train_line, held_line) if "(left out" in line]
    assert len(long_total) == 1 and "1 longer than --max_seq_length 192" in long_total[0]


@pytest.mark.parametrize("columns,flags,fmt", [
    ({"conv": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, ["--messages_column", "conv"], "messages"),
    ({"q": "a", "a": "b"}, ["--prompt_column", "q", "--completion_column", "a"], "prompt_completion"),
    ({"body": "a b c"}, ["--text_column", "body"], "text"),
    ({"text": "a", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     ["--data_format", "messages"], "messages"),
])
def test_columns_mapped_by_flags(columns, flags, fmt, tmp_path):
    from gemma_qlora.cli import parse
    from gemma_qlora.formats import format_of

    path = write_jsonl(tmp_path / "d.jsonl", [columns] * 6)
    cfg = parse(TrainConfig, ["--data", path, *flags])
    assert format_of(load_examples(cfg)["train"]) == fmt


def test_several_formats_complete_must_be_chosen(tmp_path):
    row = {"text": "a", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(UserError, match="several formats.*--data_format"):
        load_examples(TrainConfig(data=write_jsonl(tmp_path / "d.jsonl", [row] * 6)))


def test_chat_trains_on_tiny_multimodal_gemma3_in_4bit_and_the_adapter_reloads(records, mm_model, tmp_path, capsys):
    """`train --data chat.jsonl --model <multimodal Gemma 3> --bits 4`: only the language model
    loads, quantized; it trains; the adapter reloads onto the language model with the logits the
    run ended with."""
    from bitsandbytes.nn import Linear4bit

    from gemma_qlora.lora import load_adapter
    from gemma_qlora.model import load_model
    from gemma_qlora.train import STEPS, Run

    path = write_jsonl(tmp_path / "chat.jsonl", rows_of("messages", records)[:-1])
    args = ["--data", path, "--model", mm_model, "--bits", "4", "--steps", "3", "--batch_size", "4", "--max_seq_length", "128",
            "--eval_size", "4", "--output_dir", str(tmp_path / "runs"), "--max_new_tokens", "3", "--lora_dropout", "0",
            "--learning_rate", "1e-2"]
    assert main(["train", *args]) == 0
    metrics = json.loads((tmp_path / "runs" / "4bit" / "metrics.json").read_text())
    assert metrics["model_type"] == "gemma3_text" and metrics["data"]["train"]["format"] == "messages"
    assert metrics["data"]["train"]["trained"] > 0 and metrics["data"]["train"]["too_long"] == 0
    generations = json.loads((tmp_path / "runs" / "4bit" / "generations.json").read_text())
    assert generations[0]["prompt"].startswith("<start_of_turn>user\n") and generations[0]["prompt"].endswith("<start_of_turn>model\n")

    from gemma_qlora.cli import parse

    cfg = parse(TrainConfig, [*args, "--run_name", "again"])
    run = Run(cfg)
    for step in STEPS:
        getattr(run, step)()
    ids = torch.tensor([[2, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        trained = run.model(input_ids=ids).logits
    base, _ = load_model(cfg, CPU)
    assert type(base).__name__ == "Gemma3ForCausalLM" and not any("vision" in n for n, _ in base.named_modules())
    assert isinstance(base.model.layers[0].self_attn.q_proj, Linear4bit)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    reloaded = load_adapter(base, str(tmp_path / "runs" / "again" / "adapter")).eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert (trained - plain).abs().max() > 1e-3  # the adapter changes the logits...
    torch.testing.assert_close(again, trained)  # ...and reloads to the same ones

    # exported, the chat run is scored on its own held-out conversations and chat prompts
    from gemma_qlora.export import ExportConfig, export

    result = export(ExportConfig(run=str(tmp_path / "runs" / "4bit"), into="merged"))
    assert result["passed"] and result["adapter"]["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)
    assert all(p.startswith("<start_of_turn>user\n") for p in result["prompts"])

    # and `generate --run` talks to it inside the chat template
    from gemma_qlora.chat import GenerateConfig, generate_command

    capsys.readouterr()
    generate_command(GenerateConfig(run=str(tmp_path / "runs" / "4bit"), prompt=["Who said: hello"], max_new_tokens=2))
    out = capsys.readouterr()
    assert "chat template on" in out.err and "user: Who said: hello" in out.out


def test_only_the_language_model_is_read(mm_model, monkeypatch):
    """No vision or projector weight is read from the files, every text weight is, and the text
    model gives the multimodal model's logits on text."""
    import transformers.modeling_utils as modeling_utils
    from transformers import Gemma3ForConditionalGeneration

    from gemma_qlora.model import load_model

    read, real_open = set(), modeling_utils.safe_open

    class Slice:
        def __init__(self, inner, key):
            self.inner, self.key = inner, key

        def __getitem__(self, index):
            read.add(self.key)
            return self.inner[index]

        def __getattr__(self, name):
            return getattr(self.inner, name)

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def get_slice(self, key):
            return Slice(self.inner.get_slice(key), key)

        def get_tensor(self, key):
            read.add(key)
            return self.inner.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(modeling_utils, "safe_open", Recording)
    model, _ = load_model(TrainConfig(model=mm_model, bits=16), CPU)
    monkeypatch.setattr(modeling_utils, "safe_open", real_open)
    assert read and not [k for k in read if "vision" in k or "multi_modal" in k]
    assert len(read) == len([n for n in model.state_dict() if n != "lm_head.weight"])
    full = Gemma3ForConditionalGeneration.from_pretrained(mm_model, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([[2, 10, 20, 30, 40]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, full(input_ids=ids).logits)


@pytest.mark.parametrize("bits", [4, 8])
def test_gemma3n_language_model_alone(tmp_path, tokenizer, bits):
    """Gemma 3n: its language model loads alone the same way, quantized, and LoRA trains on it in
    training mode (where AltUp clamps its own weights, which therefore stay unquantized)."""
    from safetensors.torch import save_file
    from transformers import Gemma3nConfig, Gemma3nForCausalLM, Gemma3nTextConfig

    from gemma_qlora.lora import attach_lora
    from gemma_qlora.model import load_model

    text = Gemma3nTextConfig(
        vocab_size=len(tokenizer), vocab_size_per_layer_input=len(tokenizer), hidden_size=64, hidden_size_per_layer_input=8,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        sliding_window=32, num_kv_shared_layers=2, laurel_rank=4, activation_sparsity_pattern=[0.0] * 4,
        layer_types=["sliding_attention", "full_attention"] * 2, altup_num_inputs=2, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    torch.manual_seed(0)
    weights = Gemma3nForCausalLM(text).state_dict()
    # a multimodal checkpoint's layout: the language model under model.language_model, beside the towers
    saved = {"model.language_model." + k[len("model."):]: v.contiguous() for k, v in weights.items() if k.startswith("model.")}
    saved["model.vision_tower.timm_model.conv_stem.weight"] = torch.randn(8, 3, 3, 3)
    saved["model.audio_tower.subsample.weight"] = torch.randn(8, 8)
    save_file(saved, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    Gemma3nConfig(text_config=text.to_dict()).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    cfg = TrainConfig(model=str(tmp_path), bits=bits, lora_dropout=0.0)
    model, _ = load_model(cfg, CPU)
    assert type(model).__name__ == "Gemma3nForCausalLM"
    assert type(model.model.layers[0].altup.prediction_coefs) is torch.nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is not torch.nn.Linear  # quantized
    model = attach_lora(model, cfg).train()
    ids = torch.tensor([[2, 10, 20, 30, 40]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)


def bad(tmp_path, rows):
    return write_jsonl(tmp_path / "bad.jsonl", rows)


@pytest.mark.parametrize("case", ["no_template", "role_refused", "empty_answer", "mixed", "all_too_long", "no_answer"])
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_model, mm_model, tmp_path, capsys):
    ask = {"role": "user", "content": "Who said it?"}
    answer = {"role": "assistant", "content": "Me."}
    model, rows, says = mm_model, [{"messages": [ask, answer]}] * 6, ""
    if case == "no_template":  # the conftest tokenizer has no chat template
        model, says = tiny_model, "no chat template"
    elif case == "role_refused":  # two user turns in a row: Gemma's template refuses
        rows = [{"messages": [ask, answer]}] * 3 + [{"messages": [ask, ask, answer]}] + [{"messages": [ask, answer]}] * 2
        says = "Row 4: the chat template refuses this conversation"  # the row in the file, whichever split it fell in
    elif case == "empty_answer":
        rows, says = [{"messages": [ask, answer]}] * 5 + [{"messages": [ask, {"role": "assistant", "content": " "}]}], "Row 6 has an empty assistant turn"
    elif case == "mixed":
        rows, says = [{"messages": [ask, answer]}] * 3 + [{"text": "a text"}] * 3, "mixes formats"
    elif case == "all_too_long":
        rows, says = [{"messages": [{"role": "user", "content": LONG}, answer]}] * 6, "Every training example is longer"
    elif case == "no_answer":
        rows, says = [{"messages": [ask]}] * 6, "no assistant turn"
    path, out = bad(tmp_path, rows), tmp_path / "runs"
    for command in (["train", "--output_dir", str(out), "--bits", "4"], ["data"]):
        assert main([*command, "--data", path, "--model", model, "--max_seq_length", "128"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and "\n" not in err, err
    assert not [p for p in out.rglob("*") if p.is_file()] if out.exists() else True
