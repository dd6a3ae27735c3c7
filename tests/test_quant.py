import pytest
import torch

from gemma_qlora.quant import detect_precision, make_bnb_config


def test_4bit_nf4_double_quant_by_default():
    cfg = make_bnb_config(4, compute_dtype=torch.bfloat16)
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_use_double_quant is True
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16


def test_4bit_fp4_and_no_double_quant_selectable():
    cfg = make_bnb_config(4, compute_dtype=torch.float16, quant_type="fp4", double_quant=False)
    assert cfg.bnb_4bit_quant_type == "fp4" and cfg.bnb_4bit_use_double_quant is False
    assert cfg.bnb_4bit_compute_dtype == torch.float16


def test_quant_storage_for_fsdp():
    assert make_bnb_config(4, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16).bnb_4bit_quant_storage == torch.bfloat16


def test_8bit_is_llm_int8():
    cfg = make_bnb_config(8)
    assert cfg.load_in_8bit and not cfg.load_in_4bit


def test_16bit_means_no_quantization():
    assert make_bnb_config(16) is None


@pytest.mark.parametrize("bits", [0, 2, 3, 5, 32, "4"])
def test_other_bits_are_a_clear_value_error(bits):
    with pytest.raises(ValueError, match="choose 4 .* 8 .* or 16"):
        make_bnb_config(bits)


def test_unknown_quant_type():
    with pytest.raises(ValueError, match="nf4"):
        make_bnb_config(4, quant_type="int4")


def test_cpu_precision_is_fp32_without_amp():
    p = detect_precision("cpu")
    assert (p.compute_dtype, p.bf16, p.fp16) == (torch.float32, False, False)


def test_t4_gets_fp16_and_ampere_gets_bf16(monkeypatch):
    # the hardware query is the only thing replaced: CI has no GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    t4 = detect_precision("cuda")
    assert (t4.compute_dtype, t4.fp16, t4.bf16) == (torch.float16, True, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    hopper = detect_precision("cuda")
    assert (hopper.compute_dtype, hopper.bf16, hopper.fp16) == (torch.bfloat16, True, False)
    assert detect_precision("cuda", force_fp16=True).compute_dtype == torch.float16


def test_each_method_says_what_the_package_asks_of_it():
    """One entry per method: the load config, the planner's bytes, compile and export behaviour."""
    from types import SimpleNamespace

    from gemma_qlora.config import TrainConfig
    from gemma_qlora.quant import METHODS, method_of

    assert [method_of(SimpleNamespace(bits=b, quant_type=q)).name for b, q in ((4, "nf4"), (4, "fp4"), (8, "nf4"), (16, "fp4"))] == [
        "nf4", "fp4", "int8", "none"]
    precision = detect_precision("cpu")
    for name, method in METHODS.items():
        cfg = TrainConfig(bits=method.bits, quant_type=name if method.bits == 4 else "nf4")
        config = method.load_config(cfg, precision)
        assert (config is None) == (not method.quantized), name
        assert TrainConfig(bits=method.bits, steps=1000).compiles("cuda", processes=1) == method.compiles_by_default
        # a projection's bytes: about bits/8 a weight, plus scales
        assert method.bits / 8 <= method.linear_bytes(1024, 1024, double_quant=True, act_bytes=2) / 1024**2 < method.bits / 8 * 1.07
    assert [m.name for m in METHODS.values() if m.rounds_activations] == ["int8"]
