"""TRL's `SFTTrainer`, configured from a `TrainConfig`, with dtypes that agree with how the
model was loaded."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.integrations.liger import apply_liger_kernel
from transformers.modeling_layers import GradientCheckpointingLayer
from trl import SFTConfig, SFTTrainer

from gemma_qlora.config import TrainConfig
from gemma_qlora.formats import trainable
from gemma_qlora.fused_lora import remove_fused_lora
from gemma_qlora.gc_scope import frozen_heap
from gemma_qlora.errors import UserError
from gemma_qlora.packing import make_collator
from gemma_qlora.quant import Precision
from gemma_qlora.varlen_attention import use_varlen_attention

# Liger's kernels that make a step faster without touching the loss (measured in docs/speed.md);
# its cross-entropy kernels would replace TRL's chunked loss and its metrics
LIGER_LAYER_KERNELS = {"rms_norm": True, "rope": True, "geglu": True, "cross_entropy": False,
                       "fused_linear_cross_entropy": False}


def sft_config(cfg: TrainConfig, *, precision: Precision, output_dir: Path) -> SFTConfig:
    """Map our settings onto TRL's."""
    flat, compiled = cfg.packing and cfg.packing_layout == "flat", cfg.compiles(precision.device)
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
        activation_offloading=cfg.offload_activations and precision.device == "cuda",  # nothing to save on a CPU
        # Compiled code wants one shape: pad every flattened batch to its full size, or each new
        # length recompiles with dynamic shapes (the rows layout pads in its collator).
        pad_to_multiple_of=cfg.batch_size * cfg.max_seq_length if compiled and flat else None,
        include_num_input_tokens_seen="non_padding",
        report_to=cfg.report_to,
        use_cpu=precision.device == "cpu",
    )


def compile_layer_parts(model) -> None:
    """torch.compile the parts of every decoder layer (norms, attention, MLP), in place.

    Not the layers themselves: a decoder layer's forward holds its gradient checkpointing, and
    compiled around it, inductor chooses for itself what to keep for the backward, which
    undoes the checkpoint's memory saving. Compiled inside the checkpoint, the parts are
    recomputed in the backward as in eager mode. The parts of all layers share their code, so
    each compiles once and is reused by every layer.
    """
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            for part in layer.children():
                part.compile()


def make_trainer(cfg: TrainConfig, model, tokenizer, data, *, precision: Precision, output_dir: Path, callbacks=()) -> SFTTrainer:
    """TRL's SFTTrainer on the `train` and `test` splits of `data`, in any of the formats of
    `gemma_qlora.formats` (raw, or encoded by `formats.encode_splits`): token ids and labels
    masked per format, which TRL packs as they are. Checkpoints go to `output_dir`, which the
    Trainer creates when it first saves one."""
    train_text, eval_text = (trainable(data[s], tokenizer, max_length=cfg.max_seq_length) for s in ("train", "test"))
    compiled = cfg.compiles(precision.device)
    if compiled:
        # compiled parts run PEFT's LoRA path: traced through the fused autograd function they were
        # slower (docs/speed.md), and inductor fuses PEFT's small ops itself
        remove_fused_lora(model)
        compile_layer_parts(model)
    if cfg.uses_liger(precision.device):
        if precision.device != "cuda":
            raise UserError("--liger_kernel true needs a CUDA GPU (Liger's kernels are Triton): leave it unset on this machine.")
        # speed hook: Liger's RMSNorm, RoPE and GeGLU on the model's layers, through transformers'
        # own integration (TRL's switch for it is deprecated); the loss stays TRL's chunked one
        apply_liger_kernel(model, LIGER_LAYER_KERNELS)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(cfg, precision=precision, output_dir=output_dir),
        train_dataset=train_text,
        eval_dataset=eval_text,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    if cfg.packing and cfg.packing_layout == "rows":
        # TRL's BFD bins, each kept as a row of the batch instead of one flattened row (see
        # gemma_qlora.packing). TRL refuses a custom collator while it packs, so it is set here;
        # the Trainer reads it when it builds each dataloader.
        trainer.data_collator = make_collator(
            tokenizer, max_length=cfg.max_seq_length, fixed_shape=compiled, batch_size=cfg.batch_size,
            attn_implementation=model.config._attn_implementation,
        )
    # speed hook (gemma_qlora.gc_scope): full garbage collections in training skip the setup heap
    trainer.train = frozen_heap(trainer.train)
    if cfg.varlen_attention and precision.device == "cuda":  # speed hook (gemma_qlora.varlen_attention)
        use_varlen_attention(trainer.model)
    if precision.compute_dtype != torch.bfloat16:
        # TRL casts a quantized model's LoRA weights to bf16 (the QLoRA paper's choice). fp16 mixed
        # precision (a T4) cannot unscale bf16 gradients and crashes at the first step, and an fp32
        # CPU run would compute LoRA in bf16: keep them in fp32 there.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return trainer


def out_of_memory(cfg: TrainConfig, run_dir: Path, *, gpu=None) -> UserError:
    """The advice for an out-of-memory error: what the planner predicted (on `gpu`, by default
    the one in use), what to lower, and what is kept."""
    from gemma_qlora.plan import current_gpu, prediction_line

    if gpu is None and torch.cuda.is_available():
        gpu = current_gpu(cfg.gpu_memory_gib)
    predicted = prediction_line(cfg, gpu) if gpu is not None else ""
    return UserError(
        f"Out of GPU memory in run {cfg.name} (bits={cfg.bits}, micro-batch {cfg.batch_size} x {cfg.max_seq_length} tokens, "
        f"LoRA r={cfg.lora_r}). {predicted}Try --batch_size {max(1, cfg.batch_size // 2)} (with --grad_accum {cfg.grad_accum * 2} to keep "
        f"the batch), a shorter --max_seq_length, {'--bits 4, ' if cfg.bits != 4 else ''}"
        f"{'' if cfg.offload_activations else '--offload_activations true, '}or "
        f"--auto_batch_size true to pick the micro-batch from the memory plan. Files written so far stay in {run_dir}."
    )
