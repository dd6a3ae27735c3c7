"""Crash, resume, bad disks and secrets."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_qlora.config import TrainConfig
from gemma_qlora.errors import UserError
from gemma_qlora.rundir import newest_checkpoint
from gemma_qlora.train import train


def train_cmd(model, data, out, *extra):
    return [sys.executable, "-m", "gemma_qlora", "train", "--model", model, "--data", data, "--output_dir", str(out),
            "--batch_size", "4", "--max_seq_length", "64", "--eval_size", "4", "--max_new_tokens", "2",
            "--logging_steps", "1", "--learning_rate", "5e-3", "--lora_r", "16", "--lora_alpha", "32", *extra]


@pytest.fixture
def repeated_quote(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text("\n".join(json.dumps({"quote": "Be yourself; everyone else is already taken.", "author": "Oscar Wilde"}) for _ in range(60)))
    return str(path)


def test_sigkill_mid_run_then_resume_continues(tiny_model, repeated_quote, tmp_path):
    out = tmp_path / "runs"
    cmd = train_cmd(tiny_model, repeated_quote, out, "--steps", "150", "--save_steps", "10", "--eval_steps", "1000")
    # killed inside step 25 (checkpoints 10 and 20 written, the kept limit is 2): the run kills
    # itself there, so the test does not depend on how fast the machine is
    killed = subprocess.run([sys.executable, str(Path(__file__).with_name("killed_run.py")), "25", *cmd[3:]],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = out / "4bit" / "checkpoints"
    assert not (out / "4bit" / "metrics.json").exists()
    # a checkpoint folder the kill interrupted (no trainer_state.json) must never be picked
    (checkpoints / "checkpoint-999").mkdir()
    (checkpoints / "checkpoint-999" / "adapter_model.safetensors").write_bytes(b"half")
    resume_point = newest_checkpoint(checkpoints)
    assert resume_point.endswith("checkpoint-20")

    done = subprocess.run(cmd + ["--resume", "true"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "4bit" / "metrics.json").read_text())
    assert metrics["steps"] == 150 and metrics["resumed_from"] == resume_point
    steps = [h["step"] for h in metrics["loss_history"]]
    assert steps == list(range(1, 151))  # the curve restored from the checkpoint, then continued, no repeats
    losses = {h["step"]: h["loss"] for h in metrics["loss_history"]}
    k = int(resume_point.rsplit("-", 1)[1])
    # the first step after the resume carries on from where the killed run was, not from scratch
    assert abs(losses[k + 1] - losses[k]) < abs(losses[k + 1] - losses[1])


def test_resume_with_no_checkpoint_starts_fresh(fast_cfg):
    metrics = train(fast_cfg(resume=True))
    assert metrics["resumed_from"] is None and metrics["steps"] == 4


def test_disk_full_while_saving_leaves_no_half_adapter(fast_cfg, monkeypatch):
    from peft import PeftModel

    def full(self, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, "adapter_model.safetensors"), "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    cfg = fast_cfg()
    with pytest.raises(UserError, match="free disk space"):
        train(cfg)
    run = os.path.join(cfg.output_dir, "4bit")
    assert not os.path.exists(os.path.join(run, "adapter"))
    assert not os.path.exists(os.path.join(run, "adapter.partial"))
    assert not os.path.exists(os.path.join(run, "metrics.json"))


def test_corrupted_adapter_folder(tiny_model, fast_cfg, tmp_path):
    from gemma_qlora.lora import load_adapter
    from gemma_qlora.model import load_model
    from gemma_qlora.quant import detect_precision

    cfg = fast_cfg()
    train(cfg)
    adapter = os.path.join(cfg.output_dir, "4bit", "adapter")
    base, _ = load_model(TrainConfig(model=tiny_model, bits=4), detect_precision("cpu"))
    load_adapter(base, adapter)  # the intact one loads
    with open(os.path.join(adapter, "adapter_model.safetensors"), "r+b") as f:
        f.truncate(100)
    base, _ = load_model(TrainConfig(model=tiny_model, bits=4), detect_precision("cpu"))
    with pytest.raises(UserError, match="damaged"):
        load_adapter(base, adapter)
    with pytest.raises(UserError, match="not a saved adapter"):
        load_adapter(base, str(tmp_path))


def test_token_never_written_or_printed(tiny_model, quotes_file, tmp_path):
    token = "hf_" + "PlantedFakeToken" * 3
    env = {**os.environ, "HF_TOKEN": token}
    out = tmp_path / "runs"
    done = subprocess.run(train_cmd(tiny_model, quotes_file, out, "--steps", "2", "--save_steps", "1", "--max_seq_length", "128"),
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    gated = subprocess.run([sys.executable, "-m", "gemma_qlora", "train", "--model", "google/gemma-2b", "--output_dir", str(out),
                            "--run_name", "gated"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert gated.returncode == 2
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) > 5
    for text in [done.stdout, done.stderr, gated.stdout, gated.stderr] + [p.read_bytes().decode("latin-1") for p in written]:
        assert token not in text


def test_out_of_memory_is_explained_and_keeps_what_was_written(fast_cfg, monkeypatch):
    """A CUDA OOM mid-training (raised here: CI has no GPU) becomes advice naming the run and
    its settings; checkpoints written before it stay."""
    import torch
    from trl import SFTTrainer

    real_train = SFTTrainer.train

    def train_then_oom(self, *args, **kwargs):
        self.args.max_steps = 2
        real_train(self, *args, **kwargs)  # writes checkpoint-2
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(SFTTrainer, "train", train_then_oom)
    cfg = fast_cfg(bits=8, batch_size=4, save_steps=2)
    with pytest.raises(UserError) as info:
        train(cfg)
    message = str(info.value)
    assert "Out of GPU memory in run 8bit" in message and "micro-batch 4 x 128" in message
    assert "--batch_size 2" in message and "--bits 4" in message and "--auto_batch_size true" in message
    assert newest_checkpoint(Path(cfg.output_dir) / "8bit" / "checkpoints").endswith("checkpoint-2")
