"""4-bit training on CPUs with and without AVX512-BF16.

bitsandbytes repacks a `Linear4bit` weight for its CPU inference kernel at the first forward
in eval mode under no_grad, but only where the CPU has AVX512-BF16; training after that runs
through a kernel without autograd. Each test runs with the instruction set's flag forced on
and off (bitsandbytes reads it through `has_avx512bf16` when a module is built), so the
suite checks both machines whatever CPU it runs on.
"""

import pytest
import torch

from gemma_qlora.config import TrainConfig
from gemma_qlora.data import PROMPTS
from gemma_qlora.evaluate import generate
from gemma_qlora.lora import attach_lora
from gemma_qlora.model import load_model
from gemma_qlora.quant import detect_precision


@pytest.fixture(params=[True, False], ids=["avx512bf16", "no-avx512bf16"])
def cpu_flag(request, monkeypatch):
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: request.param)
    return request.param


@pytest.fixture(scope="module")
def model_32(tmp_path_factory):
    """A tiny Gemma 3 whose projection widths are all multiples of 32 (the repacking's block),
    so that on today's bitsandbytes an unguarded evaluation repacks instead of failing."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_config, build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = build_config("gemma3_text", len(tokenizer))
    config.head_dim = 32
    path = tmp_path_factory.mktemp("model32")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def lora_gradients(path: str, evaluate_first: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Load in 4-bit, optionally generate (eval mode, no_grad) as the recipe does before
    training, attach LoRA, and return one training forward's loss and every LoRA gradient."""
    torch.manual_seed(0)
    cfg = TrainConfig(model=path, bits=4, lora_dropout=0.0)
    model, tokenizer = load_model(cfg, detect_precision("cpu"))
    if evaluate_first:
        generate(model, tokenizer, PROMPTS, max_new_tokens=2)
    model = attach_lora(model, cfg)
    for name, param in model.named_parameters():  # B starts at zero, so A would get no gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.train()
    batch = tokenizer(["Quote: Be yourself.\nAuthor: Oscar Wilde"], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def test_lora_gets_every_gradient_after_an_evaluation(model_32, cpu_flag):
    loss_fresh, fresh = lora_gradients(model_32, evaluate_first=False)
    loss_after, after = lora_gradients(model_32, evaluate_first=True)
    assert fresh.keys() == after.keys() and len(after) > 0
    missing = [n for n, g in after.items() if g is None or not g.abs().sum() > 0]
    assert not missing, f"no gradient after an evaluation: {missing[:4]}"
    assert loss_after == pytest.approx(loss_fresh, rel=1e-6)
    for name in fresh:
        torch.testing.assert_close(after[name], fresh[name])


def test_widths_not_multiple_of_32_train_after_an_evaluation(tiny_model, cpu_flag):
    """The default tiny Gemma's key/value projections are 16 wide."""
    _, grads = lora_gradients(tiny_model, evaluate_first=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_a_model_repacked_elsewhere_is_unpacked_for_training(model_32, monkeypatch):
    """A 4-bit model that did not come through load_model and was already evaluated on an
    AVX512-BF16 CPU: attach_lora puts its weights back in the training layout."""
    import bitsandbytes.nn.modules
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma_qlora.quant import make_bnb_config

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    model = AutoModelForCausalLM.from_pretrained(
        model_32, quantization_config=make_bnb_config(4, compute_dtype=torch.float32), dtype=torch.float32, attn_implementation="eager"
    )
    tokenizer = AutoTokenizer.from_pretrained(model_32)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    reference = [m.weight.detach().clone() for m in layers]
    model.eval()
    with torch.no_grad():
        model(**tokenizer(["Quote: Imagination"], return_tensors="pt"))
    packed = [m for m in layers if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    assert packed, "bitsandbytes no longer repacks on this path: the guard may be obsolete"
    model = attach_lora(model, TrainConfig(lora_dropout=0.0))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert all(m.weight.shape == w.shape for m, w in zip(layers, reference))
