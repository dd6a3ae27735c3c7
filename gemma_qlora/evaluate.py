"""Quality measures: generation, author attribution accuracy, weight quantization error.

Eval loss comes from `SFTTrainer.evaluate()` (TRL scores tokens without building the full
256k-vocabulary logits). Generation here asks the model only for the last position's
logits, so nothing of ours builds them either.
"""

from __future__ import annotations

import torch
from torch import nn

from gemma_qlora.data import quote_prompt


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 24, batch_size: int = 16) -> list[str]:
    """Greedy continuations of `prompts` (the prompt itself left out).

    Always eager, also where `--torch_compile` compiled the layers' parts: a few greedy tokens
    are not worth compiling, and with a KV cache attention would recompile for every layer.
    """
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(p.device for p in model.parameters())
    outputs = []
    try:
        with torch.compiler.set_stance("force_eager"):
            for i in range(0, len(prompts), batch_size):
                batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
                ids = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new = ids[:, batch["input_ids"].shape[1] :]
                outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def normalize_name(name: str) -> str:
    return " ".join(name.lower().split())


def author_accuracy(model, tokenizer, records: list[dict], *, max_new_tokens: int = 16, batch_size: int = 16) -> dict:
    """Greedy-generate the `Author:` line for each quote; exact match after normalising case and spaces."""
    if not records:
        return {"accuracy": None, "n": 0, "examples": []}
    continuations = generate(model, tokenizer, [quote_prompt(r["quote"]) for r in records], max_new_tokens=max_new_tokens, batch_size=batch_size)
    predicted = [c.strip().split("\n", 1)[0].strip() for c in continuations]
    hits = [normalize_name(p) == normalize_name(r["author"]) for p, r in zip(predicted, records)]
    examples = [{"quote": r["quote"], "author": r["author"], "predicted": p} for r, p in list(zip(records, predicted))[:5]]
    return {"accuracy": sum(hits) / len(hits), "n": len(hits), "examples": examples}


def attributable(eval_records: list[dict], train_authors: set[str]) -> list[dict]:
    """Held-out quotes whose author the training split has seen."""
    known = {normalize_name(a) for a in train_authors}
    return [r for r in eval_records if normalize_name(r["author"]) in known]


def weight_quant_error(model: nn.Module, schemes=("nf4", "fp4", "int8"), blocksize: int = 64) -> dict[str, float]:
    """Relative Frobenius error ||W - deq(q(W))|| / ||W|| over the decoder's linear weights, per scheme.

    NF4/FP4 use bitsandbytes' 4-bit blockwise quantization (blocksize 64, as `Linear4bit`),
    int8 its row-wise absmax quantization (as LLM.int8's weights).
    """
    import bitsandbytes.functional as F

    sq_err = {s: 0.0 for s in schemes}
    sq_norm = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "lm_head" in name:
            continue
        w = module.weight.detach().float()
        sq_norm += w.pow(2).sum().item()
        for scheme in schemes:
            if scheme == "int8":
                q, scale, _ = F.int8_vectorwise_quant(w.to(torch.float16))
                deq = q.float() * scale.float().unsqueeze(1) / 127
            else:
                packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=scheme)
                deq = F.dequantize_4bit(packed, state).float()
            sq_err[scheme] += (w - deq).pow(2).sum().item()
    return {s: (sq_err[s] / sq_norm) ** 0.5 for s in schemes}
