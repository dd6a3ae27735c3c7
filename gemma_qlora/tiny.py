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


# Gemma 3's chat template, verbatim as Google ships it with its Gemma 3 checkpoints (TRL keeps
# the same text in trl/chat_templates/gemma3.jinja, which is how TRL recognises it). The embedded
# Gemma 3 270M carries none: neither its GGUF's metadata nor the tokenizer made from it has one.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""
CHAT_TOKENS = ["<start_of_turn>", "<end_of_turn>"]  # Gemma's turn markers, special tokens as in Gemma's vocabulary


def build_chat_tokenizer(**kwargs):
    """`build_tokenizer(**kwargs)` with Gemma's turn markers as special tokens and Gemma 3's chat
    template: a tokenizer that renders conversations exactly as Gemma 3's does."""
    tokenizer = build_tokenizer(**kwargs)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    return tokenizer


def save_gemma3_multimodal(
    path, *, tokenizer, text: dict, vision: dict, vocab_size: int | None = None, mm_tokens_per_image: int = 4, seed: int = 0,
    device: str = "cpu", dtype=None,
) -> int:
    """A random multimodal Gemma 3 checkpoint (`Gemma3ForConditionalGeneration`: SigLIP vision tower,
    projector, language model) of the given text and vision shapes, saved with `tokenizer` in
    `path`; returns its parameter count.

    `vocab_size`: the model's vocabulary, by default the tokenizer's with Gemma 3's three image
    tokens (start, end, soft token) after it; a larger one keeps the image tokens at its end.
    """
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    vocab = vocab_size or len(tokenizer) + 3
    config = Gemma3Config(
        text_config=dict(text, vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=2),
        vision_config=vision,
        boi_token_index=vocab - 3, eoi_token_index=vocab - 2, image_token_index=vocab - 1,
        mm_tokens_per_image=mm_tokens_per_image,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=dtype or torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())
