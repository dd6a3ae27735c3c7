import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from gemma_qlora.config import TrainConfig
from gemma_qlora.errors import UserError
from gemma_qlora.model import _explain_hub_error, hf_token, load_model
from gemma_qlora.quant import detect_precision

from conftest import FAMILIES, build_tokenizer

CPU = detect_precision("cpu")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits,layer", [(4, bnb.nn.Linear4bit), (8, bnb.nn.Linear8bitLt)])
def test_linear_layers_really_quantized(tiny_models, family, bits, layer):
    model, tokenizer = load_model(TrainConfig(model=tiny_models[family], bits=bits), CPU)
    assert model.config.model_type == family
    projections = {n: m for n, m in model.named_modules() if n.endswith("_proj")}
    assert projections and all(isinstance(m, layer) for m in projections.values())
    if bits == 4:
        assert all(m.weight.quant_state.quant_type == "nf4" for m in projections.values())
    batch = tokenizer(["Quote: Imagination is more"], return_tensors="pt")
    logits = model(**batch).logits
    assert torch.isfinite(logits).all()


def test_16bit_keeps_plain_linear(tiny_model):
    model, _ = load_model(TrainConfig(model=tiny_model, bits=16), CPU)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))


def test_eager_attention_on_cpu(tiny_model):
    model, _ = load_model(TrainConfig(model=tiny_model, bits=4), CPU)
    assert model.config._attn_implementation == "eager"


def test_not_gemma_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="'llama' model, not Gemma"):
        load_model(TrainConfig(model=str(tmp_path), bits=4), CPU)


def test_missing_local_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(TrainConfig(model=str(tmp_path / "nope"), bits=4), CPU)


def test_hub_id_offline_is_one_clear_line():
    with pytest.raises(UserError, match="--model embedded") as info:
        load_model(TrainConfig(model="google/gemma-2b", bits=4), CPU)
    assert "\n" not in str(info.value)


def _hub_error(cls, message):
    from unittest.mock import Mock

    return cls(message, response=Mock(status_code=403, headers={}, request=Mock(url="https://huggingface.co")))


def test_gated_model_messages_say_what_to_do():
    from huggingface_hub.errors import GatedRepoError

    err = OSError("You are trying to access a gated repo.")
    err.__cause__ = _hub_error(GatedRepoError, "403 Client Error: gated")
    without = _explain_hub_error("google/gemma-2b", err, token=None)
    assert "accept its licence" in str(without) and "HF_TOKEN" in str(without)
    secret = "hf_" + "x" * 34
    err2 = OSError(f"gated repo, token {secret} refused")
    err2.__cause__ = _hub_error(GatedRepoError, "403 gated")
    withtoken = _explain_hub_error("google/gemma-2b", err2, token=secret)
    assert "refused" in str(withtoken) and secret not in str(withtoken)


def test_unknown_repo_message():
    from huggingface_hub.errors import RepositoryNotFoundError

    err = OSError("google/gemma-xx is not a local folder and is not a valid model identifier")
    err.__cause__ = _hub_error(RepositoryNotFoundError, "404 Client Error")
    assert "No model named google/gemma-xx" in str(_explain_hub_error("google/gemma-xx", err, None))


def test_token_from_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_value")
    assert hf_token() == "hf_test_value"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert hf_token() is None
