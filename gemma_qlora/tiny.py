"""Tiny tokenizers for tests and benchmarks, built here because they cannot come from the Hub.

Gemma's own tokenizer is gated on the Hub and the GGUF's is 262k tokens; a test or a
random-weight benchmark needs only a real, deterministic tokenizer with Gemma's special tokens
at Gemma's ids, trained in seconds on the embedded quotes.
"""

from __future__ import annotations

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3


def build_tokenizer(*, vocab_size: int = 600, examples: int | None = 2000):
    """A byte-level BPE of `vocab_size` tokens trained on the first `examples` embedded quotes
    (None: all of them) as the package formats them, adding <bos> like Gemma's tokenizer.

    Training is deterministic, so the same arguments give the same tokenizer in every process.
    The small default keeps test models small; a benchmark of a real-sized model wants more
    tokens (about 3.7 characters a token at 8,000, near Gemma's 4 on English).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from gemma_qlora.data import format_quote
    from gemma_qlora.fortunes import load_fortunes

    texts = [format_quote(r["quote"], r["author"]) for r in load_fortunes()[:examples]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
