import math

import torch
from torch import nn

from gemma_qlora.config import TrainConfig
from gemma_qlora.evaluate import attributable, author_accuracy, normalize_name, weight_quant_error
from gemma_qlora.formats import load_examples
from gemma_qlora.model import load_model
from gemma_qlora.quant import detect_precision
from gemma_qlora.trainer import make_trainer

CPU = detect_precision("cpu")


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(fast_cfg, tmp_path):
    cfg = fast_cfg(bits=16)
    model, tokenizer = load_model(cfg, CPU)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied to the embeddings: every logit is 0, so p = 1 / vocab
    quotes = load_examples(cfg)
    loss = make_trainer(cfg, model, tokenizer, quotes, precision=CPU, output_dir=tmp_path).evaluate()["eval_loss"]
    assert math.exp(loss) == __import__("pytest").approx(model.config.vocab_size, rel=1e-4)


class Oracle(nn.Module):
    """A 'model' that emits a fixed answer per prompt: the author (or a wrong one)."""

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers
        self.anchor = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask=None, max_new_tokens=16, **kwargs):
        rows = []
        for ids in input_ids:
            prompt = self.tokenizer.decode(ids, skip_special_tokens=True)
            answer = self.tokenizer(" " + self.answers[prompt] + "\n", add_special_tokens=False)["input_ids"]
            rows.append(ids.tolist() + answer)
        width = max(map(len, rows))
        return torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])


def test_author_accuracy_is_one_for_the_right_author_and_zero_otherwise(tiny_model, quotes_file):
    from transformers import AutoTokenizer

    from gemma_qlora.data import quote_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    records = list(load_examples(TrainConfig(data=quotes_file, eval_size=8))["test"])
    right = Oracle(tokenizer, {quote_prompt(r["quote"]): r["author"].upper() + "  " for r in records})
    assert author_accuracy(right, tokenizer, records, batch_size=3)["accuracy"] == 1.0
    wrong = Oracle(tokenizer, {quote_prompt(r["quote"]): "Nobody" for r in records})
    assert author_accuracy(wrong, tokenizer, records)["accuracy"] == 0.0


def test_only_authors_seen_in_training_are_scored():
    records = [{"quote": "a", "author": "Mark  Twain"}, {"quote": "b", "author": "Unknown Person"}]
    assert attributable(records, {"mark twain"}) == records[:1]
    assert normalize_name("  Mark   TWAIN ") == "mark twain"


def test_weight_quant_error_known_cases():
    torch.manual_seed(0)
    gaussian = nn.Sequential(nn.Linear(256, 256, bias=False))
    nn.init.normal_(gaussian[0].weight, std=0.02)
    errors = weight_quant_error(gaussian)
    # int8 keeps 8 bits per weight; NF4 is built for normally distributed weights and beats FP4 on them
    assert 0 < errors["int8"] < errors["nf4"] < errors["fp4"] < 0.3
    constant = nn.Sequential(nn.Linear(128, 128, bias=False))
    nn.init.constant_(constant[0].weight, 0.5)  # every block's absmax is exactly representable
    assert all(e < 1e-3 for e in weight_quant_error(constant).values())
