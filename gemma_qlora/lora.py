"""Attach LoRA adapters with PEFT."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel

from gemma_qlora.errors import UserError
from gemma_qlora.fused_lora import apply_fused_lora


def attach_lora(model: PreTrainedModel, cfg) -> PeftModel:
    """Freeze the base, prepare a quantized one for training, and add LoRA to `cfg.lora_targets`.

    PEFT's `prepare_model_for_kbit_training` also copies every frozen bf16/fp16 weight to
    fp32: for Gemma that is the 256k x hidden embedding (1 GB more for Gemma 2B), and it buys
    nothing, since Gemma's RMSNorm already computes in fp32 and frozen weights get no
    updates. `cfg.lean_prepare` (the default) does the rest of what that function does
    (freeze, gradient checkpointing, input gradients) without the copy; false calls it.
    Neither is used on a 16-bit model (the copy would upcast every weight); there the
    trainer turns gradient checkpointing on. `cfg` is a `TrainConfig` (or anything with its
    `lora_*`, `gradient_checkpointing` and `lean_prepare` fields).
    """
    from gemma_qlora.quant import keep_4bit_weights_trainable_on_cpu

    targets, gradient_checkpointing = cfg.lora_targets, cfg.gradient_checkpointing
    if getattr(model, "is_loaded_in_4bit", False):
        keep_4bit_weights_trainable_on_cpu(model)  # a model not loaded by load_model may be repacked
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        if cfg.lean_prepare:
            model.requires_grad_(False)
            if gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
        else:
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
    check_targets(targets, [name for name, _ in model.named_modules()])
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if getattr(cfg, "fused_lora", False):  # patches forwards only: keys and saving stay PEFT's
        apply_fused_lora(peft_model)
    return peft_model


def check_targets(targets: list[str], module_names: list[str]) -> None:
    """Refuse LoRA targets that name no module of the model (`module_names`, as `named_modules`
    gives them; `gemma_qlora.model.module_names` has them before any weight loads)."""
    present = {name.rsplit(".", 1)[-1] for name in module_names}
    missing = [t for t in targets if t not in present]
    if missing:
        raise UserError(f"LoRA targets {missing} are not modules of this model: choose from {sorted(p for p in present if p.endswith('proj'))}.")


def parameter_counts(model) -> dict[str, int | float]:
    """Trainable vs total parameters (4-bit weights counted unpacked, as PEFT does)."""
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable": trainable, "total": total, "trainable_percent": round(100 * trainable / total, 4)}


def load_adapter(model: PreTrainedModel, path: str) -> PeftModel:
    """A saved adapter onto a freshly loaded base, with a clear error for a broken folder."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise UserError(f"{path} is not a saved adapter (adapter_config.json and adapter_model.safetensors expected): point to a run's adapter/ folder.")
    try:
        return PeftModel.from_pretrained(model, str(folder))
    except Exception as error:  # safetensors/JSON/shape errors all mean the same to the user
        raise UserError(f"The adapter in {path} is damaged or belongs to another model ({type(error).__name__}): train again or use another run's adapter.") from None
