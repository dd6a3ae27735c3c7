import pytest

from gemma_qlora.config import LORA_TARGETS
from gemma_qlora.errors import UserError
from gemma_qlora.lora import attach_lora, parameter_counts
from gemma_qlora.model import load_model
from gemma_qlora.quant import detect_precision

CPU = detect_precision("cpu")


def lora_modules(model):
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A") and module.lora_A}


def test_lora_on_exactly_the_seven_projections(tiny_model):
    model, _ = load_model(tiny_model, 4, CPU)
    peft_model = attach_lora(model)
    assert lora_modules(peft_model) == set(LORA_TARGETS)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.05)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert peft_model.base_model.model.is_gradient_checkpointing


def test_lora_targets_and_rank_configurable(tiny_model):
    model, _ = load_model(tiny_model, 8, CPU)
    peft_model = attach_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"])
    assert lora_modules(peft_model) == {"q_proj", "v_proj"}
    counts = parameter_counts(peft_model)
    # 2 layers x (q: 64->64, v: 64->16) x r=4: A is r x in, B is out x r
    assert counts["trainable"] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 16 * 4)
    assert 0 < counts["trainable_percent"] < 100


def test_unknown_target_is_clear(tiny_model):
    model, _ = load_model(tiny_model, 4, CPU)
    with pytest.raises(UserError, match="not modules of this model"):
        attach_lora(model, targets=["c_attn"])
