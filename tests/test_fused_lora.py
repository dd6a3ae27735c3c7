"""The fused LoRA projections (gemma_qlora.fused_lora) against PEFT's own path on a tiny random
Gemma: same loss and same LoRA gradients, with real bitsandbytes quantization on CPU, under
gradient checkpointing, after an evaluation; and a training run with it saves a working adapter."""

import os

import pytest
import torch

import gemma_qlora.fused_lora as fused
from gemma_qlora.config import TrainConfig
from gemma_qlora.lora import attach_lora
from gemma_qlora.model import load_model
from gemma_qlora.quant import Precision, detect_precision

BATCH = ["Quote: Be yourself; everyone else is already taken.\nAuthor: Oscar Wilde",
         "Quote: Imagination is more important than knowledge.\nAuthor: Albert Einstein"]


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused function's forwards and backwards, so a test cannot pass on PEFT's path alone."""
    counts = {"forward": 0, "backward": 0}
    forward, backward = fused.FusedLoRA.forward, fused.FusedLoRA.backward

    def counted_forward(ctx, *args):
        counts["forward"] += 1
        return forward(ctx, *args)

    def counted_backward(ctx, *grads):
        counts["backward"] += 1
        return backward(ctx, *grads)

    monkeypatch.setattr(fused.FusedLoRA, "forward", staticmethod(counted_forward))
    monkeypatch.setattr(fused.FusedLoRA, "backward", staticmethod(counted_backward))
    return counts


def loss_and_grads(model, tokenizer):
    model.zero_grad(set_to_none=True)
    batch = tokenizer(BATCH, return_tensors="pt", padding=True)
    loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def peft_model(path, *, bits, dtype=torch.float32, checkpointing=True, evaluate_first=False):
    """A tiny model in `bits` with LoRA (B randomised: at zero, A would get no gradient), in
    training mode, on PEFT's path (fused_lora off)."""
    torch.manual_seed(0)
    cfg = TrainConfig(model=path, bits=bits, lora_dropout=0.0, gradient_checkpointing=checkpointing, fused_lora=False)
    precision = Precision("cpu", dtype, bf16=dtype == torch.bfloat16, fp16=False)
    model, tokenizer = load_model(cfg, precision)
    if evaluate_first:  # bitsandbytes may repack 4-bit weights at an eval forward (see quant.py)
        model.eval()
        with torch.no_grad():
            model(**tokenizer(BATCH[:1], return_tensors="pt"))
    model = attach_lora(model, cfg)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    if bits == 16:  # attach_lora leaves a 16-bit model's checkpointing to the trainer
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    return model, tokenizer


@pytest.mark.parametrize("bits,checkpointing,evaluate_first", [
    (4, True, False), (4, False, False), (4, True, True), (8, True, False), (16, True, False), (16, False, False),
])
def test_fused_equals_peft_in_fp32(tiny_model, calls, bits, checkpointing, evaluate_first):
    model, tokenizer = peft_model(tiny_model, bits=bits, checkpointing=checkpointing, evaluate_first=evaluate_first)
    ref_loss, ref_grads = loss_and_grads(model, tokenizer)
    assert calls["forward"] == 0
    assert fused.apply_fused_lora(model) == 2 * 7  # two layers, seven projections
    loss, grads = loss_and_grads(model, tokenizer)
    # q/k/v and gate/up are one call each: 4 calls a layer, twice with checkpointing (recomputed)
    assert calls["forward"] == 2 * 4 * (2 if checkpointing else 1) and calls["backward"] == 2 * 4
    # 8-bit: PEFT's path multiplies int8 activations (LLM.int8); the fused one the dequantized weight
    tol = dict(rtol=2e-2, atol=2e-3) if bits == 8 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, **tol)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=name)


@pytest.mark.parametrize("bits", [4, 16])
def test_fused_equals_peft_in_bf16(tiny_model, calls, bits):
    model, tokenizer = peft_model(tiny_model, bits=bits, dtype=torch.bfloat16)
    ref_loss, ref_grads = loss_and_grads(model, tokenizer)
    fused.apply_fused_lora(model)
    loss, grads = loss_and_grads(model, tokenizer)
    assert calls["backward"] > 0
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=1e-2)
    for name in grads:
        ref = ref_grads[name].float()
        # bf16 sums in another order: compare each gradient as a whole, relative to its size
        assert (grads[name].float() - ref).norm() <= 0.05 * ref.norm() + 1e-6, name


def test_fused_path_steps_aside_where_it_does_not_apply(tiny_model, calls):
    model, tokenizer = peft_model(tiny_model, bits=4)
    fused.apply_fused_lora(model)
    batch = tokenizer(BATCH[:1], return_tensors="pt")
    with torch.no_grad():  # evaluation and generation: bitsandbytes' inference path
        model(**batch)
    with model.disable_adapter():
        model(**batch).logits.sum().backward()
    assert calls["forward"] == 0
    fused.remove_fused_lora(model)
    model(**batch).logits.sum().backward()
    assert calls["forward"] == 0


def test_dropout_keeps_peft_path(tiny_model):
    cfg = TrainConfig(model=tiny_model, bits=4, lora_dropout=0.1, fused_lora=True)
    model, _ = load_model(cfg, detect_precision("cpu"))
    model = attach_lora(model, cfg)
    assert not any(hasattr(m, "_peft_forward") for m in model.modules())


def test_training_with_fused_lora_changes_lora_and_saves_a_loadable_adapter(fast_cfg, calls):
    from peft import PeftModel

    from gemma_qlora.train import train

    cfg = fast_cfg(bits=4, lora_dropout=0.0, fused_lora=True)
    metrics = train(cfg)
    assert calls["backward"] > 0
    assert metrics["final_train_loss"] is not None
    adapter = os.path.join(cfg.output_dir, "4bit", "adapter")
    base, tokenizer = load_model(cfg, detect_precision("cpu"))
    model = PeftModel.from_pretrained(base, adapter).eval()
    # the saved B is no longer zero (PEFT initialises it so): training changed the adapter
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    batch = tokenizer(["Quote: Imagination is more"], return_tensors="pt")
    with torch.no_grad():
        trained = model(**batch).logits
        with model.disable_adapter():
            plain = model(**batch).logits
    assert not torch.allclose(trained, plain)


def test_fused_after_bitsandbytes_repacked_the_weights_for_cpu_inference(tmp_path, monkeypatch, calls):
    """On an AVX512-BF16 CPU, bitsandbytes repacks 4-bit weights at the first no-grad eval forward
    of a model that did not come through load_model; attach_lora unpacks them, and the fused path
    dequantizes them (bitsandbytes' dequantize_4bit of weight.data and quant_state) to the same
    loss and gradients as PEFT's path on that model."""
    import bitsandbytes.nn.modules
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    from gemma_qlora.quant import make_bnb_config
    from tests.conftest import build_config, build_tokenizer

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = build_config("gemma3_text", len(tokenizer))
    config.head_dim = 32  # widths divisible by 32: the repacking's block
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=make_bnb_config(4, compute_dtype=torch.float32), dtype=torch.float32,
        attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        model(**tokenizer(BATCH[:1], return_tensors="pt"))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model = attach_lora(model, TrainConfig(lora_dropout=0.0, fused_lora=True))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.train()
    loss, grads = loss_and_grads(model, tokenizer)
    assert calls["backward"] > 0
    fused.remove_fused_lora(model)
    ref_loss, ref_grads = loss_and_grads(model, tokenizer)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

