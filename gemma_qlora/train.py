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

import gc
import logging
import math
import os
import time
from dataclasses import asdict

import torch
from transformers import TrainerCallback, set_seed

from gemma_qlora import formats
from gemma_qlora.config import TrainConfig
from gemma_qlora.data import PROMPTS
from gemma_qlora.plan import current_gpu, fit_micro_batch
from gemma_qlora.errors import UserError
from gemma_qlora.evaluate import attributable, author_accuracy, generate
from gemma_qlora.lora import attach_lora, check_targets, parameter_counts
from gemma_qlora.memory import GIB, MemoryRecorder
from gemma_qlora.metrics import StepTimer, environment, memory_metrics, training_metrics
from gemma_qlora.model import base_fingerprint, check_model_folder, hf_token, load_config, load_model, module_names, resolve_model
from gemma_qlora.quant import cap_gpu_memory, detect_precision
from gemma_qlora.rundir import (
    WRITE_ERRORS,
    check_run_dir,
    guard_checkpoint_writes,
    newest_checkpoint,
    prepare_run_dir,
    remove_damaged_checkpoints,
    replace_folder,
    run_dir_for,
    save_adapter,
    unlock,
    write_json,
)
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
        if cfg.auto_batch_size and self.precision.device == "cuda":
            # the micro-batch the memory plan predicts to fit, before anything loads; the global
            # batch stays (accumulation makes it up), and accelerate's finder still halves on OOM
            planned = fit_micro_batch(cfg, current_gpu(cfg.gpu_memory_gib))
            if (planned.batch_size, planned.grad_accum) != (cfg.batch_size, cfg.grad_accum):
                print(f"--auto_batch_size: micro-batch {planned.batch_size} x {planned.grad_accum} accumulated "
                      f"(the memory plan's largest that fits; asked {cfg.batch_size} x {cfg.grad_accum})", flush=True)
            cfg = self.cfg = planned
        # The folder is only checked here (a name, not in use, continued or replaced as asked);
        # `load` claims it once the model and data have passed their checks, so that bad input
        # writes nothing.
        self.run_dir = run_dir_for(cfg)
        if self.main:
            check_run_dir(cfg)
        self.guard = FiniteGuard()
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

    def close(self) -> None:
        """Let the model and trainer go and give their GPU memory back, before another run loads."""
        self.model = self.trainer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def fsdp(self) -> bool:
        return self.trainer is not None and self.trainer.is_fsdp_enabled

    def load(self) -> None:
        """The data, split with a fixed held-out part, and the model, quantized as it loads; the
        run folder is claimed between the cheap checks and the heavy load."""
        cfg, t0 = self.cfg, time.perf_counter()
        path = resolve_model(cfg.model)  # a missing model folder is said before the data is read
        with self.recorder.phase("load"):
            check_model_folder(path)  # config, tokenizer and weight files, before anything heavy
            config = load_config(path, hf_token())
            check_context_length(cfg, config)
            check_targets(cfg.lora_targets, module_names(config))
            # Encoded (token ids, labels masked as the format says) with the model's tokenizer before
            # the model loads or anything is written, so that a bad example costs neither.
            self.data, counts, _ = formats.encoded_examples(cfg)
            self.format = counts["train"].format
            self.run_dir = prepare_run_dir(cfg, main=self.main)
            self.model, self.tokenizer = load_model(cfg, self.precision)
            formats.use_chat_template(self.tokenizer, cfg)
            # what identifies the base (config, sampled weight hashes; once loaded, a Hub model's weights
            # are in the cache): export refuses a base that changed since
            self.metrics["base"] = base_fingerprint(cfg.model)
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
        if self.cfg.torch_compile is None and self.cfg.compiles(self.precision.device):
            self.say(f"Compiling each decoder layer's parts (a 4-bit GPU run of {self.cfg.steps} steps, where it pays back; "
                     "--torch_compile false skips it): the first step waits for it.")
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
        before = self.metrics.get("eval_before")
        if before is not None and not math.isfinite(before):
            raise UserError(
                f"The held-out loss before training is {before} in {self.precision.name}: the model's weights are damaged, or its "
                "activations overflow this dtype (fp16); check the model files, or use a GPU with bf16. Nothing was trained."
            )
        folder = self.run_dir / "checkpoints"
        checkpoint = newest_checkpoint(folder, before=cfg.steps) if cfg.resume else None
        if cfg.resume and self.main:
            damaged = remove_damaged_checkpoints(folder)
            if damaged:
                self.say(f"Skipped and removed damaged checkpoint(s) {', '.join(damaged)}.")
        if cfg.resume and checkpoint is None:
            self.say(f"No complete checkpoint in {folder}: starting from step 0.")
        if self.guard not in self.trainer.callback_handler.callbacks:
            self.trainer.add_callback(self.guard)
        guard_checkpoint_writes(self.trainer, main=self.main)
        with self.recorder.phase("train"):
            try:
                self.trainer.train(resume_from_checkpoint=checkpoint)
            except BaseException as error:
                close_progress_bars(self.trainer)  # else tqdm redraws the bar after the error's line
                if isinstance(error, torch.OutOfMemoryError):
                    raise out_of_memory(cfg, self.run_dir) from None
                if isinstance(error, KeyboardInterrupt):
                    raise KeyboardInterrupt(self.interrupted()) from None
                raise
        self.guard.check(cfg)
        self.metrics["train_seconds"] = time.perf_counter() - t0
        self.metrics["resumed_from"] = checkpoint

    def interrupted(self) -> str:
        """What an interrupted training kept, and how to go on."""
        step = self.trainer.state.global_step
        kept = newest_checkpoint(self.run_dir / "checkpoints") if self.cfg.save_steps else None
        if kept:
            return (f"training stopped at step {step} of {self.cfg.steps}; {kept} is kept: "
                    "run the same command with --resume true to continue from it.")
        if self.cfg.save_steps:
            return (f"training stopped at step {step} of {self.cfg.steps}, before its first checkpoint "
                    f"(every {self.cfg.save_steps} steps): nothing is kept; run the command again to start over.")
        return (f"training stopped at step {step} of {self.cfg.steps}: nothing is kept (no checkpoints without "
                "--save_steps); run again with --save_steps N to be able to resume after an interruption.")

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

    def all_steps(self) -> dict:
        """Every step of `STEPS`, in order; the metrics ({} on ranks other than 0)."""
        self.load()
        self.generate_before()
        self.prepare()
        self.evaluate_before()
        self.train()
        self.evaluate_after()
        self.generate_after()
        return self.save()

    def save(self) -> dict:
        """The adapter, generations.json and metrics.json (rank 0), only from finite weights and
        losses; stops the memory recorder and lets go of the run folder."""
        self.guard.check(self.cfg, model=self.model, eval_loss=self.metrics.get("eval_loss"))  # every rank
        if self.main:
            # the figures of an earlier save never sit beside the adapter about to be written
            for name in ("metrics.json", "generations.json"):
                (self.run_dir / name).unlink(missing_ok=True)
        if self.fsdp:
            # FSDP holds a shard of the model per GPU: every rank takes part while the Trainer
            # gathers the adapter and rank 0 saves it, beside the real name until it is whole
            partial = self.run_dir / "adapter.partial"
            try:
                self.trainer.save_model(str(partial))
            except WRITE_ERRORS as error:
                raise UserError(f"Could not save {self.run_dir / 'adapter'} ({error}): free disk space or choose another --output_dir.") from None
            if self.main:
                replace_folder(partial, self.run_dir / "adapter")
        if not self.main:
            self.recorder.stop()
            return {}
        if not self.fsdp:
            save_adapter(self.model, self.run_dir / "adapter")
        if self.cfg.merge:
            merged = self.model.merge_and_unload()
            save_adapter(merged, self.run_dir / "merged", tokenizer=self.tokenizer)
        generations = [{"prompt": p, "before": b, "after": a} for p, b, a in zip(self.prompts, self.before, self.after)]
        write_json(self.run_dir / "generations.json", generations)
        self.metrics.update(memory_metrics(self.recorder.stop()))
        write_json(self.run_dir / "metrics.json", self.metrics)
        unlock(self.run_dir)
        self.say(f"run folder written: {self.run_dir}")
        return self.metrics


def check_context_length(cfg: TrainConfig, config) -> None:
    """Refuse a sequence length beyond the positions the model was trained for: its rotary
    positions would be extrapolated, and an absurd length only fills memory while packing."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if limit and cfg.max_seq_length > limit:
        raise UserError(
            f"--max_seq_length {cfg.max_seq_length:,} is beyond the {limit:,} positions {cfg.model} handles: "
            f"give --max_seq_length {limit:,} or less."
        )


def close_progress_bars(trainer) -> None:
    """Close the Trainer's progress bars, which an exception leaves open."""
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None:
                bar.close()
                setattr(callback, name, None)


def lora_weights_finite(model) -> bool:
    """Whether every trainable weight is finite, agreed by all processes of a launch (each
    checks its own shard under FSDP)."""
    params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bad = torch.zeros((), device=device)
    for p in params:
        bad = torch.maximum(bad, (~torch.isfinite(p.detach())).any().to(device, torch.float32))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())


class FiniteGuard(TrainerCallback):
    """Finite or fail: stops training at the first non-finite training loss, held-out loss or
    LoRA weight (checked whenever the Trainer logs, evaluates or saves, so that no checkpoint is
    written from broken weights), and turns it into one line instead of an adapter of NaNs."""

    def __init__(self):
        self.problem: tuple[str, int] | None = None

    def stop(self, control, state, what: str) -> None:
        if self.problem is None:
            self.problem = (what, state.global_step)
        control.should_training_stop = True
        control.should_save = control.should_evaluate = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        due = control.should_log or control.should_save or control.should_evaluate or state.global_step >= state.max_steps
        if due and model is not None and not lora_weights_finite(model):
            self.stop(control, state, "the LoRA weights")

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.stop(control, state, "the training loss")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is not None and not math.isfinite(loss):
            self.stop(control, state, "the held-out loss")

    def check(self, cfg: TrainConfig, *, model=None, eval_loss: float | None = None) -> None:
        """Raise the one line if anything went non-finite (and, given `model`, check its weights now)."""
        if self.problem is None and eval_loss is not None and not math.isfinite(eval_loss):
            self.problem = ("the held-out loss", None)
        if self.problem is None and model is not None and not lora_weights_finite(model):
            self.problem = ("the LoRA weights", None)
        if self.problem is None:
            return
        what, step = self.problem
        at = f" at step {step}" if step is not None else ""
        raise UserError(
            f"Training diverged: {what} became NaN or infinite{at} with --learning_rate {cfg.learning_rate:g}; no adapter was saved. "
            f"Try a lower --learning_rate (e.g. {cfg.learning_rate / 10:g}) or more --warmup_steps."
        )


def train(cfg: TrainConfig) -> dict:
    """Run every step and return the metrics (also in metrics.json); {} on ranks other than 0."""
    return Run(cfg).all_steps()
