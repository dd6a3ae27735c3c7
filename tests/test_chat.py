"""The generate command: prompts from flags or a file, streamed token by token, chat template
when the tokenizer has one, a run's adapter or a plain model, and one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest

from gemma_qlora.errors import UserError

TEMPLATE = (
    "{% for m in messages %}<bos>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[model] {% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tiny_model, tmp_path_factory):
    """The tiny Gemma 3 with a chat template in its tokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_prompts_from_flags_text_file_and_json(tmp_path):
    from gemma_qlora.chat import GenerateConfig, read_prompts

    lines = tmp_path / "prompts.txt"
    lines.write_text("Quote: one\n\nQuote: two\n")
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps(["Quote: three\nAuthor:"]))
    assert read_prompts(GenerateConfig(model="m", prompt=["Quote: zero"], prompts_file=str(lines))) == [
        "Quote: zero", "Quote: one", "Quote: two"]
    assert read_prompts(GenerateConfig(model="m", prompts_file=str(listed))) == ["Quote: three\nAuthor:"]


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (dict(model="m"), "No prompt"),
        (dict(model="m", prompts_file="/no/such/file.txt"), "does not exist"),
        (dict(model="m", prompts_file="BAD_JSON"), "not a JSON list of strings"),
    ],
)
def test_bad_prompts_are_one_line(settings, says, tmp_path):
    from gemma_qlora.chat import GenerateConfig, read_prompts

    if settings.get("prompts_file") == "BAD_JSON":
        (tmp_path / "p.json").write_text('{"prompt": "x"}')
        settings["prompts_file"] = str(tmp_path / "p.json")
    with pytest.raises(UserError) as error:
        read_prompts(GenerateConfig(**settings))
    assert says in str(error.value) and "\n" not in str(error.value)


def test_run_or_model_exactly_one():
    from gemma_qlora.chat import GenerateConfig

    for settings in (dict(), dict(run="r", model="m")):
        with pytest.raises(UserError, match="either --run"):
            GenerateConfig(prompt=["x"], **settings)


def test_streams_token_by_token_and_matches_greedy_generation(tiny_model, capsys, monkeypatch):
    from transformers import TextStreamer

    from gemma_qlora.chat import GenerateConfig, generate_command
    from gemma_qlora.evaluate import generate
    from gemma_qlora.export import load_exported
    from gemma_qlora.quant import detect_precision

    chunks = []
    finalized = TextStreamer.on_finalized_text

    def record(self, text, stream_end=False):
        chunks.append(text)
        finalized(self, text, stream_end)

    monkeypatch.setattr(TextStreamer, "on_finalized_text", record)
    prompt = "Quote: Imagination is more"
    (continuation,) = generate_command(GenerateConfig(model=tiny_model, prompt=[prompt], max_new_tokens=8))
    out = capsys.readouterr().out
    assert out == prompt + continuation + "\n"
    assert len([c for c in chunks if c]) > 1  # printed as it came, not once at the end
    model, tokenizer = load_exported(tiny_model, detect_precision("cpu"))
    assert continuation == generate(model, tokenizer, [prompt], max_new_tokens=8)[0]


def test_chat_template_is_applied_when_the_tokenizer_has_one(chat_model, capsys):
    from transformers import AutoTokenizer

    from gemma_qlora.chat import GenerateConfig, encode, generate_command

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    ids = encode(tokenizer, "hello", chat=True, device="cpu")["input_ids"][0].tolist()
    assert ids == tokenizer("[user] hello\n[model] ", add_special_tokens=True)["input_ids"]

    generate_command(GenerateConfig(model=chat_model, prompt=["hello"], max_new_tokens=3))
    captured = capsys.readouterr()
    assert captured.out.startswith("user: hello\nmodel: ") and "chat template on" in captured.err
    generate_command(GenerateConfig(model=chat_model, prompt=["hello"], max_new_tokens=3, chat=False))
    captured = capsys.readouterr()
    assert captured.out.startswith("hello") and "chat template off: --chat" in captured.err


def test_no_template_and_chat_true_is_one_line(tiny_model):
    from gemma_qlora.chat import GenerateConfig, generate_command

    with pytest.raises(UserError, match="no chat template"):
        generate_command(GenerateConfig(model=tiny_model, prompt=["x"], chat=True))


def test_generate_from_a_run_uses_its_adapter_without_the_template(fast_cfg, chat_model, capsys):
    """A run trained on plain text: its adapter on its 4-bit base, prompts sent as plain text
    even though the tokenizer has a template."""
    from gemma_qlora.chat import GenerateConfig, generate_command
    from gemma_qlora.evaluate import generate
    from gemma_qlora.export import load_adapter_model, read_run
    from gemma_qlora.quant import detect_precision
    from gemma_qlora.train import train

    cfg = fast_cfg(model=chat_model, bits=4, steps=2)
    train(cfg)
    run = f"{cfg.output_dir}/{cfg.name}"
    capsys.readouterr()
    (text,) = generate_command(GenerateConfig(run=run, prompt=["Quote: To be"], max_new_tokens=6))
    captured = capsys.readouterr()
    assert "chat template off: the run trained on plain text" in captured.err
    assert captured.out.startswith("Quote: To be")
    model, tokenizer = load_adapter_model(read_run(run)[0], __import__("pathlib").Path(run), detect_precision("cpu"))
    assert text == generate(model, tokenizer, ["Quote: To be"], max_new_tokens=6)[0]


def test_cli_generate_from_a_gguf_file(tiny_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma_qlora.cli import main
    from gemma_qlora.export import write_gguf

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    write_gguf(model, AutoTokenizer.from_pretrained(tiny_model), tmp_path / "m.gguf", qtype="f16", name="tiny")
    assert main(["generate", "--model", str(tmp_path / "m.gguf"), "--prompt", "Quote: A", "--max_new_tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Quote: A")
    assert main(["generate", "--model", str(tmp_path / "none.gguf"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
