"""On the GPU: the fused LoRA path and varlen attention against PEFT's path and masked SDPA, in
bf16 on a small random Gemma with Gemma-2B's head_dim 256 and one KV head, 4-bit and 8-bit.
Prints the loss and the largest relative gradient difference of each comparison (the CPU tests
check the same in fp32; this checks the CUDA kernels and buffers).

    PYTHONPATH=/tmp/site:$PWD python3 bench/lab/check_speed_paths.py
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM, GemmaConfig

from gemma_qlora.config import TrainConfig
from gemma_qlora.fused_lora import apply_fused_lora, remove_fused_lora
from gemma_qlora.lora import attach_lora
from gemma_qlora.model import load_model
from gemma_qlora.quant import detect_precision
from gemma_qlora.tiny import build_tokenizer
from gemma_qlora.varlen_attention import use_varlen_attention


def run(model, batch):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(name, a, b):
    worst = max(((a[1][k] - b[1][k]).norm() / (b[1][k].norm() + 1e-12)).item() for k in b[1])
    print(f"{name}: loss {a[0]:.5f} vs {b[0]:.5f}, worst relative gradient difference {worst:.4f} over {len(b[1])} tensors")


def main():
    folder = tempfile.mkdtemp()
    tokenizer = build_tokenizer()
    config = GemmaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # two rows of 4 packed examples of 128 tokens each
    ids = torch.randint(4, len(tokenizer), (2, 512), device="cuda")
    positions = torch.arange(128, device="cuda").repeat(2, 4)
    labels = ids.clone()
    labels[positions == 0] = -100
    batch = {"input_ids": ids, "position_ids": positions, "labels": labels}
    for bits in (4, 8):
        cfg = TrainConfig(model=folder, bits=bits, lora_dropout=0.0, fused_lora=False)
        model, _ = load_model(cfg, detect_precision())
        model = attach_lora(model, cfg)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        model.train()
        peft = run(model, batch)
        apply_fused_lora(model)
        fused = run(model, batch)
        compare(f"{bits}-bit fused LoRA vs PEFT", fused, peft)
        remove_fused_lora(model)
        use_varlen_attention(model)
        varlen = run(model, batch)
        compare(f"{bits}-bit varlen attention vs masked SDPA", varlen, peft)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
