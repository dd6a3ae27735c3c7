"""The fine-tuning recipe: load, attach LoRA, train with TRL's SFTTrainer, evaluate, save.

`train(cfg)` runs one arm and writes its run folder:

    <output_dir>/<run_name>/
        metrics.json      settings, versions, GPU, memory by phase, losses, eval, speed
        generations.json  the prompts' continuations before and after training
        adapter/          the LoRA adapter (safetensors), reloadable onto a fresh base
        checkpoints/      resumable Trainer checkpoints (with --save_steps)
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed
from transformers.modeling_layers import GradientCheckpointingLayer
from trl import SFTConfig, SFTTrainer

from gemma_qlora.config import TrainConfig
from gemma_qlora.data import PROMPTS, check_fits, load_quotes, to_text
from gemma_qlora.errors import UserError
from gemma_qlora.evaluate import attributable, author_accuracy, generate
from gemma_qlora.lora import attach_lora, parameter_counts
from gemma_qlora.memory import GIB, MemoryRecord, MemoryRecorder
from gemma_qlora.model import load_model
from gemma_qlora.quant import Precision, cap_gpu_memory, detect_precision

# bitsandbytes logs a line for every int8 matmul whose inputs are not fp16 (bf16 GPUs, CPU).
logging.getLogger("bitsandbytes.autograd._functions").addFilter(lambda record: "will be cast" not in record.getMessage())

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


class StepTimer(TrainerCallback):
    """Wall time and non-pad tokens seen at every optimizer step, for steady-state tokens/s, and
    the GPU memory held between steps (weights, LoRA, optimizer state: what FSDP shards)."""

    def __init__(self):
        self.steps: list[tuple[int, float, int]] = []
        self.allocated: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.allocated.append(torch.cuda.memory_allocated())
        self.steps.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen)))

    def tokens_per_second(self, warmup: int) -> float | None:
        timed = [s for s in self.steps if s[0] > warmup]
        if len(timed) < 2:
            timed = self.steps
        if len(timed) < 2:
            return None
        (_, t0, n0), (_, t1, n1) = timed[0], timed[-1]
        return (n1 - n0) / (t1 - t0)


def sft_config(cfg: TrainConfig, precision: Precision, output_dir: Path) -> SFTConfig:
    """Map our settings onto TRL's, with dtypes that agree with how the model was loaded."""
    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps,
        max_length=cfg.max_seq_length,
        packing=cfg.packing,
        packing_strategy="bfd",
        dataset_text_field="text",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim=cfg.optim,
        bf16=precision.bf16,
        fp16=precision.fp16,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps or max(1, cfg.steps // 4),
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2,
        auto_find_batch_size=cfg.auto_batch_size,
        use_liger_kernel=cfg.liger_kernel,
        # Compiled code wants one shape: pad every packed batch to its full size, or new lengths
        # recompile with dynamic shapes (with whole layers compiled, that recompile failed in
        # inductor on the H200).
        pad_to_multiple_of=cfg.batch_size * cfg.max_seq_length if cfg.torch_compile and cfg.packing else None,
        include_num_input_tokens_seen="non_padding",
        report_to=cfg.report_to,
        use_cpu=precision.device == "cpu",
    )


def prepare_run_dir(cfg: TrainConfig) -> Path:
    run_dir = Path(cfg.output_dir).expanduser() / cfg.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # per process: ranks of one launch share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"Cannot write to {run_dir} ({error.strerror}): choose another --output_dir.") from None
    return run_dir


def write_json(path: Path, data) -> None:
    """Write-then-rename, so a crash never leaves a half-written file under the real name."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserError(f"Could not write {path} ({error.strerror}): free disk space or choose another --output_dir.") from None


def save_adapter(model, path: Path) -> None:
    """Save to a sibling folder, then swap it in: a failed save leaves the old adapter (or none)."""
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
    except (OSError, RuntimeError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"Could not save the adapter to {path} ({error}): free disk space or choose another --output_dir.") from None
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def environment(precision: Precision) -> dict:
    env = {"versions": {lib: version(lib) for lib in LIBRARIES}, "device": precision.device, "dtype": precision.name}
    if precision.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def newest_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing. It writes trainer_state.json last,
    so a folder killed mid-save lacks it (or holds it truncated) and is skipped."""
    complete = []
    for path in folder.glob("checkpoint-*"):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if path.name.split("-")[-1].isdigit():
            complete.append((int(path.name.split("-")[-1]), str(path)))
    return max(complete)[1] if complete else None


def out_of_memory(cfg: TrainConfig, run_dir: Path) -> UserError:
    return UserError(
        f"Out of GPU memory in run {cfg.name} (bits={cfg.bits}, micro-batch {cfg.batch_size} x {cfg.max_seq_length} tokens, "
        f"LoRA r={cfg.lora_r}). Try --batch_size {max(1, cfg.batch_size // 2)} (with --grad_accum {cfg.grad_accum * 2} to keep "
        f"the batch), a shorter --max_seq_length, {'--bits 4, ' if cfg.bits != 4 else ''}or --auto_batch_size true to halve "
        f"the micro-batch automatically. Files written so far stay in {run_dir}."
    )


def compile_layer_parts(model) -> None:
    """torch.compile the parts of every decoder layer (norms, attention, MLP), in place.

    Not the layers themselves (accelerate's regional compilation): a decoder layer's forward
    holds its gradient checkpointing, and compiled around it, inductor chose for itself what to
    keep for the backward: 9.0 GiB allocator peak for the Gemma-2B shape on the H200, against
    3.4 GiB uncompiled. Compiled inside the checkpoint, the parts are recomputed in the backward
    as in eager mode: 3.7 GiB, at twice the steps per second (README, "Speed and memory"). The
    parts of all layers share their code, so each compiles once and is reused by every layer.
    """
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            for part in layer.children():
                part.compile()


def make_trainer(cfg: TrainConfig, model, tokenizer, quotes, precision: Precision, callbacks=()) -> SFTTrainer:
    """TRL's SFTTrainer on the formatted `text` of the train and held-out splits."""
    train_text, eval_text = to_text(quotes["train"], tokenizer.eos_token), to_text(quotes["test"], tokenizer.eos_token)
    check_fits(train_text, tokenizer, cfg.max_seq_length)
    if cfg.torch_compile:
        compile_layer_parts(model)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(cfg, precision, prepare_run_dir(cfg) / "checkpoints"),
        train_dataset=train_text,
        eval_dataset=eval_text,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    if precision.compute_dtype != torch.bfloat16:
        # TRL casts a quantized model's LoRA weights to bf16 (the QLoRA paper's choice). fp16 mixed
        # precision (a T4) cannot unscale bf16 gradients and crashes at the first step, and an fp32
        # CPU run would compute LoRA in bf16: keep them in fp32 there.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return trainer


def authors_check(model, tokenizer, quotes, n: int) -> dict:
    """Author accuracy on up to `n` held-out quotes whose author the training split has."""
    records = attributable(list(quotes["test"]), set(quotes["train"]["author"]))[:n]
    return author_accuracy(model, tokenizer, records)


def is_main_process() -> bool:
    """Rank 0 of an `accelerate launch`/`torchrun` job, or a plain single process."""
    return int(os.environ.get("RANK", 0)) == 0


def train(cfg: TrainConfig) -> dict:
    """Run one arm end to end and return its metrics (also written to metrics.json).

    The notebooks call the same steps one cell at a time. Under `accelerate launch` every
    process trains (the Trainer averages gradients, or shards under FSDP) and evaluates;
    only rank 0 generates, saves and writes files.
    """
    precision = detect_precision(force_fp16=cfg.force_fp16)
    if precision.device == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before the memory recorder picks its GPU
    main = is_main_process()
    if cfg.gpu_memory_gib and precision.device == "cuda":
        cap_gpu_memory(cfg.gpu_memory_gib)
    run_dir = prepare_run_dir(cfg)
    set_seed(cfg.seed)
    recorder = MemoryRecorder()
    metrics: dict = {"run": cfg.name, "config": asdict(cfg), **environment(precision)}

    quotes = load_quotes(cfg.data, cfg.quote_column, cfg.author_column, cfg.eval_size, cfg.max_train_examples)
    metrics["examples"] = {"train": len(quotes["train"]), "eval": len(quotes["test"])}
    t0 = time.perf_counter()
    with recorder.phase("load"):
        model, tokenizer = load_model(
            cfg.model, cfg.bits, precision, cfg.quant_type, cfg.double_quant, cfg.attn_implementation,
            getattr(torch, cfg.quant_storage) if cfg.quant_storage else None,
        )
    metrics["load_seconds"] = time.perf_counter() - t0
    metrics["model_footprint_gib"] = model.get_memory_footprint() / GIB
    metrics["model_type"] = model.config.model_type

    before = []
    if main:
        with recorder.phase("generate_before"):
            before = generate(model, tokenizer, PROMPTS, cfg.max_new_tokens)
            if cfg.author_eval:
                metrics["authors_before"] = authors_check(model, tokenizer, quotes, cfg.author_eval)

    with recorder.phase("prepare"):  # LoRA, and TRL formatting/tokenizing/packing the data
        model = attach_lora(
            model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.gradient_checkpointing, cfg.lean_prepare
        )
        timer = StepTimer()
        trainer = make_trainer(cfg, model, tokenizer, quotes, precision, callbacks=[timer])
    metrics["parameters"] = parameter_counts(model)
    fsdp = trainer.is_fsdp_enabled
    metrics["eval_before"] = None
    if not fsdp:
        # Under FSDP the Trainer must wrap model and optimizer together when training starts; an
        # evaluate() first wraps the model alone and training then fails without an optimizer
        # (seen with transformers 5.24 + accelerate 1.15, FSDP1 and FSDP2).
        with recorder.phase("eval_before"):
            metrics["eval_before"] = trainer.evaluate()["eval_loss"]
    t0 = time.perf_counter()
    checkpoint = newest_checkpoint(run_dir / "checkpoints") if cfg.resume else None
    if cfg.resume and checkpoint is None:
        print(f"No complete checkpoint in {run_dir / 'checkpoints'}: starting from step 0.", flush=True)
    with recorder.phase("train"):
        try:
            trainer.train(resume_from_checkpoint=checkpoint)
        except torch.OutOfMemoryError:
            raise out_of_memory(cfg, run_dir) from None
    metrics["train_seconds"] = time.perf_counter() - t0
    metrics["resumed_from"] = checkpoint
    with recorder.phase("eval_after"):
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    if fsdp:
        # FSDP holds a shard of the model per GPU: every rank takes part while the Trainer
        # gathers the adapter and rank 0 saves it
        trainer.save_model(str(run_dir / "adapter"))
    if not main:
        recorder.stop()
        return {}
    if fsdp:
        after = ["(not generated: FSDP shards the model)"] * len(PROMPTS)
    else:
        with recorder.phase("generate_after"):
            after = generate(model, tokenizer, PROMPTS, cfg.max_new_tokens)
            if cfg.author_eval:
                metrics["authors_after"] = authors_check(model, tokenizer, quotes, cfg.author_eval)
        save_adapter(model, run_dir / "adapter")

    metrics.update(training_metrics(trainer, timer, cfg, metrics["eval_before"]))
    metrics["processes"] = trainer.args.world_size
    if cfg.merge:
        merged = model.merge_and_unload()
        save_adapter(merged, run_dir / "merged")
        tokenizer.save_pretrained(str(run_dir / "merged"))
    write_json(run_dir / "generations.json", [{"prompt": p, "before": b, "after": a} for p, b, a in zip(PROMPTS, before, after)])
    metrics.update(memory_metrics(recorder.stop()))
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def training_metrics(trainer: SFTTrainer, timer: StepTimer, cfg: TrainConfig, eval_before: float | None) -> dict:
    """Loss curves, perplexity and speed from the trainer's log (whose last eval is the
    final one) and the step timer; `eval_before` is the held-out loss before training (None
    where it was not measured)."""
    history = trainer.state.log_history
    losses = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
    evals = [{"step": 0, "eval_loss": eval_before}] if eval_before is not None else []
    evals += [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h]
    evals = [e for i, e in enumerate(evals) if i == 0 or e["step"] != evals[i - 1]["step"]]
    tokens = int(trainer.state.num_input_tokens_seen)
    seconds = timer.steps[-1][1] - timer.steps[0][1] if len(timer.steps) > 1 else None
    return {
        "loss_history": losses,
        "eval_history": evals,
        "final_train_loss": losses[-1]["loss"] if losses else None,
        "steps": trainer.state.global_step,
        "train_tokens": tokens,
        # transformers logs the running train_runtime with every logged step: the last one is the run's
        "tokens_per_second": tokens / next(h["train_runtime"] for h in reversed(history) if "train_runtime" in h),
        "steady_tokens_per_second": timer.tokens_per_second(warmup=min(5, cfg.steps // 5)),
        "step_seconds": seconds / (len(timer.steps) - 1) if seconds else None,
        # the last step's, not the end of training: an evaluation leaves FSDP's root unit unsharded
        "allocated_between_steps_gib": timer.allocated[-1] / GIB if timer.allocated else None,
        "perplexity_before": math.exp(eval_before) if eval_before is not None else None,
        "perplexity": math.exp(evals[-1]["eval_loss"]),
    }


def memory_metrics(memory: MemoryRecord) -> dict:
    """The recorder's samples and phases, plus the figures the tables quote."""
    load = next((p for p in memory.phases if p.name == "load"), None)
    return {
        "memory": memory.to_dict(),
        "memory_after_load_gib": load.end_sampled_gib if load else None,
        "allocated_after_load_gib": load.end_allocated_gib if load else None,
        "peak_train_gib": memory.peak("train"),
        "peak_generate_gib": memory.peak("generate_after"),
    }
