import pytest

from gemma_qlora.config import LORA_TARGETS
from gemma_qlora.config import TrainConfig
from gemma_qlora.errors import UserError
from gemma_qlora.lora import attach_lora, parameter_counts
from gemma_qlora.model import load_model
from gemma_qlora.quant import detect_precision

CPU = detect_precision("cpu")


def lora_modules(model):
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A") and module.lora_A}


def test_lora_on_exactly_the_seven_projections(tiny_model):
    model, _ = load_model(TrainConfig(model=tiny_model, bits=4), CPU)
    peft_model = attach_lora(model, TrainConfig())
    assert lora_modules(peft_model) == set(LORA_TARGETS)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert peft_model.base_model.model.is_gradient_checkpointing


def test_lora_targets_and_rank_configurable(tiny_model):
    model, _ = load_model(TrainConfig(model=tiny_model, bits=8), CPU)
    peft_model = attach_lora(model, TrainConfig(lora_r=4, lora_alpha=8, lora_targets=["q_proj", "v_proj"]))
    assert lora_modules(peft_model) == {"q_proj", "v_proj"}
    counts = parameter_counts(peft_model)
    # 2 layers x (q: 64->64, v: 64->16) x r=4: A is r x in, B is out x r
    assert counts["trainable"] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 16 * 4)
    assert 0 < counts["trainable_percent"] < 100


def test_unknown_target_is_clear(tiny_model):
    model, _ = load_model(TrainConfig(model=tiny_model, bits=4), CPU)
    with pytest.raises(UserError, match="not modules of this model"):
        attach_lora(model, TrainConfig(lora_targets=["c_attn"]))


def test_lean_prepare_keeps_frozen_weights_in_their_dtype(tiny_model):
    """PEFT's prepare copies frozen bf16 weights to fp32; the lean default does not."""
    import torch

    from gemma_qlora.quant import Precision

    bf16 = Precision("cpu", torch.bfloat16, bf16=False, fp16=False)
    lean = attach_lora(load_model(TrainConfig(model=tiny_model, bits=4), bf16)[0], TrainConfig())
    assert lean.get_input_embeddings().weight.dtype == torch.bfloat16
    assert lean.base_model.model.is_gradient_checkpointing
    peft_way = attach_lora(load_model(TrainConfig(model=tiny_model, bits=4), bf16)[0], TrainConfig(lean_prepare=False))
    assert peft_way.get_input_embeddings().weight.dtype == torch.float32
    for model in (lean, peft_way):
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters() if "lora_" in n}
        out = model(input_ids=torch.tensor([[2, 5, 6, 7]]), labels=torch.tensor([[2, 5, 6, 7]]))
        out.loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
