"""The fine-tuning recipe, as named steps.

`train(cfg)` runs every step of `STEPS` in order; the notebooks run the same steps one cell
at a time, so a phase name or a metric key is written once, here:

    run = Run(cfg)          # dtypes from the hardware, the run folder, the memory recorder
    run.load()              # the data split and the quantized model
    run.generate_before()   # the prompts' continuations (and author accuracy) before training
    run.prepare()           # LoRA, and TRL's trainer tokenizing and packing the data
    run.evaluate_before()   # held-out loss before training
    run.train()
    run.evaluate_after()    # held-out loss, perplexity, speed
    run.generate_after()
    run.save()              # adapter, generations.json, metrics.json

Under `accelerate launch` every process trains (the Trainer averages gradients, or shards
under FSDP) and evaluates; only rank 0 generates, prints and writes files.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict

import torch
from transformers import set_seed

from gemma_qlora import formats
from gemma_qlora.config import TrainConfig
from gemma_qlora.data import PROMPTS, load_examples
from gemma_qlora.evaluate import attributable, author_accuracy, generate
from gemma_qlora.lora import attach_lora, parameter_counts
from gemma_qlora.memory import GIB, MemoryRecorder
from gemma_qlora.metrics import StepTimer, environment, memory_metrics, training_metrics
from gemma_qlora.model import load_model, resolve_model
from gemma_qlora.quant import cap_gpu_memory, detect_precision
from gemma_qlora.rundir import newest_checkpoint, prepare_run_dir, save_adapter, write_json
from gemma_qlora.trainer import make_trainer, out_of_memory

# bitsandbytes logs a line for every int8 matmul whose inputs are not fp16 (bf16 GPUs, CPU).
logging.getLogger("bitsandbytes.autograd._functions").addFilter(lambda record: "will be cast" not in record.getMessage())

STEPS = ("load", "generate_before", "prepare", "evaluate_before", "train", "evaluate_after", "generate_after", "save")


def is_main_process() -> bool:
    """Rank 0 of an `accelerate launch`/`torchrun` job, or a plain single process."""
    return int(os.environ.get("RANK", 0)) == 0


class Run:
    """One run's state between its steps: settings, hardware, model, trainer and metrics."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.precision = detect_precision(force_fp16=cfg.force_fp16)
        if self.precision.device == "cuda" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before the memory recorder picks its GPU
        self.main = is_main_process()
        if cfg.gpu_memory_gib and self.precision.device == "cuda":
            cap_gpu_memory(cfg.gpu_memory_gib)
        self.run_dir = prepare_run_dir(cfg)
        set_seed(cfg.seed)
        self.recorder = MemoryRecorder()
        self.metrics: dict = {"run": cfg.name, "config": asdict(cfg), **environment(self.precision)}
        self.timer = StepTimer()
        self.data = self.model = self.tokenizer = self.trainer = None
        self.before: list[str] = []
        self.after: list[str] = []
        self.format = "quote"
        self.prompts: list[str] = list(PROMPTS)  # generated from before and after training
        if self.precision.device == "cuda":
            gpu = torch.cuda.get_device_properties(torch.cuda.current_device())
            self.say(f"GPU: {gpu.name}, compute capability {gpu.major}.{gpu.minor}, {gpu.total_memory / GIB:.1f} GiB")
        else:
            self.say("No GPU: running on the CPU (slow; memory is this process's RSS, not GPU memory)")
        p = self.precision
        self.say(f"compute dtype {p.name} (trainer bf16={p.bf16}, fp16={p.fp16}); recording {self.recorder.record.label}")

    def say(self, line: str) -> None:
        if self.main:
            print(line, flush=True)

    @property
    def fsdp(self) -> bool:
        return self.trainer is not None and self.trainer.is_fsdp_enabled

    def load(self) -> None:
        """The data, split with a fixed held-out part, and the model, quantized as it loads."""
        cfg, t0 = self.cfg, time.perf_counter()
        resolve_model(cfg.model)  # a missing model folder is said before the data is read
        with self.recorder.phase("load"):
            self.data = load_examples(cfg)
            # Encoded (token ids, labels masked as the format says) with the model's tokenizer before
            # the model loads or anything is written, so that a bad example costs neither.
            tokenizer = formats.load_tokenizer(cfg.model)
            formats.use_chat_template(tokenizer, cfg)
            self.data, counts = formats.encode_splits(self.data, tokenizer, max_length=cfg.max_seq_length)
            self.format = counts["train"].format
            self.model, self.tokenizer = load_model(cfg, self.precision)
            formats.use_chat_template(self.tokenizer, cfg)
        if self.format != "quote":
            self.prompts = formats.generation_prompts(self.data["test"], self.tokenizer)
        if self.format == "messages":
            formats.stop_at_end_of_turn(self.model, self.tokenizer)
        self.metrics["data"] = {split: asdict(c) for split, c in counts.items()}
        if counts["train"].too_long:
            self.say(formats.too_long_line(counts["train"], cfg.max_seq_length))
        m = self.metrics
        m["load_seconds"] = time.perf_counter() - t0
        m["examples"] = {"train": len(self.data["train"]), "eval": len(self.data["test"])}
        m["model_footprint_gib"] = self.model.get_memory_footprint() / GIB
        m["model_type"] = self.model.config.model_type
        self.say(f"{m['examples']['train']} examples to train on, {m['examples']['eval']} held out; {m['model_type']} "
                 f"loaded in {m['load_seconds']:.0f} s, its weights take {m['model_footprint_gib']:.2f} GiB")

    def authors(self) -> dict:
        """Author accuracy on up to `author_eval` held-out quotes whose author the training split has."""
        records = attributable(list(self.data["test"]), set(self.data["train"]["author"]))[: self.cfg.author_eval]
        return author_accuracy(self.model, self.tokenizer, records)

    def generate_before(self) -> None:
        if not self.main:
            return
        with self.recorder.phase("generate_before"):
            self.before = generate(self.model, self.tokenizer, self.prompts, max_new_tokens=self.cfg.max_new_tokens)
            if self.cfg.author_eval and self.format == "quote":
                self.metrics["authors_before"] = self.authors()
        for prompt, text in zip(self.prompts, self.before):
            self.say(f"before training: {prompt}{text}")

    def prepare(self) -> None:
        """LoRA on the frozen base, and TRL's trainer (which tokenizes and packs the data)."""
        with self.recorder.phase("prepare"):
            self.model = attach_lora(self.model, self.cfg)
            self.trainer = make_trainer(
                self.cfg, self.model, self.tokenizer, self.data,
                precision=self.precision, output_dir=self.run_dir / "checkpoints", callbacks=[self.timer],
            )
        self.metrics["parameters"] = parameter_counts(self.model)
        self.say("trainable parameters: {trainable:,} of {total:,} ({trainable_percent}%)".format(**self.metrics["parameters"]))

    def evaluate_before(self) -> None:
        self.metrics["eval_before"] = None
        if self.fsdp:
            # Under FSDP the Trainer must wrap model and optimizer together when training starts;
            # an evaluate() first wraps the model alone and training then has no optimizer.
            return
        with self.recorder.phase("eval_before"):
            self.metrics["eval_before"] = self.trainer.evaluate()["eval_loss"]
        self.say(f"held-out loss before training: {self.metrics['eval_before']:.3f}")

    def train(self) -> None:
        cfg, t0 = self.cfg, time.perf_counter()
        checkpoint = newest_checkpoint(self.run_dir / "checkpoints") if cfg.resume else None
        if cfg.resume and checkpoint is None:
            self.say(f"No complete checkpoint in {self.run_dir / 'checkpoints'}: starting from step 0.")
        with self.recorder.phase("train"):
            try:
                self.trainer.train(resume_from_checkpoint=checkpoint)
            except torch.OutOfMemoryError:
                raise out_of_memory(cfg, self.run_dir) from None
        self.metrics["train_seconds"] = time.perf_counter() - t0
        self.metrics["resumed_from"] = checkpoint

    def evaluate_after(self) -> None:
        m = self.metrics
        with self.recorder.phase("eval_after"):
            m["eval_loss"] = self.trainer.evaluate()["eval_loss"]
        m.update(training_metrics(self.trainer, self.timer, warmup=min(5, self.cfg.steps // 5), eval_before=m["eval_before"]))
        m["processes"] = self.trainer.args.world_size
        before = "n/a" if m["eval_before"] is None else f"{m['eval_before']:.3f}"
        speed = m["steady_tokens_per_second"] or m["tokens_per_second"]
        self.say(f"held-out loss {before} -> {m['eval_loss']:.3f} (perplexity {m['perplexity']:.1f}); "
                 f"{m['steps']} steps in {m['train_seconds']:.0f} s, {speed:,.0f} tokens/s")

    def generate_after(self) -> None:
        if self.fsdp:
            self.after = ["(not generated: FSDP shards the model)"] * len(self.prompts)
            return
        if not self.main:
            return
        with self.recorder.phase("generate_after"):
            self.after = generate(self.model, self.tokenizer, self.prompts, max_new_tokens=self.cfg.max_new_tokens)
            if self.cfg.author_eval and self.format == "quote":
                self.metrics["authors_after"] = self.authors()
        for prompt, old, new in zip(self.prompts, self.before, self.after):
            self.say(f"{prompt}\n  before: {old!r}\n  after:  {new!r}")
        before, after = self.metrics.get("authors_before"), self.metrics.get("authors_after")
        if after and after["n"]:
            self.say(f"author named on {after['n']} held-out quotes: {before['accuracy']:.0%} before, {after['accuracy']:.0%} after")
        elif self.cfg.author_eval and self.format == "quote":
            self.say("no held-out quote is by an author the training split has seen: author accuracy skipped")

    def save(self) -> dict:
        """The adapter, generations.json and metrics.json (rank 0); stops the memory recorder."""
        if self.fsdp:
            # FSDP holds a shard of the model per GPU: every rank takes part while the Trainer
            # gathers the adapter and rank 0 saves it
            self.trainer.save_model(str(self.run_dir / "adapter"))
        if not self.main:
            self.recorder.stop()
            return {}
        if not self.fsdp:
            save_adapter(self.model, self.run_dir / "adapter")
        if self.cfg.merge:
            merged = self.model.merge_and_unload()
            save_adapter(merged, self.run_dir / "merged")
            self.tokenizer.save_pretrained(str(self.run_dir / "merged"))
        generations = [{"prompt": p, "before": b, "after": a} for p, b, a in zip(self.prompts, self.before, self.after)]
        write_json(self.run_dir / "generations.json", generations)
        self.metrics.update(memory_metrics(self.recorder.stop()))
        write_json(self.run_dir / "metrics.json", self.metrics)
        self.say(f"run folder written: {self.run_dir}")
        return self.metrics


def train(cfg: TrainConfig) -> dict:
    """Run every step and return the metrics (also in metrics.json); {} on ranks other than 0."""
    run = Run(cfg)
    for step in STEPS:
        getattr(run, step)()
    return run.metrics if run.main else {}
