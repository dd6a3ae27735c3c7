"""The notebooks, run top to bottom on CPU as papermill would: a cell injected after the one
tagged "parameters" points them at the tiny Gemma and the small quotes file. The committed
files are only read; outputs stay in memory."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import nbformat
import pytest
import torch

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
FOUR_BIT = NOTEBOOKS / "Gemma_Finetuning_with_QLoRA_4bit.ipynb"
EIGHT_BIT = NOTEBOOKS / "Gemma_Finetuning_with_QLoRA_8bit.ipynb"
COLAB = "https://colab.research.google.com/github/gemma-qlora/gemma-qlora/blob/main/notebooks/"


def tagged(nb, tag: str) -> list[int]:
    return [i for i, cell in enumerate(nb.cells) if tag in cell.get("metadata", {}).get("tags", [])]


def inject_parameters(nb, **values):
    """papermill's way: a cell tagged injected-parameters right after the parameters cell."""
    (index,) = tagged(nb, "parameters")
    source = "# Parameters\n" + "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


def text_of(cell) -> str:
    """Everything a code cell printed or displayed as text."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("display_data", "execute_result"):
            parts.append(output.data.get("text/markdown", "") or output.data.get("text/plain", ""))
    return "".join(parts)


def images_in(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A "python3" kernelspec that runs this interpreter (the installed one may say plain `python`),
    no GPU, no Hub."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python",
    }))
    return {
        "JUPYTER_PATH": str(root),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "TOKENIZERS_PARALLELISM": "false",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }


def execute(path: Path, workdir: Path, monkeypatch, env: dict, **parameters):
    from nbclient import NotebookClient

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    nb = inject_parameters(nbformat.read(path, as_version=4), **parameters)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    return nb


def check_metrics(path: Path, bits: int, tiny_model: str):
    metrics = json.loads(path.read_text())
    assert metrics["run"] == f"{bits}bit" and metrics["config"]["bits"] == bits
    assert metrics["config"]["model"] == tiny_model and metrics["config"]["steps"] == 3  # the injected parameters won
    assert metrics["model_type"] == "gemma3_text" and metrics["device"] == "cpu" and metrics["dtype"] == "float32"
    assert metrics["steps"] == 3 and len(metrics["loss_history"]) == 3
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in metrics["loss_history"])
    assert 0 < metrics["eval_loss"] < 20 and 0 < metrics["eval_before"] < 20
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["eval_history"][0] == {"step": 0, "eval_loss": metrics["eval_before"]}
    assert metrics["train_tokens"] > 0 and metrics["tokens_per_second"] > 0
    assert 0 < metrics["parameters"]["trainable"] < metrics["parameters"]["total"]
    assert metrics["authors_before"]["n"] == metrics["authors_after"]["n"] <= 4
    memory = metrics["memory"]
    assert memory["kind"] == "rss" and len(memory["samples"]) > 5
    assert [p["name"] for p in memory["phases"]] == ["load", "generate_before", "prepare", "eval_before", "train", "eval_after", "generate_after"]
    after_load, train_peak = metrics["memory_after_load_gib"], metrics["peak_train_gib"]["sampled_gib"]
    assert 0.1 < after_load < memory["total_gib"] and after_load <= train_peak < memory["total_gib"]
    assert 0.1 < metrics["peak_generate_gib"]["sampled_gib"] < memory["total_gib"]
    assert metrics["peak_train_gib"]["allocated_gib"] is None  # no GPU number on a CPU run
    return metrics


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny Gemma 3 whose tokenizer has Gemma's turn markers as special tokens, as every Gemma's
    has (the notebooks end with a chat fine-tune)."""
    from transformers import AutoModelForCausalLM

    from conftest import build_config
    from gemma_qlora.tiny import build_chat_tokenizer

    path = tmp_path_factory.mktemp("models") / "gemma3-chat-tokens"
    torch.manual_seed(0)
    tokenizer = build_chat_tokenizer()
    tokenizer.chat_template = None  # as the embedded Gemma 3 270M: the notebooks name Gemma 3's
    AutoModelForCausalLM.from_config(build_config("gemma3_text", len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_notebooks_run_top_to_bottom_4bit_then_8bit(tiny_model, quotes_file, tmp_path, monkeypatch, kernel_env):
    out = tmp_path / "runs"
    changes = dict(model=tiny_model, data=quotes_file, steps=3, batch_size=4, max_seq_length=128, eval_size=8,
                   author_eval=4, logging_steps=1)
    parameters = dict(PRESET="colab-t4", CHANGES=changes, OUTPUT_DIR=str(out), CHAT_STEPS=2)
    runs = {}
    for bits, path in ((4, FOUR_BIT), (8, EIGHT_BIT)):
        nb = execute(path, tmp_path, monkeypatch, kernel_env, **parameters)
        cells = {cell.get("id"): cell for cell in nb.cells}
        runs[bits] = check_metrics(out / f"{bits}bit" / "metrics.json", bits, tiny_model)
        run_dir = out / f"{bits}bit"
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert len(json.loads((run_dir / "generations.json").read_text())) == 2
        # what the reader sees
        assert not any("will be cast" in text_of(c) for c in nb.cells if c.cell_type == "code")  # no log line per 8-bit matmul
        assert "No GPU" in text_of(cells["gpu"])
        assert ("'load_in_4bit': True" if bits == 4 else "'load_in_8bit': True") in text_of(cells["gpu"])
        assert "trainable parameters:" in text_of(cells["lora"])
        assert "Quote: Imagination is more" in text_of(cells["before"])
        assert "perplexity" in text_of(cells["eval"])
        assert "author named on" in text_of(cells["after"]) or "author accuracy skipped" in text_of(cells["after"])
        reload = text_of(cells["reload"])
        assert "same LoRA weights as the trained model: True" in reload and "same continuations as the trained model:" in reload
        assert images_in(cells["plots"]) == 2
        assert "Memory plan" in text_of(cells["plan"]) and "T4 (15 GiB)" in text_of(cells["plan"])
        assert "Quote: The secret of getting ahead is" in text_of(cells["talk"])
        # the chat section: the audit shows masked tokens apart, and the same steps train on conversations
        audited = text_of(cells["chat-data"])
        assert "messages format" in audited and "<start_of_turn>user" in audited and "trained" in audited
        chat = json.loads((out / f"{bits}bit-chat" / "metrics.json").read_text())
        assert chat["data"]["train"]["format"] == "messages" and chat["steps"] == 2 and chat["config"]["bits"] == bits
        table = text_of(cells["plots"])
        assert "process RSS" in table and "peak during training" in table and f"{bits}bit" in table
    # the 8-bit notebook found the 4-bit run and drew both
    compare = cells["compare"]
    assert "run the 4-bit notebook first" not in text_of(compare)
    assert images_in(compare) == 2
    assert "| 4bit | 8bit |" in text_of(compare)
    assert runs[4]["memory"]["samples"] != runs[8]["memory"]["samples"]


def test_8bit_comparison_says_to_run_4bit_first_when_its_run_is_missing(tmp_path, capsys):
    """The comparison cell's other branch, run on its own: a note, no chart."""
    from types import SimpleNamespace

    nb = nbformat.read(EIGHT_BIT, as_version=4)
    (source,) = [c.source for c in nb.cells if c.get("id") == "compare"]

    def show_memory(runs):
        raise AssertionError("drew a chart without the 4-bit run")

    exec(source, {"cfg": SimpleNamespace(output_dir=str(tmp_path)), "metrics": {}, "show_memory": show_memory})
    assert "run the 4-bit notebook first" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert "widgets" not in nb.metadata
    for cell in nb.cells:
        assert "widgets" not in cell.get("metadata", {})
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {cell.get('id')} has outputs"
            assert cell.execution_count is None, f"cell {cell.get('id')} has an execution count"
    assert len(tagged(nb, "parameters")) == 1
    assert nb.cells[0].cell_type == "markdown" and COLAB + path.name in nb.cells[0].source
    assert "HF_TOKEN" in nb.cells[0].source


@pytest.mark.parametrize("path", [FOUR_BIT, EIGHT_BIT], ids=lambda p: p.name)
def test_notebook_runs_every_step_of_the_recipe_in_order(path):
    """The notebooks and `python -m gemma_qlora train` run the same steps: a notebook that
    skips one, or runs them out of order, fails here."""
    import re

    from gemma_qlora.train import STEPS

    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    called = re.findall(r"(?:^|= )run\.(\w+)\(", code, flags=re.M)
    assert [name for name in called if name in STEPS or name.startswith(("evaluate", "generate"))] == list(STEPS)


def test_notebooks_are_parallel():
    """Same steps in the same order; the 8-bit one only adds the comparison at the end."""
    four, eight = (nbformat.read(p, as_version=4) for p in (FOUR_BIT, EIGHT_BIT))
    code_ids = lambda nb: [c.id for c in nb.cells if c.cell_type == "code"]  # noqa: E731
    assert code_ids(eight) == code_ids(four) + ["compare"]
    for a, b in zip(four.cells, eight.cells):
        if a.cell_type == "code" and a.id != "config":
            assert a.source == b.source, a.id
    (config4,), (config8,) = ([c.source for c in nb.cells if c.get("id") == "config"] for nb in (four, eight))
    assert 'bits=4, run_name="4bit"' in config4 and 'bits=8, run_name="8bit"' in config8
