"""Ship a run: merge its LoRA adapter into the base, write GGUF, and prove each export is the
model that was trained.

`export(cfg)` (`python -m gemma_qlora export --run runs/4bit ...`) writes one of:

    merged/   a plain safetensors checkpoint (bf16, or fp32 where bf16 would round the
              adapter's update away) with its tokenizer and generation config:
              AutoModelForCausalLM loads it with no PEFT
    gguf/     model-f16.gguf and model-q8_0.gguf, written with the `gguf` package the way
              llama.cpp's converter writes Gemma, tokenizer included

Either carries a chat template, and stops at `<end_of_turn>` as well as EOS, only when the run
trained on chat (messages): clients switch to chat whenever a template is present.

It then verifies the export, every time: each exported model is loaded back the way a user
would load it (the GGUF through transformers' GGUF loader), scored on the run's held-out split
with the training's own evaluation, and its greedy continuations compared with the adapter
model's. The figures go to `<run>/export.json`. Each file is judged on its own against the
limits in `MAX_LOSS_RISE` (only a rise of the loss fails): one that fails is withheld, moved
aside to `<out>.rejected` while the files that passed stay in `<out>`, and the command says
which and exits 2.

Everything is written to `<out>.partial` and renamed only once verified, so a full disk or a
crash never leaves a model under the real name.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gemma_qlora.errors import UserError
from gemma_qlora.model import base_fingerprint, looks_like_path, resolve_model
from gemma_qlora.rundir import EXPORT_MARKER, check_replaceable, remove_written

INTO = ("merged", "gguf")
BASES = ("dequantized", "original")
GGUF_TYPES = ("f16", "q8_0")
SAVE_DTYPES = ("auto", "bfloat16", "float16", "float32")
GGUF_ARCHS = {"gemma2": "gemma2", "gemma3_text": "gemma3"}  # the ones transformers' GGUF loader reads back
EXPORT_RECORD = "export.json"
REFERENCE_NAMES = {False: "the adapter model", True: "the adapter on the dequantized weights"}  # by `dequantized`

# How far each export's held-out loss may RISE above the reference's, as a fraction: the one
# place the limits live (the --max_loss_drift* flags default to them, docs/export.md quotes them).
# A fall is never a failure: the exported model predicts the held-out split better, and the loss
# it shows is recorded either way. Each file is judged on its own.
MAX_LOSS_RISE = {
    "merged": 0.005,  # the trained weights in bf16 or fp32: only the save dtype's rounding
    "f16": 0.005,  # the same in fp16
    "q8_0": 0.01,  # every weight rounded again, to 8-bit blocks of 32
}
# added to the type's limit when a 4-/8-bit run is merged into the original 16-bit weights: a
# model the adapter never saw, better or worse by how much quantization error training absorbed
ORIGINAL_BASE_ALLOWANCE = 0.05

# `--save_dtype auto` saves bf16 when at least this share of the adapted weights still differs
# from the base's after rounding to bf16, and fp32 otherwise (see `choose_save_dtype`)
BF16_MIN_SURVIVING = 0.9


@dataclass
class ExportConfig:
    run: str = field(metadata={"help": "Run folder written by `train` (holds metrics.json and adapter/)."})
    into: str = field(
        default="merged", metadata={"help": "merged (safetensors checkpoint) or gguf (F16 and Q8_0 files).", "choices": INTO}
    )
    base: str = field(
        default="dequantized",
        metadata={"help": "Merge into the 4-/8-bit weights the adapter trained on, dequantized (dequantized), or into the "
                  "original 16-bit checkpoint (original). 16-bit runs have only the original.", "choices": BASES},
    )
    out: str | None = field(default=None, metadata={"help": "Output folder; default <run>/<into>."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})
    gguf_types: list[str] = field(
        default_factory=lambda: list(GGUF_TYPES), metadata={"help": "GGUF files to write.", "choices": GGUF_TYPES}
    )
    save_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the merged checkpoint; auto: bfloat16 where at least 90%% of the adapter's updates "
                  "survive bf16 rounding, else float32 (export.json says which and why).", "choices": SAVE_DTYPES},
    )
    max_loss_drift: float = field(
        default=MAX_LOSS_RISE["merged"],
        metadata={"help": "Largest relative rise of held-out loss allowed for a merged checkpoint or a GGUF F16 "
                  "(0.005 = 0.5%%); a fall is never a failure."},
    )
    max_loss_drift_q8_0: float = field(
        default=MAX_LOSS_RISE["q8_0"], metadata={"help": "The same for a GGUF Q8_0, which rounds every weight to 8 bits."}
    )
    max_loss_drift_original: float = field(
        default=ORIGINAL_BASE_ALLOWANCE,
        metadata={"help": "Added to those limits when a 4-/8-bit run is merged into the original weights, a model the "
                  "adapter never saw."},
    )
    agreement_prompts: int = field(
        default=8, metadata={"help": "Held-out examples whose greedy continuations are compared (for quotes, besides the run's prompts)."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.gguf_types, str):
            self.gguf_types = [t for t in self.gguf_types.split(",") if t]
        self.gguf_types = [t.lower() for t in self.gguf_types]
        problems = []
        if self.into not in INTO:
            problems.append(f"--into must be one of {', '.join(INTO)}, not {self.into!r}")
        if self.base not in BASES:
            problems.append(f"--base must be one of {', '.join(BASES)}, not {self.base!r}")
        bad = [t for t in self.gguf_types if t not in GGUF_TYPES]
        if bad or not self.gguf_types:
            problems.append(f"--gguf_types must name one or more of {', '.join(GGUF_TYPES)}, not {' '.join(bad) or 'nothing'}")
        if self.save_dtype not in SAVE_DTYPES:
            problems.append(f"--save_dtype must be auto, bfloat16, float16 or float32, not {self.save_dtype!r}")
        for name in ("max_loss_drift", "max_loss_drift_q8_0", "max_loss_drift_original"):
            if not getattr(self, name) > 0:
                problems.append(f"--{name} must be a positive fraction, not {getattr(self, name)}")
        if problems:
            raise UserError("; ".join(problems) + ".")


# --- the run and its base ------------------------------------------------------------------


def read_run(run: str | Path):
    """The run's `TrainConfig` and metrics, refusing a folder that holds no finished run."""
    from gemma_qlora.config import TrainConfig

    run_dir = Path(run).expanduser()
    if run_dir.is_file():
        raise UserError(f"--run {run_dir} is a file, not a folder: give a run folder written by `python -m gemma_qlora train`.")
    if not run_dir.is_dir():
        raise UserError(f"Run folder {run_dir} does not exist: give a folder written by `python -m gemma_qlora train`.")
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise UserError(f"{run_dir} holds no adapter (adapter/adapter_model.safetensors): train it to the end first, "
                        "or point --run to another run folder.")
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        settings = metrics["config"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{run_dir} has no readable metrics.json with the run's settings: it did not finish; train it again.") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in settings.items() if k in known}), metrics


def check_base(train_cfg, metrics: dict) -> str:
    """'matches', or 'not recorded' (older runs: warned about); raises for a base that differs."""
    recorded = metrics.get("base")
    if not recorded:
        print(f"warning: this run did not record its base's fingerprint; cannot check that {train_cfg.model} "
              "is the model it trained on.", file=sys.stderr)
        return "not recorded"
    current = base_fingerprint(train_cfg.model)
    if current["config_sha256"] != recorded.get("config_sha256"):
        what = "its config.json"
    elif current["weights"] != recorded.get("weights"):
        what = "its weights"
    else:
        return "matches"
    raise UserError(f"The base model {train_cfg.model} differs from the one this run trained on ({what} changed): "
                    "export with the same base checkpoint, or train again on this one.")


# --- models ----------------------------------------------------------------------------------


def load_adapter_model(train_cfg, run_dir: Path, precision, *, dequantized: bool = False):
    """The model as trained: the base quantized as the run had it, with the run's adapter.

    `dequantized=True` turns the quantized layers back into plain ones first (see `merged_model`)
    and leaves the adapter unmerged: the trained weights computed without bitsandbytes' kernels.
    """
    from gemma_qlora.formats import use_chat_template
    from gemma_qlora.lora import load_adapter
    from gemma_qlora.model import load_model

    model, tokenizer = load_model(train_cfg, precision)
    use_chat_template(tokenizer, train_cfg)  # the template the run trained with
    if dequantized and train_cfg.bits != 16:
        model = model.dequantize(dtype=precision.compute_dtype)
    return load_adapter(model, str(run_dir / "adapter")).eval(), tokenizer


def merged_model(train_cfg, run_dir: Path, precision, *, base: str):
    """The base with the adapter merged in, as a plain transformers model in fp32, and how much
    of the adapter's update survives each save dtype (`update_survival`).

    `base="dequantized"` (the default) loads the base quantized exactly as it trained and turns
    every bitsandbytes `Linear4bit`/`Linear8bitLt` back into an `nn.Linear` holding the weights
    the adapter saw (transformers' `dequantize`, i.e. bitsandbytes' `dequantize_4bit` /
    `int8_vectorwise_dequant`), then merges. It is the default because it is the model that was
    trained and evaluated: its held-out loss and greedy outputs are the adapter model's up to
    the save dtype's rounding, which the verification can hold to a tight limit.

    `base="original"` merges into the unquantized checkpoint, which the adapter never saw: the
    adapter learned to correct the quantized weights, so its correction lands on other weights
    and the result is a different model, better or worse depending on how much of the
    quantization error training absorbed (docs/export.md measures both).

    The merge is done in fp32 whatever the compute dtype: a short run's update is often smaller
    than half a bf16 step of the weight it lands on, so merging in bf16 would round it away
    before anything could be measured. Merging into the quantized layers themselves (PEFT's
    merge on a bnb layer) would re-quantize the sum and lose it too, so neither path does that.
    """
    from gemma_qlora.formats import use_chat_template
    from gemma_qlora.lora import load_adapter
    from gemma_qlora.model import load_model

    fp32 = dataclasses.replace(precision, compute_dtype=torch.float32)
    if train_cfg.bits == 16 or base == "original":
        model, tokenizer = load_model(dataclasses.replace(train_cfg, bits=16), fp32)
    else:
        model, tokenizer = load_model(train_cfg, fp32)
        model = model.dequantize(dtype=torch.float32)
    use_chat_template(tokenizer, train_cfg)  # the template the run trained with
    model = load_adapter(model, str(run_dir / "adapter"))
    survival = update_survival(model)
    model = model.merge_and_unload()
    model.config.use_cache = True  # the loader turned it off for training
    return model.eval(), tokenizer, survival


@torch.no_grad()
def update_survival(peft_model) -> dict[str, float]:
    """For each save dtype, the share of adapted weights whose saved value differs from the
    base weight's saved value: how much of the adapter's update a checkpoint in that dtype
    keeps. Counted over the weights the update changes in fp32, one layer at a time.

    Written here because PEFT merges but does not say what a later cast keeps; the delta is
    PEFT's own (`get_delta_weight`), so it is exactly what `merge_and_unload` adds."""
    from peft.tuners.lora import LoraLayer

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    kept, changed = dict.fromkeys(dtypes, 0), 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer().weight.float()
        merged = base.clone()
        for name in module.active_adapters:
            merged += module.get_delta_weight(name).float()
        moved = merged != base
        changed += int(moved.sum())
        for key, dtype in dtypes.items():
            kept[key] += int((moved & (merged.to(dtype) != base.to(dtype))).sum())
    return {key: kept[key] / changed if changed else 1.0 for key in dtypes}


def choose_save_dtype(requested: str, survival: dict[str, float]) -> tuple[str, str]:
    """The merged checkpoint's dtype and why.

    `auto` (the default) saves bf16, half the size and the dtype Gemma is run in, when at least
    90 % of the adapted weights keep their update in bf16; otherwise fp32, twice the size. The
    weights bf16 rounds back to the base are those the update changed least relative to their
    size, so losing a tenth of them costs little; a short run's update, though, is often under
    half a bf16 step for most weights: after 15 steps of an 8-bit run of the 270M model only
    51-56 % survived, and the bf16 save was no longer the trained model where the fp32 one was
    (docs/export.md). fp16 keeps more, but Gemma's activations overflow it. A dtype asked for by
    name is used as asked; export.json records what each keeps either way.
    """
    if requested != "auto":
        return requested, "asked for"
    share = survival["bfloat16"]
    if share >= BF16_MIN_SURVIVING:
        return "bfloat16", f"{share:.1%} of the adapter's updates survive bf16 rounding (at least {BF16_MIN_SURVIVING:.0%})"
    return "float32", f"only {share:.1%} of the adapter's updates survive bf16 rounding (under {BF16_MIN_SURVIVING:.0%})"


def _release() -> None:
    """Return the memory of models the caller has dropped, before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- GGUF ------------------------------------------------------------------------------------


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


def load_exported(folder: Path, precision, *, gguf_file: str | None = None):
    """An exported model as a user loads it, with plain transformers and no PEFT (a GGUF through
    transformers' GGUF loader), in the compute dtype: the model and its own tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from gemma_qlora.model import default_attention

    config = AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=gguf_file, dtype=precision.compute_dtype,
        attn_implementation=default_attention(config.model_type, precision.device),
    ).to(precision.device)
    if gguf_file and getattr(model, "hf_quantizer", None) is not None:
        # transformers reads a Gemma GGUF into ordinary float weights but leaves the model marked
        # quantized, and the Trainer then refuses to evaluate it
        if any(not p.is_floating_point() for p in model.parameters()):
            raise UserError(f"transformers kept {gguf_file} packed, so it cannot be scored here: export --into merged.")
        model.hf_quantizer.remove_quantization_config(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "rms_norm_eps", "sliding_window", "layer_types", "query_pre_attn_scalar", "rope_parameters",
    "attn_logit_softcapping", "final_logit_softcapping", "hidden_activation", "tie_word_embeddings",
)


def config_mismatches(exported, reference) -> list[str]:
    """The settings that shape the computation and came back different: a GGUF stores only some
    of a config, and transformers fills the rest with the class's defaults."""
    out = []
    for key in CONFIG_KEYS:
        a, b = getattr(exported, key, None), getattr(reference, key, None)
        if isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-6 * abs(b):
            continue
        if a != b:
            out.append(f"{key}: {a!r} (file) vs {b!r} (trained)")
    return out


# --- verification ----------------------------------------------------------------------------


def eval_loss(model, tokenizer, train_cfg, *, data, precision) -> float:
    """Held-out loss computed exactly as training computed it: the run's own trainer (same
    encoding, masking, packing and batch) evaluating the run's held-out split."""
    from transformers import PrinterCallback, ProgressCallback

    from gemma_qlora.trainer import make_trainer

    with tempfile.TemporaryDirectory() as folder:
        trainer = make_trainer(train_cfg, model, tokenizer, data, precision=precision, output_dir=Path(folder))
        for quiet in (PrinterCallback, ProgressCallback):  # the command prints its own one line per model
            trainer.remove_callback(quiet)
        return float(trainer.evaluate()["eval_loss"])


def agreement_prompts(data, tokenizer, n: int) -> list[str]:
    """The prompts greedy continuations are compared on: for quotes, the run's prompts and the
    first `n` held-out quotes up to their `Author:`; for other formats, the first `n` held-out
    examples' prompts (chat prompts, prompts, a text's first words)."""
    from gemma_qlora.data import PROMPTS, quote_prompt
    from gemma_qlora.formats import format_of, generation_prompts

    if format_of(data["test"]) == "quote":
        return list(PROMPTS) + [quote_prompt(q) for q in data["test"]["quote"][:n]]
    return generation_prompts(data["test"], tokenizer, n=n)


def held_out_texts(data, tokenizer) -> list[str]:
    """The held-out examples as text, for comparing an exported tokenizer with the run's."""
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in data["test"]["input_ids"]]


def measure(model, tokenizer, train_cfg, *, data, precision, prompts: list[str]) -> dict:
    """Held-out loss, and greedy continuations one prompt at a time, as `generate` shows them:
    a batch pads its prompts, and LLM.int8 picks its outlier columns per batch, so an 8-bit
    model's batched continuations differ from what a user sees."""
    from gemma_qlora.evaluate import generate
    from gemma_qlora.formats import format_of, stop_at_end_of_turn

    if format_of(data["test"]) == "messages":
        stop_at_end_of_turn(model, tokenizer)  # as the run generated

    return {
        "eval_loss": eval_loss(model, tokenizer, train_cfg, data=data, precision=precision),
        "continuations": generate(model, tokenizer, prompts, max_new_tokens=train_cfg.max_new_tokens, batch_size=1),
    }


def agreement(ours: list[str], reference: list[str]) -> dict:
    """How far greedy decoding agrees: prompts continued identically, and the mean share of the
    longer continuation's characters before the first difference."""
    def shared(a: str, b: str) -> float:
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return n / max(len(a), len(b), 1)

    return {
        "identical": sum(a == b for a, b in zip(ours, reference)),
        "prompts": len(reference),
        "prefix_agreement": sum(shared(a, b) for a, b in zip(ours, reference)) / max(len(reference), 1),
    }


def tokenizer_agreement(tokenizer, reference, texts: list[str]) -> float:
    """Share of `texts` the exported tokenizer turns into exactly the reference's ids."""
    return sum(tokenizer(t)["input_ids"] == reference(t)["input_ids"] for t in texts) / max(len(texts), 1)


def loss_limit(cfg: ExportConfig, kind: str, *, original: bool) -> float:
    """The largest relative rise of held-out loss `kind` may show (see `MAX_LOSS_RISE`)."""
    limit = cfg.max_loss_drift_q8_0 if kind == "q8_0" else cfg.max_loss_drift
    return limit + (cfg.max_loss_drift_original if original else 0.0)


def judge(entry: dict, reference_loss: float, *, limit: float) -> dict:
    """Pass unless the held-out loss rose past `limit`; a fall passes, and is recorded."""
    drift = (entry["eval_loss"] - reference_loss) / reference_loss
    entry["loss_drift"] = drift
    entry["max_loss_drift"] = limit
    entry["only_a_rise_fails"] = True
    entry["passed"] = drift <= limit
    return entry


# --- writing ---------------------------------------------------------------------------------


def _disk_error(out: Path, error: Exception) -> UserError:
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
    return UserError(f"Could not write the export to {out} ({reason}): free disk space or choose another --out.")


def output_folder(cfg: ExportConfig, run_dir: Path, *, base: str | None = None) -> Path:
    """Where the export goes, refused before anything loads if writing there could remove what
    export did not write: `--overwrite` replaces only an earlier export (its `EXPORT_MARKER`),
    never the run, its base, a folder holding either or holding runs, or the current directory;
    the same holds for the `.partial` and `.rejected` folders beside it."""
    out = Path(cfg.out).expanduser() if cfg.out else run_dir / cfg.into
    protected = (run_dir,) + ((Path(base),) if base else ())
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: choose another --out.")
    if out.exists() and not cfg.overwrite:
        raise UserError(f"Output folder {out} already exists: choose another --out, or add --overwrite true to replace it.")
    check_replaceable(out, marker=EXPORT_MARKER, flag="--out", protected=protected)
    out = Path(os.path.abspath(out)) if not out.name else out  # `.` or a path ending in `..` has no name to add to
    for folder in (out.with_name(out.name + ".partial"), out.with_name(out.name + ".rejected")):
        check_replaceable(folder, marker=EXPORT_MARKER, flag="--out", protected=protected)
    return out


def save_merged(model, tokenizer, folder: Path, *, dtype: str) -> None:
    """The checkpoint with its tokenizer and generation config (which says where to stop)."""
    model.to(getattr(torch, dtype)).save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def ship_as(model, tokenizer, *, chat: bool) -> None:
    """What the export tells its users about turns: a chat run's keeps the chat template it
    trained with and stops at `<end_of_turn>` as well as EOS; any other run's carries no chat
    template, since llama.cpp's CLI and `generate --model` switch to chat whenever one is
    present, and this model never learned it."""
    from gemma_qlora.formats import stop_at_end_of_turn

    if chat:
        stop_at_end_of_turn(model, tokenizer)
    else:
        tokenizer.chat_template = None


def file_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def record(run_dir: Path, out: Path, entry: dict) -> None:
    """Add this export's figures to `<run>/export.json`, keyed by its output folder."""
    from gemma_qlora.rundir import write_json

    path = run_dir / EXPORT_RECORD
    try:
        exports = json.loads(path.read_text())
    except (OSError, ValueError):
        exports = {}
    exports[str(out)] = entry
    write_json(path, exports)


def _finish(partial: Path, out: Path, *, passed: bool) -> Path:
    """Move the verified folder under its real name (or a rejected one aside)."""
    target = out if passed else out.with_name(out.name + ".rejected")
    remove_written(target, marker=EXPORT_MARKER, flag="--out")
    os.replace(partial, target)
    return target


def reference_key(run_dir: Path, precision, *, data, prompts: list[str]) -> dict:
    """What the adapter model's figures depend on: the adapter's bytes, the held-out examples, the
    hardware's dtype and the libraries (the base is checked separately, by its fingerprint)."""
    from importlib.metadata import version

    held_out = json.dumps([list(data["test"]["input_ids"]), list(data["test"]["labels"])]).encode()
    return {
        "adapter_sha256": hashlib.sha256((run_dir / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest(),
        "held_out_sha256": hashlib.sha256(held_out).hexdigest(),
        "device": precision.device,
        "compute_dtype": precision.name,
        "prompts": prompts,
        "generation": "greedy, one prompt at a time",
        "versions": {lib: version(lib) for lib in ("torch", "transformers", "peft", "trl", "bitsandbytes")},
    }


def adapter_reference(train_cfg, run_dir: Path, precision, *, data, prompts: list[str], dequantized: bool = False) -> dict:
    """The adapter model's held-out loss and continuations (with `dequantized`, those of the
    adapter on the dequantized base, unmerged). An earlier export of the same run on the same
    hardware and libraries has measured them already (export.json): they are taken from there
    rather than measured again."""
    key = {**reference_key(run_dir, precision, data=data, prompts=prompts), "dequantized": dequantized}
    what = REFERENCE_NAMES[dequantized]
    try:
        earlier = json.loads((run_dir / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        earlier = {}
    for entry in earlier.values():
        for field_name in ("adapter", "adapter_dequantized"):
            found = entry.get(field_name) or {}
            if found.get("key") == key:
                print(f"{what}: held-out loss {found['eval_loss']:.4f} (measured by an earlier export of this run, "
                      "same adapter, hardware and libraries)", flush=True)
                return dict(found)
    print(f"scoring {what} ({train_cfg.bits}-bit base + adapter) on {len(data['test'])} held-out examples...", flush=True)
    model, tokenizer = load_adapter_model(train_cfg, run_dir, precision, dequantized=dequantized)
    reference = measure(model, tokenizer, train_cfg, data=data, precision=precision, prompts=prompts)
    del model
    _release()
    print(f"{what}: held-out loss {reference['eval_loss']:.4f}", flush=True)
    return {**reference, "key": key}


# --- the command -----------------------------------------------------------------------------


def write_export(cfg: ExportConfig, train_cfg, run_dir: Path, partial: Path, *, precision, base: str, chat: bool):
    """Merge, then write the checkpoint or the GGUF files into `partial`. Returns the files as
    (kind, path, seconds to write), the merged model's config and tokenizer, the merge's seconds,
    and what the saved weights keep of the update."""
    t0 = time.perf_counter()
    model, tokenizer, survival = merged_model(train_cfg, run_dir, precision, base=base)
    ship_as(model, tokenizer, chat=chat)
    merge_seconds, files = time.perf_counter() - t0, []
    kept = {"update_survival": survival}
    if cfg.into == "merged":
        dtype, why = choose_save_dtype(cfg.save_dtype, survival)
        kept.update(save_dtype=dtype, save_dtype_reason=why)
        warn_if_update_lost(survival[dtype], what=f"the {dtype} checkpoint")
        save_merged(model, tokenizer, partial, dtype=dtype)
        files.append(("merged", partial, time.perf_counter() - t0 - merge_seconds))
    else:
        if "f16" in cfg.gguf_types:
            warn_if_update_lost(survival["float16"], what="the GGUF F16")
        for qtype in cfg.gguf_types:
            t1, path = time.perf_counter(), partial / f"model-{qtype}.gguf"
            write_gguf(model, tokenizer, path, qtype=qtype, name=f"{train_cfg.name} ({Path(train_cfg.model).name})")
            files.append((qtype, path, time.perf_counter() - t1))
    return files, model.config, tokenizer, merge_seconds, kept


def warn_if_update_lost(share: float, *, what: str) -> None:
    if share < 0.5:
        print(f"warning: {what} keeps the adapter's update in only {share:.1%} of the weights it changed; "
              "the rest round back to the base's values (--save_dtype float32 keeps all of it).", file=sys.stderr)


def verify(kind: str, path: Path, *, reference: dict, context: dict) -> dict:
    """Load one exported model as a user would, score it, compare it with the adapter model."""
    cfg, train_cfg, data, precision = context["cfg"], context["train_cfg"], context["data"], context["precision"]
    if kind == "merged":
        model, tokenizer = load_exported(path, precision)
        entry = {"bytes": sum(file_sizes(path).values())}
    else:
        model, tokenizer = load_exported(path.parent, precision, gguf_file=path.name)
        entry = {
            "bytes": path.stat().st_size,
            "config_mismatches": config_mismatches(model.config, context["config"]),
            "tokenizer_agreement": tokenizer_agreement(tokenizer, context["tokenizer"], context["prompts"] + context["texts"]),
        }
    entry["chat_template"] = bool(tokenizer.chat_template)
    entry.update(measure(model, tokenizer, train_cfg, data=data, precision=precision, prompts=context["prompts"]))
    del model
    _release()
    entry["agreement"] = agreement(entry["continuations"], reference["continuations"])
    if context.get("int8"):  # what `generate --run` shows an 8-bit run
        entry["agreement_int8"] = agreement(entry["continuations"], context["int8"]["continuations"])
    # merged into the original weights, a quantized run's adapter meets weights it never saw
    original = context["base"] == "original" and train_cfg.bits != 16
    judge(entry, reference["eval_loss"], limit=loss_limit(cfg, kind, original=original))
    entry["passed"] = entry["passed"] and not entry.get("config_mismatches")
    return entry


def verify_all(files, *, reference: dict, context: dict, out: Path) -> list[dict]:
    """Verify each written file, printing one line each."""
    checked = []
    for kind, path, write_seconds in files:
        name = out.name if kind == "merged" else path.name
        print(f"verifying {name}...", flush=True)
        entry = {"model": kind, "file": name, "write_seconds": write_seconds}
        entry.update(verify(kind, path, reference=reference, context=context))
        checked.append(entry)
        agree, int8 = entry["agreement"], entry.get("agreement_int8")
        also = (f" ({int8['identical']}/{int8['prompts']} with the int8 adapter model `generate --run` shows)"
                if int8 else "")
        print(f"  held-out loss {entry['eval_loss']:.4f} ({entry['loss_drift']:+.3%} vs {context['reference_name']}, "
              f"limit +{entry['max_loss_drift']:.2%}): {'passed' if entry['passed'] else 'WITHHELD'}; "
              f"greedy identical on {agree['identical']}/{agree['prompts']} prompts{also}", flush=True)
    return checked


def place(partial: Path, out: Path, checked: list[dict], files) -> tuple[Path | None, Path | None]:
    """Passing files under `out`, failing ones aside in `<out>.rejected`; returns both folders
    (None where nothing went). A merged checkpoint is one file: it goes one way or the other."""
    failed = [path for (kind, path, _), e in zip(files, checked) if not e["passed"]]
    if not failed:
        return _finish(partial, out, passed=True), None
    if len(failed) == len(checked):
        return None, _finish(partial, out, passed=False)
    withheld = out.with_name(out.name + ".withheld.partial")
    remove_written(withheld, marker=EXPORT_MARKER, flag="--out")
    withheld.mkdir()
    shutil.copy2(partial / EXPORT_MARKER, withheld / EXPORT_MARKER)  # so that a later --overwrite may replace it
    for path in failed:
        os.replace(path, withheld / path.name)
    return _finish(partial, out, passed=True), _finish(withheld, out, passed=False)


def refusal(checked: list[dict], *, kept: Path | None, rejected: Path, reference: dict, reference_name: str,
            record_path: Path) -> UserError:
    """One line: which files were withheld and why, where they are, and what was kept."""
    reasons = []
    for bad in (e for e in checked if not e["passed"]):
        why = (f"its settings came back different ({'; '.join(bad['config_mismatches'])})" if bad.get("config_mismatches")
               else f"held-out loss {bad['eval_loss']:.4f} vs {reference['eval_loss']:.4f} for {reference_name}, "
                    f"{bad['loss_drift']:+.2%} where the limit is +{bad['max_loss_drift']:.2%}")
        reasons.append(f"{bad['file']}: {why}")
    good = [e["file"] for e in checked if e["passed"]]
    kept_line = f" Kept, verified: {', '.join(good)} in {kept}." if kept else ""
    return UserError(f"Withheld, as not matching the trained model: {'; '.join(reasons)}; moved to {rejected}.{kept_line} "
                     f"Figures in {record_path}.")


def export(cfg: ExportConfig) -> dict:
    """Export one run, verify the export, record the figures; see the module docstring."""
    from safetensors import SafetensorError

    from gemma_qlora.formats import encoded_examples, format_of
    from gemma_qlora.quant import detect_precision

    run_dir = Path(cfg.run).expanduser()
    train_cfg, metrics = read_run(run_dir)
    out = output_folder(cfg, run_dir, base=resolve_model(train_cfg.model) if looks_like_path(train_cfg.model) else None)
    model_type = metrics.get("model_type")
    if cfg.into == "gguf" and model_type not in GGUF_ARCHS:
        raise UserError(f"GGUF export supports Gemma 2 and Gemma 3 (transformers reads no other Gemma GGUF back to verify it), "
                        f"not {model_type!r}: export --into merged.")
    base_check = check_base(train_cfg, metrics)
    base = "original" if train_cfg.bits == 16 else cfg.base
    precision = detect_precision(force_fp16=train_cfg.force_fp16)
    data, _, run_tokenizer = encoded_examples(train_cfg)
    chat = format_of(data["test"]) == "messages"
    prompts = agreement_prompts(data, run_tokenizer, cfg.agreement_prompts)

    reference = adapter_reference(train_cfg, run_dir, precision, data=data, prompts=prompts)
    reference["recorded_eval_loss"] = metrics.get("eval_loss")
    dense = None
    if train_cfg.bits == 8:
        # LLM.int8 also rounds every activation to 8 bits at inference, which no checkpoint can
        # carry: an 8-bit run's exports are held to the trained weights, computed plainly, and
        # compared with the int8 adapter model (what `generate --run` shows) as well
        dense = adapter_reference(train_cfg, run_dir, precision, data=data, prompts=prompts, dequantized=True)
        dense["int8_activation_gap"] = (reference["eval_loss"] - dense["eval_loss"]) / dense["eval_loss"]
        into = "the dequantized int8 weights" if base == "dequantized" else "the original 16-bit weights"
        print(f"8-bit run: this export is the adapter merged into {into}, computed without LLM.int8's activation "
              "rounding; `generate --run` shows the int8 adapter model, so some continuations differ (both agreements "
              "follow).", flush=True)
    yardstick = dense or reference
    reference_name = REFERENCE_NAMES[dense is not None]

    partial = out.with_name(out.name + ".partial")
    remove_written(partial, marker=EXPORT_MARKER, flag="--out")  # an earlier export's, cut short
    t0 = time.perf_counter()
    try:
        partial.mkdir(parents=True)
        (partial / EXPORT_MARKER).write_text(json.dumps({"run": str(run_dir.resolve()), "into": cfg.into}))
        files, config, tokenizer, merge_seconds, kept = write_export(
            cfg, train_cfg, run_dir, partial, precision=precision, base=base, chat=chat)
    except (OSError, SafetensorError) as error:  # a full disk, mostly: nothing stays behind
        shutil.rmtree(partial, ignore_errors=True)
        raise _disk_error(out, error) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _release()
    export_seconds = time.perf_counter() - t0
    context = dict(cfg=cfg, train_cfg=train_cfg, data=data, precision=precision, prompts=prompts, base=base,
                   config=config, tokenizer=tokenizer, texts=held_out_texts(data, tokenizer),
                   int8=reference if dense else None, reference_name=reference_name)
    t0 = time.perf_counter()
    try:
        checked = verify_all(files, reference=yardstick, context=context, out=out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    verify_seconds = time.perf_counter() - t0

    kept_folder, rejected = place(partial, out, checked, files)
    for entry in checked:
        folder = kept_folder if entry["passed"] else rejected
        entry["path"] = str(folder if entry["model"] == "merged" else folder / entry["file"])
    passed = rejected is None
    result = {
        "into": cfg.into, "base": base, "out": str(kept_folder or rejected), "passed": passed, "base_check": base_check,
        "withheld": [e["file"] for e in checked if not e["passed"]], "rejected_out": str(rejected) if rejected else None,
        "chat_template": chat, "device": precision.device, "compute_dtype": precision.name,
        "save_dtype": kept.get("save_dtype"), "save_dtype_reason": kept.get("save_dtype_reason"),
        "update_survival": kept["update_survival"],
        "merge_seconds": merge_seconds, "export_seconds": export_seconds, "verify_seconds": verify_seconds,
        "prompts": prompts, "adapter": reference, "adapter_dequantized": dense,
        "yardstick": "adapter_dequantized" if dense else "adapter", "exports": checked,
    }
    record(run_dir, out, result)
    if not passed:
        raise refusal(checked, kept=kept_folder, rejected=rejected, reference=yardstick, reference_name=reference_name,
                      record_path=run_dir / EXPORT_RECORD)
    return result
