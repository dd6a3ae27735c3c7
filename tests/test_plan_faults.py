"""`plan` on a broken model config.json: one line that names the field and says what to do (exit
2), checked before transformers reads the file, never a validation traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_config

from gemma_qlora.cli import main

ROOT = Path(__file__).resolve().parents[1]


def config_folder(tmp_path: Path, **changes) -> Path:
    """A tiny Gemma 3 config.json with `changes` (None writes null; DELETE removes the field)."""
    data = build_config("gemma3_text", 1000).to_dict()
    for key, value in changes.items():
        if value == "DELETE":
            data.pop(key)
        else:
            data[key] = value
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def plan_error(model, capsys) -> str:
    """stderr of `plan --model model`, which must fail as a user error in one line."""
    assert main(["plan", "--model", str(model), "--gpu", "t4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_a_good_config_plans(tmp_path, capsys):
    assert main(["plan", "--model", str(config_folder(tmp_path)), "--gpu", "t4"]) == 0
    assert "peak: NVML" in capsys.readouterr().out


@pytest.mark.parametrize("key", ["head_dim", "vocab_size", "max_position_embeddings", "num_key_value_heads"])
def test_a_null_size_is_named(tmp_path, capsys, key):
    err = plan_error(config_folder(tmp_path, **{key: None}), capsys)
    assert f'"{key}" is null' in err and "whole number above 0" in err and "config.json" in err


@pytest.mark.parametrize(
    "key,value,said",
    [("vocab_size", "lots", '"vocab_size" is "lots"'), ("hidden_size", True, '"hidden_size" is true'),
     ("intermediate_size", 127.5, '"intermediate_size" is 127.5, not a whole number'),
     ("layer_types", "full_attention", '"layer_types" is "full_attention"'),
     ("tie_word_embeddings", "yes", '"tie_word_embeddings" is "yes"'),
     ("model_type", 3, '"model_type" is 3, not a name')],
)
def test_a_wrongly_typed_field_is_named(tmp_path, capsys, key, value, said):
    err = plan_error(config_folder(tmp_path, **{key: value}), capsys)
    assert said in err and ("correct it in the file" in err or "give the config.json saved with a Gemma model" in err)


@pytest.mark.parametrize("key,value", [("hidden_size", -64), ("num_hidden_layers", 0), ("vocab_size", 0), ("head_dim", -16)])
def test_a_negative_or_zero_size_is_named(tmp_path, capsys, key, value):
    err = plan_error(config_folder(tmp_path, **{key: value}), capsys)
    assert f'"{key}" is {value}' in err and "whole number above 0" in err


def test_a_size_beyond_any_model_is_named(tmp_path, capsys):
    err = plan_error(config_folder(tmp_path, hidden_size=10**400), capsys)
    assert '"hidden_size" is a 401-digit number, beyond any model' in err
    assert '"vocab_size" is 1e+18, beyond any model' in plan_error(config_folder(tmp_path / "2", vocab_size=1e18), capsys)


def test_a_multimodal_gemma3s_language_model_is_checked_too(tmp_path, capsys):
    text = build_config("gemma3_text", 1000).to_dict()
    text["head_dim"] = None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    assert '"head_dim" is null' in plan_error(tmp_path, capsys)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": "small"}))
    assert '"text_config" is "small", not a set of settings' in plan_error(tmp_path, capsys)


def test_heads_that_do_not_divide_are_named(tmp_path, capsys):
    err = plan_error(config_folder(tmp_path, num_key_value_heads=3), capsys)
    assert '"num_attention_heads" (4) is not a multiple of "num_key_value_heads" (3)' in err


def test_a_missing_model_type_says_what_to_give(tmp_path, capsys):
    err = plan_error(config_folder(tmp_path, model_type="DELETE"), capsys)
    assert 'has no "model_type"' in err and "give the config.json saved with a Gemma model" in err


def test_a_config_that_is_not_json_says_where_and_what_to_do(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gemma3_text", "hidden_size": 6')  # cut short
    err = plan_error(folder, capsys)
    assert "is not JSON" in err and "line 1" in err and "download the model's config.json again" in err
    (folder / "config.json").write_text("[1, 2]")
    assert "holds a JSON list, not a model's settings" in plan_error(folder, capsys)


def test_a_folder_without_config_json_is_said_so(tmp_path, capsys):
    (tmp_path / "tokenizer.json").write_text("{}")
    assert f"{tmp_path} is a folder without config.json" in plan_error(tmp_path, capsys)


def test_a_file_given_for_the_model_folder_is_said_so(tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(range(256)))
    assert f"{weights} is a file, not a folder" in plan_error(weights, capsys)


def test_a_bad_config_is_one_line_from_the_command_line(tmp_path):
    """As a user runs it: exit 2 and the one line on stderr, nothing on stdout."""
    folder = config_folder(tmp_path, vocab_size="lots")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "gemma_qlora", "plan", "--model", str(folder)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert out.stderr.strip().splitlines() == [f'error: {folder}/config.json: "vocab_size" is "lots"; it must be a whole number '
                                               "above 0: correct it in the file (or copy the model's config.json again)."]


def test_a_bad_config_is_refused_before_transformers_is_imported(tmp_path):
    """Through the Python API the check runs before transformers (the slow import) is loaded."""
    folder = config_folder(tmp_path, head_dim=None)
    code = ("import sys\n"
            "from gemma_qlora.errors import UserError\n"
            "from gemma_qlora.plan import load_shape\n"
            "try:\n    load_shape(sys.argv[1])\nexcept UserError as error:\n    print(error)\n"
            "print('transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and '"head_dim" is null' in lines[0] and lines[1] == "False", out.stdout + out.stderr
