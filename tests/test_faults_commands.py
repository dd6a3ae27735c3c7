"""Faults and bad input for every command besides training's own: what `--overwrite` may remove
(train, export, compare), inputs checked before anything heavy loads (data, generate, export,
train), a file where a folder is expected, and Ctrl-C outside training.

Refusals run the CLI's `main()` in this process: one line on stderr, exit 2, nothing of the
user's removed and nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import save_tiny_model
from gemma_qlora.cli import main
from test_faults import files_under, flags, one_error_line


def fake_run(folder: Path, model: str, data: str) -> Path:
    """A run folder as far as the checks before loading read it: adapter files, metrics.json with
    the settings, run.json. (Nothing here loads it: each refusal comes first.)"""
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    settings = {"model": model, "data": data, "max_seq_length": 128, "eval_size": 4, "bits": 4}
    (folder / "metrics.json").write_text(json.dumps({"config": settings, "model_type": "gemma3_text"}))
    (folder / "run.json").write_text(json.dumps({"run": folder.name, "settings": settings}))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in files_under(folder)}


# --- 1. --overwrite removes only what the command wrote ------------------------------------------


def test_export_overwrite_never_removes_a_run_its_parent_or_anything_not_an_export(
        tiny_model, quotes_file, tmp_path, capfd, monkeypatch):
    runs = tmp_path / "runs"
    run = fake_run(runs / "4bit", tiny_model, quotes_file)
    fake_run(runs / "8bit", tiny_model, quotes_file)
    (runs / "notes.txt").write_text("mine")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    (tmp_path / "a_file").write_text("mine")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)

    export = ["export", "--run", str(run), "--overwrite", "true", "--out"]
    cases = {
        str(run): "which this command reads",              # the run being exported
        str(runs): "which this command reads",             # the folder holding it (and others)
        str(runs / "8bit"): "is a run folder",              # another run
        ".": "holds the current directory",
        "..": "holds the current directory",
        str(mine): "not written by this command",           # a folder of the user's
        str(tmp_path / "a_file"): "is a file, not a folder",
        str(tiny_model): "which this command reads",        # the base model
    }
    for out, message in cases.items():
        assert message in one_error_line(capfd, export + [out]), out
    assert snapshot(tmp_path) == before  # nothing removed, nothing written
    # a folder named like the export's own work folders is the user's too
    (tmp_path / "new.partial").mkdir()
    (tmp_path / "new.partial" / "keep").write_text("mine")
    assert "not written by this command" in one_error_line(capfd, export + [str(tmp_path / "new")])
    assert (tmp_path / "new.partial" / "keep").read_text() == "mine"
    # a file as the run
    assert "is a file, not a folder" in one_error_line(capfd, ["export", "--run", str(tmp_path / "a_file")])


def test_train_overwrite_replaces_only_a_run_folder_train_wrote(tiny_model, quotes_file, tmp_path, capfd, monkeypatch):
    results = tmp_path / "results"
    fake_run(results / "4bit", tiny_model, quotes_file)
    user = tmp_path / "user"
    user.mkdir()
    (user / "data.csv").write_text("mine")
    monkeypatch.chdir(results)
    before = snapshot(tmp_path)

    def train(output_dir, name):
        return flags(tiny_model, quotes_file, output_dir, "--run_name", name, "--overwrite", "true")

    assert "train did not write" in one_error_line(capfd, train(tmp_path, "user"))
    assert "holds the current directory" in one_error_line(capfd, train(tmp_path, "results"))
    (tmp_path / "a_file").write_text("mine")
    before = snapshot(tmp_path)
    assert "is a file, not a run folder" in one_error_line(capfd, train(tmp_path, "a_file"))
    assert "is a file, not a folder" in one_error_line(capfd, train(tmp_path / "a_file", "x"))
    monkeypatch.chdir(tmp_path)
    assert "holds run folders (4bit)" in one_error_line(capfd, train(tmp_path, "results"))
    assert snapshot(tmp_path) == before


def test_compare_refuses_repeated_arms_and_keeps_a_users_folder(tiny_model, quotes_file, tmp_path, capfd):
    base = ["compare", "--model", tiny_model, "--data", quotes_file, "--output_dir", str(tmp_path), "--steps", "1"]
    assert "names 8bit more than once" in one_error_line(capfd, base + ["--arms", "8bit", "8bit"])
    assert "names 1 more than once" in one_error_line(capfd, base + ["--seeds", "1", "1"])
    # an arm's folder that the user made: the arm's train refuses to replace it, and compare stops there
    (tmp_path / "4bit").mkdir()
    (tmp_path / "4bit" / "mine.txt").write_text("mine")
    capfd.readouterr()
    assert main(base + ["--arms", "4bit"]) == 2
    err = capfd.readouterr().err
    assert "train did not write" in err and "Arm 4bit failed (exit 2)" in err.strip().splitlines()[-1]
    assert files_under(tmp_path) == ["4bit/mine.txt"]


# --- 2. inputs checked before anything heavy loads ------------------------------------------------


@pytest.fixture(scope="module")
def odd_models(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    no_tokenizer = root / "no_tokenizer"
    shutil.copytree(tiny_model, no_tokenizer)
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    null_field = root / "null_field"
    shutil.copytree(tiny_model, null_field)
    config = json.loads((null_field / "config.json").read_text())
    (null_field / "config.json").write_text(json.dumps({**config, "head_dim": None}))
    wrong_type = root / "wrong_type"
    shutil.copytree(tiny_model, wrong_type)
    (wrong_type / "config.json").write_text(json.dumps({**config, "vocab_size": "lots"}))
    return {"no_tokenizer": no_tokenizer, "null_field": null_field, "wrong_type": wrong_type}


def test_data_checks_what_train_checks(tiny_model, quotes_file, odd_models, tmp_path, capfd):
    data = ["data", "--data", quotes_file, "--model"]
    assert "has no tokenizer" in one_error_line(capfd, data + [str(odd_models["no_tokenizer"])])
    line = one_error_line(capfd, data + [str(odd_models["null_field"])])
    assert "config.json" in line and "head_dim" in line and "tokenizer" not in line
    assert "vocab_size" in one_error_line(capfd, data + [str(odd_models["wrong_type"])])
    assert "--max_train_examples must be a positive number" in one_error_line(
        capfd, data + [tiny_model, "--max_train_examples", "-1"])
    assert "--eval_size must be a positive number" in one_error_line(capfd, data + [tiny_model, "--eval_size", "0"])
    assert "is a file, not a folder" in one_error_line(capfd, ["data", "--data", quotes_file, "--model", quotes_file])


@pytest.mark.parametrize("command", ["train", "data"])
def test_a_quote_or_author_that_is_not_text_is_one_line(command, tiny_model, tmp_path, capfd):
    rows = [{"quote": f"Quote number {i}.", "author": "Someone"} for i in range(20)]
    for bad, column in ((3, "quote"), (["Ann", "Bo"], "author")):
        data = tmp_path / f"bad_{column}.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in [*rows[:5], {**rows[5], column: bad}, *rows[6:]]))
        argv = (flags(tiny_model, data, tmp_path / "runs") if command == "train"
                else ["data", "--data", str(data), "--model", tiny_model])
        line = one_error_line(capfd, argv)
        assert f"Row 6 of {data}: {column} must be text" in line, line
    assert files_under(tmp_path / "runs") == []


def test_train_refuses_bad_lora_targets_and_config_fields_before_writing(tiny_model, quotes_file, odd_models, tmp_path, capfd):
    out = tmp_path / "runs"
    line = one_error_line(capfd, flags(tiny_model, quotes_file, out, "--lora_targets", "q_proj,bogus_proj"))
    assert "LoRA targets ['bogus_proj'] are not modules of this model" in line
    line = one_error_line(capfd, flags(odd_models["null_field"], quotes_file, out))
    assert "head_dim" in line and "tokenizer" not in line
    assert "is a file, not a folder" in one_error_line(capfd, flags(quotes_file, quotes_file, out))
    assert files_under(out) == []  # not even run.json


def test_generate_checks_its_inputs_before_loading(tiny_model, quotes_file, tmp_path, capfd):
    model = ["generate", "--model", tiny_model]
    assert "Prompt 1 is empty" in one_error_line(capfd, model + ["--prompt", ""])
    assert "--temperature must be above 0" in one_error_line(capfd, model + ["--prompt", "Hi", "--sample", "true", "--temperature", "0"])
    assert "--top_p must be in (0, 1]" in one_error_line(capfd, model + ["--prompt", "Hi", "--sample", "true", "--top_p", "0"])
    assert "beyond the 512 positions" in one_error_line(capfd, model + ["--prompt", "Hi", "--max_new_tokens", "1000000000"])
    assert "is a file, not a folder" in one_error_line(capfd, ["generate", "--model", quotes_file, "--prompt", "Hi"])
    assert "is a file, not a folder" in one_error_line(capfd, ["generate", "--run", quotes_file, "--prompt", "Hi"])


def test_generate_refuses_a_base_that_changed_since_training(tiny_model, quotes_file, tmp_path, capfd):
    """As export does: the run recorded its base's fingerprint; a base whose weights changed is refused."""
    from gemma_qlora.model import base_fingerprint

    base = save_tiny_model(tmp_path / "base", "gemma3_text", seed=0)
    run = fake_run(tmp_path / "runs" / "4bit", str(base), quotes_file)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "base": base_fingerprint(str(base))}))
    save_tiny_model(tmp_path / "base", "gemma3_text", seed=1)  # the same model, other weights
    line = one_error_line(capfd, ["generate", "--run", str(run), "--prompt", "Quote:"])
    assert "differs from the one this run trained on (its weights changed)" in line


# --- 3. Ctrl-C outside training -------------------------------------------------------------------


def test_ctrl_c_outside_training_says_what_was_kept(tiny_model, quotes_file, tmp_path, capfd, monkeypatch):
    import subprocess

    from gemma_qlora import formats

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(formats, "encoded_examples", ctrl_c)
    capfd.readouterr()
    assert main(["data", "--data", quotes_file, "--model", tiny_model]) == 130
    line = capfd.readouterr().err.strip()
    assert line == "interrupted: stopped; nothing was written."

    # compare: the arms finished before it are kept, and --reuse keeps them
    calls = []

    def second_arm_interrupted(argv, *args, **kwargs):
        calls.append(argv)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(subprocess, "run", second_arm_interrupted)
    assert main(["compare", "--model", tiny_model, "--data", quotes_file, "--output_dir", str(tmp_path), "--arms", "4bit", "8bit"]) == 130
    line = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()][-1]
    assert line.startswith("interrupted: compare stopped in arm 8bit; the finished arms 4bit are kept") and "--reuse true" in line
