import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from gemma_qlora.config import TrainConfig
from gemma_qlora.errors import UserError
from gemma_qlora.memory import MemoryRecorder
from gemma_qlora.train import train


def test_memory_recorder_on_cpu_records_rss_labelled_so():
    recorder = MemoryRecorder(interval_s=0.01)
    with recorder.phase("work"):
        block = torch.ones(64, 1024, 1024)  # 256 MiB
        time.sleep(0.1)
        del block
    record = recorder.stop()
    assert record.kind == "rss" and "RSS" in record.label and "no GPU" in record.label
    assert len(record.samples) >= 5
    phase = record.phases[0]
    assert phase.name == "work" and phase.end_s > phase.start_s
    assert phase.peak_sampled_gib >= 0.25  # saw the 256 MiB block
    assert phase.peak_allocated_gib is None  # no fake GPU numbers
    json.dumps(record.to_dict())


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_training_lowers_loss_on_a_repeated_example(tiny_model, tmp_path, bits):
    path = tmp_path / "one.jsonl"
    path.write_text("\n".join(json.dumps({"quote": "Be yourself; everyone else is already taken.", "author": "Oscar Wilde"}) for _ in range(40)))
    cfg = TrainConfig(
        model=tiny_model, data=str(path), bits=bits, steps=12, batch_size=4, max_seq_length=64, eval_size=4,
        learning_rate=5e-3, lora_r=16, lora_alpha=32, lora_dropout=0.0, output_dir=str(tmp_path / "runs"), max_new_tokens=2,
    )
    metrics = train(cfg)
    assert metrics["eval_loss"] < metrics["eval_before"] - 0.5
    losses = [h["loss"] for h in metrics["loss_history"]]
    assert losses[-1] < losses[0]


def test_adapter_reloads_onto_fresh_base_with_identical_logits(fast_cfg):
    from peft import PeftModel

    from gemma_qlora.model import load_model
    from gemma_qlora.quant import detect_precision

    cfg = fast_cfg(bits=4, lora_dropout=0.0)
    train(cfg)
    adapter = os.path.join(cfg.output_dir, "4bit", "adapter")
    assert os.path.isfile(os.path.join(adapter, "adapter_model.safetensors"))
    outputs = []
    for _ in range(2):
        base, tokenizer = load_model(cfg, detect_precision("cpu"))
        model = PeftModel.from_pretrained(base, adapter).eval()
        batch = tokenizer(["Quote: Imagination is more"], return_tensors="pt")
        with torch.no_grad():
            outputs.append(model(**batch).logits)
        # the adapter changes the output: it is really applied
        with model.disable_adapter(), torch.no_grad():
            plain = model(**batch).logits
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], plain)


def test_packed_examples_do_not_attend_to_each_other(tiny_model):
    """Padding-free packing: two examples in one row with their own position ids give the
    same log-probs as each alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager").eval()
    a = tokenizer("Quote: Be yourself.\nAuthor: Oscar Wilde")["input_ids"]
    b = tokenizer("Quote: I think, therefore I am.\nAuthor: Descartes")["input_ids"]
    with torch.no_grad():
        alone = [model(torch.tensor([x]), use_cache=False).logits[0] for x in (a, b)]
        # as in training (TRL passes use_cache=False): transformers derives the block mask from position ids
        packed = model(
            torch.tensor([a + b]), position_ids=torch.tensor([list(range(len(a))) + list(range(len(b)))]), use_cache=False
        ).logits[0]
    torch.testing.assert_close(packed[: len(a)], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[len(a) :], alone[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_cli_train_writes_the_run_folder(tiny_model, quotes_file, tmp_path, bits):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "gemma_qlora", "train", "--model", tiny_model, "--data", quotes_file, "--bits", str(bits),
           "--steps", "5", "--batch_size", "4", "--max_seq_length", "128", "--eval_size", "8", "--output_dir", str(out),
           "--max_new_tokens", "4", "--logging_steps", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = out / f"{bits}bit"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 5 and metrics["config"]["bits"] == bits
    assert metrics["loss_history"] and metrics["eval_history"]
    assert metrics["tokens_per_second"] > 0 and metrics["train_tokens"] > 0
    # the trainer's own clock runs inside ours (train_seconds also holds its set-up), never past it
    assert metrics["train_tokens"] / metrics["train_seconds"] <= metrics["tokens_per_second"] * 1.05
    assert metrics["memory"]["kind"] == "rss" and metrics["memory"]["samples"]
    assert metrics["allocated_between_steps_gib"] is None  # a CUDA allocator figure; CPU has none
    assert {p["name"] for p in metrics["memory"]["phases"]} >= {"load", "train", "generate_after"}
    assert set(metrics["versions"]) >= {"torch", "transformers", "peft", "trl", "bitsandbytes"}
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    generations = json.loads((run / "generations.json").read_text())
    assert [g["prompt"] for g in generations] == ["Quote: Imagination is more", "Quote: Outside of a dog, a book is man's"]
    assert "100%" in done.stderr  # Trainer's progress bar


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--bits", "3"], "argument --bits: invalid choice: 3 (choose from 4, 8, 16)"),
        (["--batch_size", "eight"], "invalid int value: 'eight'"),
        (["--no_such_flag", "1"], "unknown flag(s) --no_such_flag 1"),
        (["--steps", "0"], "--steps must be a positive number"),
        (["--batch_size", "-1"], "--batch_size must be a positive number"),
        (["--lora_r", "0"], "--lora_r must be a positive number"),
        (["--model", "/no/such/folder"], "does not exist"),
        (["--data", "/no/such/file.jsonl"], "does not exist"),
        pytest.param(["--liger_kernel", "true"], "needs the liger-kernel package",
                     marks=pytest.mark.skipif(find_spec("liger_kernel") is not None, reason="liger-kernel is installed")),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, flags, message):
    out = tmp_path / "runs"
    done = subprocess.run([sys.executable, "-m", "gemma_qlora", "train", "--output_dir", str(out), *flags],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_unwritable_output_dir(fast_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="Cannot write to"):
        train(fast_cfg(output_dir=str(blocker / "runs")))


def test_merge_only_for_16bit():
    with pytest.raises(UserError, match="--merge only applies to --bits 16"):
        TrainConfig(bits=4, merge=True)


def test_lora_weights_stay_fp32_where_compute_is_not_bf16(fast_cfg, tmp_path):
    """TRL casts a quantized model's LoRA weights to bf16; fp16 AMP (a T4) then crashes at the
    first optimizer step, so the package keeps them fp32 unless compute is bf16."""
    from gemma_qlora.formats import load_examples
    from gemma_qlora.lora import attach_lora
    from gemma_qlora.model import load_model
    from gemma_qlora.quant import detect_precision
    from gemma_qlora.trainer import make_trainer

    cfg = fast_cfg()
    cpu = detect_precision("cpu")
    model, tokenizer = load_model(cfg, cpu)
    trainer = make_trainer(cfg, attach_lora(model, cfg), tokenizer, load_examples(cfg), precision=cpu, output_dir=tmp_path)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def test_quant_storage_for_fsdp_stores_4bit_weights_in_bf16(fast_cfg):
    """FSDP shards one flat float dtype: QLoRA+FSDP stores the packed 4-bit weights as bf16."""
    import bitsandbytes as bnb

    from gemma_qlora.model import load_model
    from gemma_qlora.quant import detect_precision

    cfg = fast_cfg(quant_storage="bfloat16")
    model, _ = load_model(cfg, detect_precision("cpu"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.dtype == torch.bfloat16 for m in layers)
    with pytest.raises(UserError, match="--quant_storage"):
        fast_cfg(quant_storage="int4")


def test_accelerate_launch_runs_the_train_command(tiny_model, quotes_file, tmp_path):
    """The multi-GPU entry point, `accelerate launch -m gemma_qlora train`, with one CPU process."""
    out = tmp_path / "runs"
    cmd = ["accelerate", "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "gemma_qlora", "train", "--model", tiny_model, "--data", quotes_file,
           "--steps", "2", "--batch_size", "2", "--max_seq_length", "128", "--eval_size", "4", "--max_new_tokens", "2",
           "--output_dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "4bit" / "metrics.json").read_text())["steps"] == 2


def test_two_processes_train_data_parallel_and_only_rank_0_writes(tiny_model, quotes_file, tmp_path):
    """Two CPU processes (gloo): DDP averages gradients, both ranks count tokens, and only rank 0
    generates and writes: one metrics.json, one adapter, no stray probe files. torchrun, since
    `accelerate launch --cpu` starts one process; on GPUs `accelerate launch --multi_gpu` starts
    the same torch.distributed workers."""
    out = tmp_path / "runs"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "gemma_qlora", "train", "--model", tiny_model, "--data", quotes_file,
           "--steps", "2", "--batch_size", "2", "--max_seq_length", "128", "--eval_size", "4", "--max_new_tokens", "2",
           "--logging_steps", "1", "--output_dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder written") == 1
    run = out / "4bit"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 2
    # tokens seen are summed over both ranks: 2 steps x 2 ranks x 2 sequences of at most 128 tokens
    assert 2 * 2 * 2 * 128 >= metrics["train_tokens"] > 2 * 2 * 128
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoints", "generations.json", "metrics.json", "run.json"]


def test_torch_compile_compiles_the_parts_of_each_layer_inside_its_checkpoint(fast_cfg, tmp_path):
    """--torch_compile compiles the norms, attention and MLP of every decoder layer, not the layer
    (whose forward holds the gradient checkpoint) nor the PEFT model; packed batches come padded
    to one shape (batch_size rows of max_seq_length), so the compiled code is not recompiled for each length; it trains; and
    generation afterwards runs eager, compiling nothing more."""
    from torch._dynamo.utils import counters

    from gemma_qlora.formats import load_examples
    from gemma_qlora.evaluate import generate
    from gemma_qlora.lora import attach_lora
    from gemma_qlora.model import load_model
    from gemma_qlora.quant import detect_precision
    from gemma_qlora.trainer import make_trainer

    cfg = fast_cfg(steps=2, torch_compile=True)
    precision = detect_precision()
    model, tokenizer = load_model(cfg, precision)
    trainer = make_trainer(cfg, attach_lora(model, cfg), tokenizer, load_examples(cfg), precision=precision, output_dir=tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    assert tuple(batch["input_ids"].shape) == (cfg.batch_size, cfg.max_seq_length)
    output = trainer.train()
    layers = trainer.model_wrapped.base_model.model.model.layers
    parts = [part for layer in layers for part in layer.children()]
    assert {"self_attn", "mlp", "input_layernorm"} <= {name for name, _ in layers[0].named_children()}
    assert all(part._compiled_call_impl is not None for part in parts)
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert type(trainer.model_wrapped).__name__ == "PeftModelForCausalLM"
    assert math.isfinite(output.training_loss)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    assert len(generate(trainer.model, tokenizer, ["Quote: A", "Quote: Be"], max_new_tokens=3)) == 2
    assert counters["stats"]["unique_graphs"] == graphs


def test_unset_torch_compile_compiles_only_where_it_pays_back():
    """Left unset, compiling is for 4-bit GPU runs long enough to win its cost back; set, it is obeyed."""
    from gemma_qlora.config import COMPILE_FROM_STEPS

    long, short = TrainConfig(steps=COMPILE_FROM_STEPS), TrainConfig(steps=COMPILE_FROM_STEPS - 1)
    assert TrainConfig().torch_compile is None
    assert long.compiles("cuda") and not short.compiles("cuda")
    assert not long.compiles("cpu") and not replace(long, bits=8).compiles("cuda") and not replace(long, bits=16).compiles("cuda")
    assert replace(short, torch_compile=True).compiles("cpu") and not replace(long, torch_compile=False).compiles("cuda")
    assert not long.compiles("cuda", processes=2) and replace(long, torch_compile=True).compiles("cuda", processes=2)
    with pytest.raises(UserError, match="--torch_compile must be true or false or unset"):
        TrainConfig(torch_compile="yes")  # a notebook's typo is caught, not read as true


def test_unset_liger_kernel_runs_liger_only_where_it_was_measured_faster(monkeypatch):
    """Left unset, Liger's kernels run on CUDA GPUs of compute capability 8.0+ with liger-kernel
    installed, in bf16 and nothing compiled; a T4 (7.5), fp16 (T4 emulation), a CPU and compiled runs stay on
    torch's ops; set, it is obeyed."""
    import importlib.util

    import gemma_qlora.config as config

    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability[0])
    monkeypatch.setattr(config, "find_spec", lambda name: object() if name == "liger_kernel" else importlib.util.find_spec(name))
    short = TrainConfig(steps=60)
    assert short.liger_kernel is None
    assert short.uses_liger("cuda") and not short.uses_liger("cpu")
    assert not replace(short, torch_compile=True).uses_liger("cuda")
    assert not replace(short, liger_kernel=False).uses_liger("cuda")
    capability[0] = (7, 5)
    assert not short.uses_liger("cuda") and replace(short, liger_kernel=True).uses_liger("cuda")
    capability[0] = (8, 0)
    assert short.uses_liger("cuda") and not replace(short, force_fp16=True).uses_liger("cuda")
    monkeypatch.setattr(config, "find_spec", lambda name: None)
    assert not short.uses_liger("cuda")


def test_liger_kernel_true_on_cpu_is_one_line(fast_cfg, monkeypatch):
    """Liger's kernels are Triton (GPU only): asked for on a CPU, make_trainer says so before building anything."""
    import gemma_qlora.config as config
    from gemma_qlora.train import Run

    monkeypatch.setattr(config, "find_spec", lambda name: object())
    run = Run(fast_cfg(liger_kernel=True))
    run.load()
    with pytest.raises(UserError, match="--liger_kernel true needs a CUDA GPU"):
        run.prepare()


def test_fsdp_on_two_cpu_processes_saves_a_whole_adapter(tiny_model, quotes_file, tmp_path):
    """The FSDP branch of `train` with the shipped config (FSDP2), on two CPU processes
    (`tests/fsdp_on_cpu.py` turns accelerate's FSDP on there): no evaluation before training,
    the Trainer gathers the sharded LoRA weights and saves them whole, rank 0 writes, and the
    adapter loads onto a fresh base."""
    from safetensors.torch import load_file

    from gemma_qlora.lora import load_adapter
    from gemma_qlora.model import load_model
    from gemma_qlora.quant import detect_precision

    out = tmp_path / "runs"
    runner = str(Path(__file__).with_name("fsdp_on_cpu.py"))
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", runner, "train", "--model", tiny_model, "--data", quotes_file,
           "--steps", "3", "--batch_size", "2", "--max_seq_length", "128", "--eval_size", "4", "--max_new_tokens", "2",
           "--logging_steps", "1", "--learning_rate", "1e-2", "--warmup_steps", "0", "--quant_storage", "float32", "--output_dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder written") == 1
    metrics = json.loads((out / "4bit" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 3
    assert metrics["eval_before"] is None and metrics["eval_loss"] > 0  # FSDP: no evaluate() before train()

    weights = load_file(out / "4bit" / "adapter" / "adapter_model.safetensors")
    hidden = json.loads((Path(tiny_model) / "config.json").read_text())["hidden_size"]
    q_a = next(v for k, v in weights.items() if "q_proj.lora_A" in k)
    assert q_a.shape == (8, hidden)  # whole, not one process's shard
    assert all(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # trained (B starts at zero)
    model, _ = load_model(TrainConfig(model=tiny_model, bits=4), detect_precision())
    assert load_adapter(model, str(out / "4bit" / "adapter")) is not None


def test_fsdp_config_ships_with_the_package_and_follows_the_qlora_recipe():
    """The accelerate config the README's FSDP command names: installed with the package,
    parsed by accelerate itself, FSDP2 with every process quantizing its own copy; the FSDP1
    settings (frozen and trainable weights sharing wrapped units) stay for --fsdp_version 1."""
    from importlib.resources import files

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = files("gemma_qlora") / "fsdp_qlora.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == DistributedType.FSDP
    fsdp = config.fsdp_config
    assert fsdp["fsdp_use_orig_params"] and fsdp["fsdp_sync_module_states"]
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the adapter is gathered to be saved
    assert not fsdp["fsdp_cpu_ram_efficient_loading"]  # load_model places each copy on its LOCAL_RANK GPU
    assert fsdp["fsdp_version"] == 2  # FSDP2: ran on the GPUs with the default fused AdamW
    assert config.mixed_precision == "no"  # the package's dtype choice (bf16, or fp16 on a T4) decides


def test_all_steps_runs_the_recipe_in_order(monkeypatch):
    """`train()` and the notebooks' chat section call `Run.all_steps`, which names each step."""
    from gemma_qlora.train import STEPS, Run

    called = []
    for step in STEPS:
        monkeypatch.setattr(Run, step, lambda self, step=step: called.append(step) or {"step": step})
    assert Run.all_steps(object.__new__(Run)) == {"step": "save"} and called == list(STEPS)
