"""A merged model as GGUF, written with the `gguf` package the way llama.cpp's converter writes
Gemma: tensors, hyper-parameters, tokenizer, and the chat template and end-of-turn for chat runs.
"""

from __future__ import annotations

# `gguf` is imported where it is used: it comes with the package's `offline` extra, and the other
# exports (and the rest of the package) run without it.
import json
import logging
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from gemma_qlora.errors import UserError
from gemma_qlora.export.settings import GGUF_ARCHS


@contextmanager
def _quiet(logger: str):
    """Silence a library's logger for a moment (gguf warns about template shapes it need not know)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)

def _spm_vocab(backend: dict):
    """tokens, scores and types of a SentencePiece-style BPE (Gemma's), as llama.cpp's converter
    reads them from tokenizer.model.

    Hand-written because gguf-py's `LlamaHfVocab` scores every token -1000, and llama.cpp's
    tokenizer merges by score: here normal tokens score by rank (Gemma's ids follow its merge
    order), control and user-defined tokens -1000, bytes 0. Runs of spaces, which transformers
    spells '▁▁', go back to the real spaces Gemma's tokenizer.model stores as user-defined tokens.
    """
    import gguf

    vocab, added = backend["model"]["vocab"], {a["id"]: a for a in backend["added_tokens"]}
    texts = {i: s for s, i in vocab.items()} | {i: a["content"] for i, a in added.items()}
    tokens, scores, types, rank = [], [], [], 0
    for i in range(max(texts) + 1):
        text = texts.get(i, f"[PAD{i}]")
        if i in added:
            kind, score = (gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED), -1000.0
        elif i not in texts:
            kind, score = gguf.TokenType.UNUSED, -1000.0
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind, score = gguf.TokenType.BYTE, 0.0
        elif len(text) > 1 and set(text) == {"▁"}:
            kind, score, text = gguf.TokenType.USER_DEFINED, -1000.0, " " * len(text)
        else:
            kind, score, rank = gguf.TokenType.NORMAL, -float(rank), rank + 1
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    return tokens, scores, types

def _bpe_vocab(backend: dict):
    """tokens and types of a byte-level BPE (GPT-2 style), as llama.cpp's `_set_vocab_gpt2`."""
    import gguf

    added = {a["id"]: a for a in backend["added_tokens"]}
    texts = {i: s for s, i in backend["model"]["vocab"].items()} | {i: a["content"] for i, a in added.items()}
    tokens, types = [], []
    for i in range(max(texts) + 1):
        tokens.append(texts.get(i, f"[PAD{i}]"))
        if i not in texts:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types

def add_tokenizer(writer, tokenizer, config, *, stops: list[int] | None = None) -> int:
    """The tokenizer as `tokenizer.ggml.*` (vocabulary, merges, special ids, add-BOS), the chat
    template as `tokenizer.chat_template` where the tokenizer has one, and a stop token besides
    EOS in `stops` (a chat run's `<end_of_turn>`) as `tokenizer.ggml.eot_token_id`, the key
    llama.cpp's converter writes for Gemma's end of turn; returns the vocabulary's size."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    with tempfile.TemporaryDirectory() as folder, _quiet("gguf"):  # gguf's SpecialVocab reads a tokenizer's files
        tokenizer.save_pretrained(folder)
        config.to_json_file(str(Path(folder) / "config.json"))
        if model["type"] == "BPE" and model.get("byte_fallback"):
            tokens, scores, types = _spm_vocab(backend)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            writer.add_add_space_prefix(False)
            special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(tokens))
        elif model["type"] == "BPE" and (backend.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
            tokens, types = _bpe_vocab(backend)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("gpt-2")
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
        else:
            raise UserError(f"GGUF export knows Gemma's SentencePiece-style tokenizer and byte-level BPE, not this "
                            f"{model['type']} tokenizer: export --into merged instead.")
    # what the tokenizer does, not what its files say: llama.cpp and transformers add BOS to a
    # SentencePiece vocabulary whose file does not say otherwise
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
    special.chat_template = tokenizer.chat_template or None  # the tokenizer's, not what its files left behind
    special.add_to_gguf(writer, quiet=True)
    end_of_turn = [i for i in stops or [] if i != tokenizer.eos_token_id]
    if end_of_turn:
        writer.add_eot_token_id(end_of_turn[0])
    return len(tokens)

def add_hparams(writer, config, *, file_type) -> None:
    """The model's shape under llama.cpp's key names, as its converter writes Gemma 2 and 3."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    if config.model_type == "gemma3_text":
        rope = config.rope_parameters or {}
        full = rope.get("full_attention", rope)
        if full.get("rope_type", "default") not in ("default", "linear"):
            raise UserError(f"GGUF export cannot write {full['rope_type']!r} RoPE scaling: export --into merged instead.")
        writer.add_rope_freq_base(full.get("rope_theta", 1_000_000.0))
        if full.get("rope_type") == "linear":
            import gguf

            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
    else:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_file_type(file_type)

def gguf_tensors(model, *, qtype: str, n_vocab: int):
    """(GGUF name, array, ggml type) for every weight, by llama.cpp's rules: Gemma's RMSNorm
    scales by 1 + w and llama.cpp's by w, so norm weights are stored plus one; the tied output
    head is left out; 1-D tensors and norms stay F32; Q8_0 falls back to F16 for a row length
    it cannot block."""
    import gguf

    arch = {"gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3_text": gguf.MODEL_ARCH.GEMMA3}[model.config.model_type]
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    wanted = gguf.GGMLQuantizationType.Q8_0 if qtype == "q8_0" else gguf.GGMLQuantizationType.F16
    tied = model.config.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export has no llama.cpp name for the weight {hf_name}: export --into merged instead.")
        data = tensor.detach().to(torch.float32).cpu()
        if hf_name.endswith("embed_tokens.weight"):
            data = data[:n_vocab]  # llama.cpp drops embedding rows past the tokenizer's vocabulary
        if hf_name.endswith("norm.weight"):
            data = data + 1
        data = data.numpy()
        kind = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 or name.endswith("_norm.weight") else wanted
        try:
            packed = gguf.quants.quantize(data, kind)
        except gguf.QuantError:
            kind = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, kind)
        yield name, packed, kind

def stop_ids(model) -> list[int]:
    """The token ids the model's generation config stops at."""
    eos = model.generation_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]

def write_gguf(model, tokenizer, path: Path, *, qtype: str, name: str) -> None:
    """One GGUF file of `model` (a merged Gemma 2 or 3) with its tokenizer."""
    import gguf

    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer = gguf.GGUFWriter(str(path), GGUF_ARCHS[model.config.model_type])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        add_hparams(writer, model.config, file_type=file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        n_vocab = add_tokenizer(writer, tokenizer, model.config, stops=stop_ids(model))
        for tensor_name, data, kind in gguf_tensors(model, qtype=qtype, n_vocab=n_vocab):
            writer.add_tensor(tensor_name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
