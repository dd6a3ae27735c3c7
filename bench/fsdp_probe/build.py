# Small random Gemma (2B proportions scaled down: embedding ~ half of the bytes after 4-bit), bf16, tied embeddings.
import sys, torch, transformers
from pathlib import Path; ROOT = Path(__file__).resolve().parents[2]; sys.path.insert(0, str(ROOT / "bench")); sys.path.insert(0, str(ROOT))
from bench import build_tokenizer
tok = build_tokenizer(["the quick brown fox jumps over the lazy dog"] * 50 + ["hello world %d" % i for i in range(500)])
cfg = transformers.GemmaConfig(hidden_size=256, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=1, head_dim=64, vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=True,
    pad_token_id=0, eos_token_id=1, bos_token_id=2)
torch.manual_seed(0)
m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
m.save_pretrained("/tmp/fsdp_probe/tiny_gemma"); tok.save_pretrained("/tmp/fsdp_probe/tiny_gemma")
print(sum(p.numel() for p in m.parameters()), m.model.embed_tokens.weight.numel())
