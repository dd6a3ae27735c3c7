"""Export: merging a 4-bit-trained adapter both ways, GGUF written and read back, verification,
and the bad inputs. Tiny random Gemmas on CPU; bitsandbytes quantizes for real."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import build_config, save_tiny_model
from gemma_qlora.errors import UserError

TEXTS = ["Quote: Imagination is more important than knowledge.\nAuthor: Albert Einstein", "Quote: To be or not"]


def save_chat_base(path: Path, seed: int = 0) -> Path:
    """A tiny Gemma 3 whose tokenizer has Gemma's turn markers and Gemma 3's chat template, as
    Google's Gemma 3 checkpoints (and the embedded model, as the package loads it) have."""
    from transformers import AutoModelForCausalLM

    from gemma_qlora.tiny import build_chat_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_chat_tokenizer()
    AutoModelForCausalLM.from_config(build_config("gemma3_text", len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_run(root: Path, data: str, **settings) -> Path:
    from gemma_qlora.config import TrainConfig
    from gemma_qlora.train import train

    cfg = TrainConfig(**{**dict(data=data, steps=4, batch_size=4, max_seq_length=128, eval_size=8, logging_steps=1,
                                output_dir=str(root / "runs"), max_new_tokens=4, learning_rate=1e-3, bits=4), **settings})
    train(cfg)
    return root / "runs" / cfg.name


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    return save_chat_base(tmp_path_factory.mktemp("chat-base") / "base")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, quotes_file):
    """A finished 4-bit quote run of a tiny Gemma 3 whose tokenizer has a chat template (its own
    copy of the base, so tests may change it), which records its base's fingerprint."""
    from gemma_qlora.export import base_fingerprint

    root = tmp_path_factory.mktemp("export")
    base = save_chat_base(root / "base")
    run = train_run(root, quotes_file, model=str(base))
    assert json.loads((run / "metrics.json").read_text())["base"] == base_fingerprint(str(base))  # recorded by training
    return run


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, chat_base):
    """A finished 4-bit run on conversations (messages format)."""
    from gemma_qlora.fortunes import load_fortunes

    root = tmp_path_factory.mktemp("chat-run")
    rows = [{"messages": [{"role": "user", "content": f"Who said: {r['quote'][:80]}"},
                          {"role": "assistant", "content": r["author"]}]} for r in load_fortunes()[:40]]
    data = root / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return train_run(root, str(data), model=str(chat_base))


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, quotes_file, chat_base):
    """A finished 8-bit quote run (LLM.int8, quantized for real by bitsandbytes)."""
    return train_run(tmp_path_factory.mktemp("int8-run"), quotes_file, model=str(chat_base), bits=8)


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


@torch.no_grad()
def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    return model(**batch).logits.float()


def test_merge_both_ways_matches_the_adapter_model(trained_run):
    """Merged into the dequantized 4-bit weights, the model computes what the adapter model
    computes; merged into the original weights, it is off by the quantization error."""
    from gemma_qlora.export import load_adapter_model, merged_model, read_run
    from gemma_qlora.quant import detect_precision

    cfg, _ = read_run(trained_run)
    precision = detect_precision("cpu")
    adapter_model, tokenizer = load_adapter_model(cfg, trained_run, precision)
    reference = logits(adapter_model, tokenizer)
    with adapter_model.disable_adapter():
        adapter_effect = (reference - logits(adapter_model, tokenizer)).abs().max().item()
    dequantized = (logits(merged_model(cfg, trained_run, precision, base="dequantized")[0], tokenizer) - reference).abs().max().item()
    original = (logits(merged_model(cfg, trained_run, precision, base="original")[0], tokenizer) - reference).abs().max().item()

    assert adapter_effect > 1e-3  # else the comparisons below could not tell a merge from none
    assert dequantized < 1e-4 < adapter_effect / 10
    assert original < 1.0  # the NF4 rounding of a 64-wide random model, not a broken model
    assert original > 100 * dequantized  # the adapter corrected the quantized weights, not these


def test_export_merged_is_a_plain_checkpoint_verified_and_recorded(trained_run, tmp_path):
    """Refused while the output folder exists; with --overwrite, a plain bf16 checkpoint that
    scores as the adapter model does, recorded in export.json."""
    from transformers import AutoModelForCausalLM

    from gemma_qlora.export import ExportConfig, export

    run = copy_run(trained_run, tmp_path)
    out = run / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError) as error:
        export(ExportConfig(run=str(run), into="merged"))
    assert "--overwrite" in one_line(error) and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError) as error:  # --overwrite replaces only an earlier export
        export(ExportConfig(run=str(run), into="merged", overwrite=True))
    assert "not written by this command" in one_line(error) and (out / "keep.txt").read_text() == "mine"
    shutil.rmtree(out)

    export(ExportConfig(run=str(run), into="merged"))
    (out / "stale.txt").write_text("from the earlier export")
    result = export(ExportConfig(run=str(run), into="merged", overwrite=True))
    assert result["passed"] and result["out"] == str(out) and result["base"] == "dequantized"
    assert not (out / "stale.txt").exists() and not (out / "adapter_config.json").exists()
    assert not list(tmp_path.rglob("*.partial"))
    model = AutoModelForCausalLM.from_pretrained(out)  # no PEFT involved
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.bfloat16
    (entry,) = result["exports"]
    assert abs(entry["loss_drift"]) < 0.005
    assert entry["agreement"]["prompts"] == len(result["prompts"]) > 2  # the run's two and held-out quotes
    # the reloaded adapter model scores exactly what training recorded: the same evaluation
    assert result["adapter"]["eval_loss"] == pytest.approx(result["adapter"]["recorded_eval_loss"], rel=1e-6)
    recorded = json.loads((run / "export.json").read_text())
    assert recorded[str(out)]["exports"][0]["eval_loss"] == entry["eval_loss"]


def test_export_gguf_f16_and_q8_0_read_back_by_transformers(trained_run, tmp_path):
    from gemma_qlora.export import ExportConfig, export

    run = copy_run(trained_run, tmp_path)
    result = export(ExportConfig(run=str(run), into="gguf", out=str(tmp_path / "gguf")))

    assert result["passed"]
    f16, q8 = result["exports"]
    assert (f16["file"], q8["file"]) == ("model-f16.gguf", "model-q8_0.gguf")
    assert q8["bytes"] < f16["bytes"]
    for entry in (f16, q8):
        assert entry["config_mismatches"] == [] and entry["tokenizer_agreement"] == 1.0
    assert abs(f16["loss_drift"]) < 1e-4 and abs(q8["loss_drift"]) < 0.01


def test_a_later_export_reuses_the_adapter_models_figures_unless_the_adapter_changed(trained_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from gemma_qlora.export import ExportConfig, export

    run = copy_run(trained_run, tmp_path)
    first = export(ExportConfig(run=str(run), into="gguf", gguf_types=["f16"], out=str(tmp_path / "a")))
    capsys.readouterr()
    second = export(ExportConfig(run=str(run), into="gguf", gguf_types=["f16"], out=str(tmp_path / "b")))
    assert "measured by an earlier export" in capsys.readouterr().out
    assert second["adapter"] == first["adapter"]

    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    save_file({k: v * 2 if "lora_B" in k else v for k, v in weights.items()}, run / "adapter" / "adapter_model.safetensors")
    third = export(ExportConfig(run=str(run), into="gguf", gguf_types=["f16"], out=str(tmp_path / "c")))
    assert "measured by an earlier export" not in capsys.readouterr().out
    assert third["adapter"]["eval_loss"] != first["adapter"]["eval_loss"] and third["passed"]


@pytest.mark.parametrize("family", ["gemma3_text", "gemma2"])
def test_gguf_of_a_tiny_gemma_reads_back_with_equal_logits(family, tmp_path):
    """F16 within fp16's rounding, Q8_0 within 8-bit blocks' rounding, same config and tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma_qlora.export import config_mismatches, load_exported, write_gguf
    from gemma_qlora.quant import detect_precision

    folder = save_tiny_model(tmp_path / family, family, seed=1)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():  # norm weights far from zero, as trained ones are, so the +1 convention shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0, 0.5)
    reference = logits(model, tokenizer)
    scale = reference.abs().max().item()
    for qtype, tolerance in (("f16", 2e-3), ("q8_0", 5e-2)):
        write_gguf(model, tokenizer, tmp_path / f"m-{qtype}.gguf", qtype=qtype, name="tiny")
        back, back_tokenizer = load_exported(tmp_path, detect_precision("cpu"), gguf_file=f"m-{qtype}.gguf")
        assert config_mismatches(back.config, model.config) == []
        assert back_tokenizer(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
        diff = (logits(back, tokenizer) - reference).abs().max().item()
        assert diff < tolerance * scale, (qtype, diff, scale)


def gemma_style_tokenizer(*, add_bos: bool = True):
    """A small tokenizer built the way Gemma's is: BPE over '▁'-spelled text with byte fallback,
    control tokens first, then the 256 bytes, then pieces in merge order, then characters."""
    from tokenizers import Tokenizer, models, processors, trainers
    from transformers import GemmaTokenizer

    from gemma_qlora.data import format_quote
    from gemma_qlora.fortunes import load_fortunes

    texts = [format_quote(r["quote"], r["author"]).replace(" ", "▁") for r in load_fortunes()[:500]]
    bpe = Tokenizer(models.BPE())
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]]
    merges = [("▁", "▁")] + [m for m in merges if m != ("▁", "▁")]
    pieces = list(dict.fromkeys(a + b for a, b in merges))
    chars = sorted({c for t in texts for c in t} - set(pieces))
    controls = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    tokens = controls + [f"<0x{b:02X}>" for b in range(256)] + pieces + chars
    tokenizer = GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": controls[4:]})
    if add_bos:
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer.chat_template = (
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    return tokenizer


@pytest.mark.parametrize("add_bos", [True, False])
def test_gemma_style_tokenizer_and_chat_template_survive_gguf(tmp_path, add_bos):
    """Gemma's SentencePiece-style vocabulary as llama.cpp stores it (scores by merge rank,
    bytes as BYTE, controls as CONTROL, runs of spaces as real spaces), and transformers reads
    the same tokenizer back from it: same ids for spaces, bytes, newlines and control tokens,
    with BOS added or not as the tokenizer does (readers add it when the file is silent)."""
    import gguf
    from transformers import AutoTokenizer

    from gemma_qlora.export import add_tokenizer

    tokenizer = gemma_style_tokenizer(add_bos=add_bos)
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    add_tokenizer(writer, tokenizer, build_config("gemma3_text", len(tokenizer)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    fields = gguf.GGUFReader(str(path)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert types[:7] == [gguf.TokenType.CONTROL] * 7 and types[7:263] == [gguf.TokenType.BYTE] * 256
    assert tokens[263] == "  " and types[263] == gguf.TokenType.USER_DEFINED  # '▁▁', as Gemma's file spells it
    normal = [s for s, t in zip(scores, types) if t == gguf.TokenType.NORMAL]
    assert normal == [-float(i) for i in range(len(normal))]
    assert fields["tokenizer.ggml.add_bos_token"].contents() is add_bos

    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = ["Quote: Imagination is more\nAuthor:  Albert", "héllo 😀  two   spaces", "<start_of_turn>user\nhi<end_of_turn>"]
    assert [back(t)["input_ids"] for t in texts] == [tokenizer(t)["input_ids"] for t in texts]
    assert back.chat_template == tokenizer.chat_template


def test_base_fingerprint_tells_a_changed_base(tmp_path):
    from gemma_qlora.export import base_fingerprint

    folder = save_tiny_model(tmp_path / "m", "gemma3_text")
    first = base_fingerprint(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["transformers_version"] = "0.0.0"  # a re-save by another version is the same model
    (folder / "config.json").write_text(json.dumps(config))
    assert base_fingerprint(str(folder)) == first

    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert base_fingerprint(str(folder))["weights"] != first["weights"]

    config["rms_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(config))
    assert base_fingerprint(str(folder))["config_sha256"] != first["config_sha256"]


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_refuses_a_run_without_adapter(trained_run, tmp_path):
    from gemma_qlora.export import ExportConfig, export

    run = copy_run(trained_run, tmp_path)
    shutil.rmtree(run / "adapter")
    with pytest.raises(UserError) as error:
        export(ExportConfig(run=str(run)))
    assert "holds no adapter" in one_line(error)


def test_refuses_a_base_that_differs_or_is_missing(trained_run, tmp_path):
    from gemma_qlora.export import ExportConfig, export

    run = copy_run(trained_run, tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    base = tmp_path / "base"
    shutil.copytree(metrics["config"]["model"], base)
    metrics["config"]["model"] = str(base)
    (run / "metrics.json").write_text(json.dumps(metrics))
    config = json.loads((base / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as error:
        export(ExportConfig(run=str(run)))
    assert "differs from the one this run trained on" in one_line(error) and "config.json" in one_line(error)

    shutil.rmtree(base)
    with pytest.raises(UserError) as error:
        export(ExportConfig(run=str(run)))
    assert "does not exist" in one_line(error) or "missing" in one_line(error)
    assert not (run / "merged").exists()


@pytest.mark.parametrize("into", ["merged", "gguf"])
def test_disk_full_mid_export_leaves_nothing_that_looks_valid(trained_run, tmp_path, monkeypatch, into):
    """The write fails after part of the files is on disk: one line, and no output folder."""
    import gguf
    import transformers.modeling_utils

    from gemma_qlora.export import ExportConfig, export

    def full(*args, **kwargs):
        Path(tmp_path / "out.partial" / "half-written").write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    if into == "merged":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    else:
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    run = copy_run(trained_run, tmp_path)
    with pytest.raises(UserError) as error:
        export(ExportConfig(run=str(run), into=into, out=str(tmp_path / "out")))
    assert "No space left on device" in one_line(error) and "free disk space" in one_line(error)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert not (run / "export.json").exists()


def broken_q8_0(monkeypatch):
    """Make every Q8_0 file carry a wrong setting (rms_norm_eps), so that its verification must
    fail, whatever way its loss moves; F16 files are written as they should be."""
    import gguf

    from gemma_qlora.export import gguf as module

    write = module.add_hparams

    def add_hparams(writer, config, *, file_type):
        if file_type == gguf.LlamaFileType.MOSTLY_Q8_0:
            config = type(config).from_dict({**config.to_dict(), "rms_norm_eps": config.rms_norm_eps * 10})
        write(writer, config, file_type=file_type)

    monkeypatch.setattr(module, "add_hparams", add_hparams)


def test_a_failing_gguf_type_is_withheld_alone(trained_run, tmp_path, monkeypatch):
    """Q8_0 fails, F16 passes: F16 stays in the output folder, Q8_0 alone goes to .rejected, and
    the one line (exit 2) names both."""
    from gemma_qlora.cli import main

    broken_q8_0(monkeypatch)
    run = copy_run(trained_run, tmp_path)
    out = tmp_path / "gguf"
    with pytest.raises(UserError) as error:
        from gemma_qlora.export import ExportConfig, export

        export(ExportConfig(run=str(run), into="gguf", out=str(out)))
    line = one_line(error)
    assert "model-q8_0.gguf" in line and "rms_norm_eps" in line and "Withheld" in line and "gguf.rejected" in line
    assert "Kept, verified: model-f16.gguf" in line
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["model-f16.gguf"]
    assert sorted(p.name for p in (tmp_path / "gguf.rejected").iterdir() if not p.name.startswith(".")) == ["model-q8_0.gguf"]
    assert not list(tmp_path.glob("*.partial"))
    recorded = json.loads((run / "export.json").read_text())[str(out)]
    f16, q8 = recorded["exports"]
    assert recorded["passed"] is False and recorded["withheld"] == ["model-q8_0.gguf"] and recorded["out"] == str(out)
    assert f16["passed"] and f16["path"] == str(out / "model-f16.gguf")
    assert not q8["passed"] and q8["path"] == str(tmp_path / "gguf.rejected" / "model-q8_0.gguf")
    assert main(["export", "--run", str(run), "--into", "gguf", "--gguf_types", "q8_0", "--out", str(tmp_path / "q8")]) == 2


def test_an_export_where_every_file_fails_is_moved_aside_whole(trained_run, tmp_path, monkeypatch):
    from gemma_qlora.export import ExportConfig, export

    broken_q8_0(monkeypatch)
    run = copy_run(trained_run, tmp_path)
    with pytest.raises(UserError) as error:
        export(ExportConfig(run=str(run), into="gguf", gguf_types=["q8_0"]))
    assert "not matching the trained model" in one_line(error) and "Kept, verified" not in one_line(error)
    assert not (run / "gguf").exists() and (run / "gguf.rejected" / "model-q8_0.gguf").is_file()
    recorded = json.loads((run / "export.json").read_text())[str(run / "gguf")]
    assert recorded["passed"] is False and recorded["exports"][0]["passed"] is False


def test_limits_fail_only_a_rise_past_the_types_limit():
    """One table of limits; a lower loss than the reference's passes whatever its size."""
    from gemma_qlora.export import MAX_LOSS_RISE, ORIGINAL_BASE_ALLOWANCE, ExportConfig, judge, loss_limit

    cfg = ExportConfig(run="r")
    assert loss_limit(cfg, "f16", original=False) == MAX_LOSS_RISE["f16"]
    assert loss_limit(cfg, "q8_0", original=False) == MAX_LOSS_RISE["q8_0"]
    assert loss_limit(cfg, "q8_0", original=True) == pytest.approx(MAX_LOSS_RISE["q8_0"] + ORIGINAL_BASE_ALLOWANCE)
    assert judge({"eval_loss": 3.0}, 3.6, limit=0.01)["passed"]  # 17% lower: better, not a failure
    assert judge({"eval_loss": 3.0 * 1.009}, 3.0, limit=0.01)["passed"]
    assert not judge({"eval_loss": 3.0 * 1.011}, 3.0, limit=0.01)["passed"]


def test_a_quote_run_ships_no_chat_template(trained_run, tmp_path, capsys):
    """Its base's tokenizer has one, but the run trained on plain quotes: neither the merged
    folder nor the GGUF carries a template, and `generate --model` sends prompts as plain text."""
    import gguf
    from transformers import AutoTokenizer

    from gemma_qlora.chat import GenerateConfig, generate_command
    from gemma_qlora.export import ExportConfig, export

    assert AutoTokenizer.from_pretrained(json.loads((trained_run / "metrics.json").read_text())["config"]["model"]).chat_template
    run = copy_run(trained_run, tmp_path)
    merged = export(ExportConfig(run=str(run), into="merged"))
    assert AutoTokenizer.from_pretrained(merged["out"]).chat_template is None
    assert not (Path(merged["out"]) / "chat_template.jinja").exists()
    assert merged["chat_template"] is False and merged["exports"][0]["chat_template"] is False
    generation = json.loads((Path(merged["out"]) / "generation_config.json").read_text())
    assert generation["eos_token_id"] in (1, [1])

    result = export(ExportConfig(run=str(run), into="gguf", gguf_types=["f16"]))
    fields = gguf.GGUFReader(str(Path(result["out"]) / "model-f16.gguf")).fields
    assert "tokenizer.chat_template" not in fields and "tokenizer.ggml.eot_token_id" not in fields
    capsys.readouterr()
    generate_command(GenerateConfig(model=merged["out"], prompt=["Quote: To be"], max_new_tokens=3))
    captured = capsys.readouterr()
    assert captured.out.startswith("Quote: To be") and "chat template" not in captured.err


def test_a_chat_runs_exports_keep_the_template_and_stop_at_the_end_of_a_turn(chat_run, tmp_path, capsys):
    """Merged: the template and eos_token_id [<eos>, <end_of_turn>] in generation_config.json,
    so plain transformers stops where the run's turns stop; GGUF: the template and
    tokenizer.ggml.eot_token_id, llama.cpp's key for it."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from gemma_qlora.chat import GenerateConfig, generate_command
    from gemma_qlora.export import ExportConfig, export
    from gemma_qlora.tiny import GEMMA3_CHAT_TEMPLATE

    run = copy_run(chat_run, tmp_path)
    merged = export(ExportConfig(run=str(run), into="merged"))
    tokenizer = AutoTokenizer.from_pretrained(merged["out"])
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert tokenizer.chat_template == GEMMA3_CHAT_TEMPLATE and merged["chat_template"] is True
    assert GenerationConfig.from_pretrained(merged["out"]).eos_token_id == [tokenizer.eos_token_id, end_of_turn]
    assert AutoModelForCausalLM.from_pretrained(merged["out"]).generation_config.eos_token_id == [1, end_of_turn]

    result = export(ExportConfig(run=str(run), into="gguf", gguf_types=["f16"]))
    fields = gguf.GGUFReader(str(Path(result["out"]) / "model-f16.gguf")).fields
    assert fields["tokenizer.ggml.eot_token_id"].contents() == end_of_turn
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"].contents() == GEMMA3_CHAT_TEMPLATE
    capsys.readouterr()
    generate_command(GenerateConfig(model=str(Path(result["out"]) / "model-f16.gguf"), prompt=["hi"], max_new_tokens=3))
    captured = capsys.readouterr()
    assert "chat template on" in captured.err and captured.out.startswith("user: hi")


@torch.no_grad()
def test_update_survival_counts_what_each_dtype_keeps():
    """Weights of 1.0 (a bf16 step there is 2**-7, an fp16 step 2**-10): an update of 0.01
    survives bf16, one of 0.001 only fp16 and fp32."""
    from peft import LoraConfig, get_peft_model

    from gemma_qlora.export import choose_save_dtype, update_survival

    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    model[0].weight.fill_(1.0)
    peft_model = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=["0"], init_lora_weights=False))
    layer = peft_model.base_model.model[0]
    layer.lora_A["default"].weight.fill_(1.0)
    layer.lora_B["default"].weight.copy_(torch.tensor([[0.01], [0.01], [0.001], [0.001]]))
    survival = update_survival(peft_model)
    assert survival == {"bfloat16": 0.5, "float16": 1.0, "float32": 1.0}
    assert choose_save_dtype("auto", survival)[0] == "float32"
    assert choose_save_dtype("auto", {**survival, "bfloat16": 0.95})[0] == "bfloat16"
    assert choose_save_dtype("bfloat16", survival) == ("bfloat16", "asked for")


def test_a_merge_that_bf16_would_round_away_is_saved_in_fp32(trained_run, tmp_path, capsys):
    """An update a thousandth of the trained one is below bf16's step on most weights: auto saves
    fp32 and records how much survives each dtype; bf16 asked for by name warns."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from gemma_qlora.export import ExportConfig, export

    run = copy_run(trained_run, tmp_path)
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    save_file({k: v * 1e-3 if "lora_B" in k else v for k, v in weights.items()}, run / "adapter" / "adapter_model.safetensors")
    result = export(ExportConfig(run=str(run), into="merged"))
    assert result["save_dtype"] == "float32" and "bf16" in result["save_dtype_reason"]
    assert result["update_survival"]["bfloat16"] < 0.5 < result["update_survival"]["float32"]
    assert AutoModelForCausalLM.from_pretrained(result["out"]).dtype == torch.float32
    capsys.readouterr()
    asked = export(ExportConfig(run=str(run), into="merged", save_dtype="bfloat16", out=str(tmp_path / "bf16")))
    assert asked["save_dtype"] == "bfloat16" and "warning" in capsys.readouterr().err


def test_an_8bit_runs_export_says_which_model_it_matches(int8_run, tmp_path, capsys):
    """export.json holds agreement with the int8 adapter model (what `generate --run` shows,
    one prompt at a time) besides the dequantized reference; generate --run says which model
    it shows."""
    from gemma_qlora.chat import GenerateConfig, generate_command
    from gemma_qlora.export import ExportConfig, export

    run = copy_run(int8_run, tmp_path)
    result = export(ExportConfig(run=str(run), into="gguf", gguf_types=["f16"]))
    (entry,) = result["exports"]
    assert result["yardstick"] == "adapter_dequantized"
    assert entry["agreement_int8"]["prompts"] == entry["agreement"]["prompts"] == len(result["prompts"])
    assert "int8 adapter model" in capsys.readouterr().out
    shown = generate_command(GenerateConfig(run=str(run), prompt=result["prompts"][:3], max_new_tokens=4))
    assert "8-bit run" in capsys.readouterr().err
    assert shown == result["adapter"]["continuations"][:3]


def test_gguf_of_gemma_1_is_refused_in_one_line(trained_run, tmp_path):
    from gemma_qlora.export import ExportConfig, export

    run = copy_run(trained_run, tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["model_type"] = "gemma"
    (run / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(UserError) as error:
        export(ExportConfig(run=str(run), into="gguf"))
    assert "Gemma 2 and Gemma 3" in one_line(error)


def test_cli_export_bad_flags_and_bad_run_exit_2(tmp_path, capsys):
    from gemma_qlora.cli import main

    assert main(["export", "--run", str(tmp_path), "--into", "onnx"]) == 2
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
