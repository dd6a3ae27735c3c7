"""Load a text-only Gemma (Gemma 1, 2 or 3) with its tokenizer, quantized or not.

The Hugging Face token comes from `HF_TOKEN` or Colab's secrets and is passed straight to
`from_pretrained`; it is never printed, logged or written anywhere.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from gemma_qlora.config import GEMMA_TYPES
from gemma_qlora.embedded import embedded_model_dir
from gemma_qlora.errors import UserError
from gemma_qlora.quant import Precision, bnb_config_for, keep_4bit_weights_trainable_on_cpu
from gemma_qlora.rundir import safetensors_problem

# Multimodal Gemmas, of which only the language model is loaded: {model_type: its text-only class}
MULTIMODAL_TYPES = {"gemma3": "Gemma3ForCausalLM", "gemma3n": "Gemma3nForCausalLM"}
# Where a multimodal checkpoint keeps its language model: `language_model.model.*` in the Hub's
# files, `model.language_model.*` in what transformers 5 saves; the text-only class wants `model.*`.
LANGUAGE_MODEL_KEYS = {
    r"^language_model\.model\.": "model.",
    r"^model\.language_model\.": "model.",
    r"^language_model\.lm_head\.": "lm_head.",
}


def hf_token() -> str | None:
    """The Hub token from the environment, else from Colab's secrets panel, else None."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:
        from google.colab import userdata  # type: ignore[import-not-found]

        return userdata.get("HF_TOKEN")
    except Exception:  # not on Colab, or the secret is missing / not shared with this notebook
        return None


def looks_like_path(name: str) -> bool:
    """A hub id is `owner/name`: one slash at most and no leading `.`, `/` or `~`."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def resolve_model(name: str) -> str:
    """'embedded' -> the cached Gemma 3 270M folder; a path -> checked to exist; else a hub id."""
    if name == "embedded":
        return str(embedded_model_dir())
    if looks_like_path(name):
        path = Path(name).expanduser()
        if path.is_file():
            raise UserError(f"--model {name} is a file, not a folder: give the folder holding config.json and the weights"
                            + (" (a .gguf file: export or generate --model take it)" if path.suffix == ".gguf" else "") + ".")
        if not path.is_dir():
            raise UserError(f"Model folder {name} does not exist: give a folder holding config.json, or a hub id like google/gemma-2b.")
        return str(path)
    return name


def _explain_hub_error(name: str, error: Exception, token: str | None) -> UserError:
    """Turn the hub's long tracebacks into one line that says what to do (without the token)."""
    chain, e = [], error
    while e is not None:
        chain.append(type(e).__name__ + ": " + str(e))
        e = e.__cause__ or e.__context__
    text = " ".join(chain)
    if token:
        text = text.replace(token, "***")
    if "GatedRepo" in text or "gated repo" in text.lower() or "403" in text:
        if token:
            return UserError(
                f"{name} is gated and your token was refused: accept the licence at https://huggingface.co/{name} "
                "with the account the HF_TOKEN belongs to, or use a token with read access."
            )
        return UserError(
            f"{name} is gated: accept its licence at https://huggingface.co/{name}, then set HF_TOKEN "
            "(environment variable, or Colab secrets with notebook access on)."
        )
    if "401" in text or "Invalid user token" in text or "Unauthorized" in text:
        return UserError("The Hugging Face token in HF_TOKEN was rejected: create a new read token at https://huggingface.co/settings/tokens.")
    if "RepositoryNotFound" in text or "404" in text or "not a valid model identifier" in text:
        return UserError(f"No model named {name} on the Hub: check the spelling (e.g. google/gemma-2b), or give a local folder.")
    if "offline" in text.lower() or "LocalEntryNotFound" in text or "connect" in text.lower():
        return UserError(
            f"Could not reach the Hub to fetch {name} and it is not cached: connect to the internet, "
            "or use --model embedded (offline Gemma 3 270M) or a local folder."
        )
    return UserError(f"Could not load {name}: {chain[0]}")


def bad_config(name: str, error: Exception) -> UserError:
    """transformers validates config.json's fields (huggingface_hub's strict dataclasses): its
    error in one line that names the field."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)
    return UserError(f"The config.json of {name} has a bad value ({detail}): correct it, or save the model again.")


def load_config(name: str, token: str | None = None):
    try:
        config = AutoConfig.from_pretrained(name, token=token)
    except StrictDataclassError as error:
        raise bad_config(name, error) from None
    except (OSError, ValueError) as error:
        raise _explain_hub_error(name, error, token) from None
    model_type = getattr(config, "model_type", None)
    if model_type not in GEMMA_TYPES and model_type not in MULTIMODAL_TYPES:
        raise UserError(
            f"{name} is a {model_type!r} model, not Gemma: choose a Gemma checkpoint "
            f"({', '.join(GEMMA_TYPES)}, or multimodal {', '.join(MULTIMODAL_TYPES)}, trained on text only)."
        )
    return config


def load_language_model(path: str, config, **kwargs) -> PreTrainedModel:
    """The language model of a multimodal Gemma 3 (or 3n) checkpoint, alone, as its text-only
    class (`Gemma3ForCausalLM`): no vision or audio tower is built, and their weights, which the
    renaming in `LANGUAGE_MODEL_KEYS` leaves without a place, are never read from the files. The
    adapter trained on it loads back onto the same class loaded the same way.
    `kwargs` go to `from_pretrained` (dtype, quantization, device map...)."""
    cls = getattr(transformers, MULTIMODAL_TYPES[config.model_type])
    quantization = kwargs.get("quantization_config")
    if config.model_type == "gemma3n" and quantization is not None:
        # Gemma 3n's AltUp clamps its own coefficient weights while training, which packed 4-bit
        # or int8 weights cannot take: those small layers stay unquantized (with the head, as by default).
        quantization = copy.deepcopy(quantization)
        quantization.llm_int8_skip_modules = [*(quantization.llm_int8_skip_modules or ["lm_head"]), r".*\.altup"]
        kwargs["quantization_config"] = quantization
    # transformers' load report would list every vision weight as unexpected, which is what is
    # wanted here; a missing text weight, which is not, is checked below instead.
    report = logging.getLogger("transformers.modeling_utils")

    def no_report(record) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    report.addFilter(no_report)
    try:
        model, info = cls.from_pretrained(
            path, config=config.get_text_config(), key_mapping=LANGUAGE_MODEL_KEYS, output_loading_info=True, **kwargs
        )
    finally:
        report.removeFilter(no_report)
    missing = sorted(k for k in info["missing_keys"] if k != "lm_head.weight")  # the head is tied to the embedding
    if missing:
        raise UserError(
            f"{path} holds no weights for its language model's {', '.join(missing[:3])}: it is not a complete "
            f"{config.model_type} checkpoint; download or save it again."
        )
    return model


def module_names(config) -> list[str]:
    """The module names of the model `config` describes (the language model alone for a
    multimodal one), from a copy built on the meta device: no memory, no weights read."""
    with torch.device("meta"):
        if config.model_type in MULTIMODAL_TYPES:
            model = getattr(transformers, MULTIMODAL_TYPES[config.model_type])(config.get_text_config())
        else:
            model = AutoModelForCausalLM.from_config(config)
    return [name for name, _ in model.named_modules()]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # fast (tokenizers) or SentencePiece
SANITY_TEXT = "Quote: Imagination is more important than knowledge.\nAuthor: Albert Einstein"
_checked: dict = {}  # the folder last checked (keyed with its files' sizes and times) -> its tokenizer


def check_model_folder(path: str) -> PreTrainedTokenizerBase | None:
    """Refuse a local model folder that would load wrong or crash late, before anything heavy
    loads: config.json unreadable, no tokenizer files (transformers would build an empty
    tokenizer that turns every text into <unk>), a tokenizer that cannot encode plain English or
    has no end-of-sequence token or more tokens than the model's embedding, weights missing,
    truncated or corrupt. A hub id is not checked here: the hub's errors are explained where it loads.
    Returns the tokenizer it loaded (a large one takes seconds), for `load_model` to use."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    key = (str(folder.resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()))
    if key in _checked:
        return _checked[key]
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"Model folder {path} has no readable config.json ({type(error).__name__}): "
                        "give the folder a model was saved to with save_pretrained.") from None
    if not isinstance(config, dict):
        raise UserError(f"Model folder {path}: config.json holds no settings (a JSON object expected): save the model again.")
    try:  # before the tokenizer, which reads config.json too and would take the blame
        AutoConfig.from_pretrained(str(folder))
    except StrictDataclassError as error:
        raise bad_config(path, error) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"Model folder {path}: config.json cannot be read as a model's settings ({str(error).splitlines()[0][:160]}): "
                        "save the model again.") from None
    _check_weights(folder, path)
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    tokenizer = _check_tokenizer(folder, path, vocab)
    _checked.clear()
    _checked[key] = tokenizer
    return tokenizer


def _check_weights(folder: Path, path: str) -> None:
    files = sorted(folder.glob("*.safetensors"))
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            raise UserError(f"Model folder {path}: {index.name} is damaged: copy or save the model again.") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise UserError(f"Model folder {path} lacks weight file(s) {', '.join(missing[:3])} listed in {index.name}: copy the whole model.")
    if not files and not list(folder.glob("pytorch_model*.bin")):
        raise UserError(f"Model folder {path} holds no weights (model.safetensors): give the folder a model was saved to with save_pretrained.")
    for file in files:
        problem = safetensors_problem(file)
        if problem:
            raise UserError(f"Model weights {file} are damaged or truncated ({problem}): copy or download the model again.")


def _check_tokenizer(folder: Path, path: str, vocab: int | None) -> PreTrainedTokenizerBase:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"Model folder {path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): save the model's tokenizer into it "
            "(tokenizer.save_pretrained), or copy those files from the model it came from."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # tokenizers raises bare Exceptions for a damaged tokenizer.json
        raise UserError(f"The tokenizer in {path} cannot be loaded ({type(error).__name__}): copy its tokenizer files again.") from None
    ids = tokenizer(SANITY_TEXT, add_special_tokens=False)["input_ids"]
    if not ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
        raise UserError(f"The tokenizer in {path} turns plain English into unknown tokens: it is not this model's tokenizer; use the one saved with it.")
    if "Imagination" not in tokenizer.decode(ids):
        raise UserError(f"The tokenizer in {path} does not give back the text it encodes: it is damaged or not a text tokenizer; use the one saved with the model.")
    if tokenizer.eos_token is None:
        raise UserError(f"The tokenizer in {path} has no end-of-sequence token: the examples could not end; use the tokenizer saved with the model.")
    if vocab and len(tokenizer) > vocab:
        raise UserError(
            f"The tokenizer in {path} has {len(tokenizer):,} tokens but the model's embedding only {vocab:,}: "
            "its ids would fall outside the model; use the tokenizer saved with this model."
        )
    return tokenizer


def default_attention(model_type: str, device: str) -> str:
    """Eager on CPU (SDPA there misjudges Gemma 3 under quantization) and for Gemma 2 (attention
    soft-capping, which SDPA lacks); SDPA elsewhere."""
    return "eager" if device == "cpu" or model_type == "gemma2" else "sdpa"


def load_model(cfg, precision: Precision) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `cfg.model` (hub id, folder or 'embedded') in `cfg.bits` with its tokenizer, the
    dtypes following `precision`. `cfg` is a `TrainConfig` (or anything with its fields)."""
    name = cfg.model
    path = resolve_model(name)
    checked = check_model_folder(path)  # a local folder's tokenizer, loaded once by the check
    token = hf_token()
    config = load_config(path, token)
    try:
        tokenizer = checked if checked is not None else AutoTokenizer.from_pretrained(path, token=token)
    except (OSError, ValueError) as error:
        raise _explain_hub_error(name, error, token) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if precision.device == "cuda":
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))}
    else:
        device_map = {"": "cpu"}
    settings = dict(
        token=token,
        dtype=precision.compute_dtype,
        quantization_config=bnb_config_for(cfg, precision),
        attn_implementation=cfg.attn_implementation or default_attention(config.model_type, precision.device),
        device_map=device_map,
    )
    try:
        if config.model_type in MULTIMODAL_TYPES:  # only the language model: the text is all it trains on
            model = load_language_model(path, config, **settings)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **settings)
    except OSError as error:
        raise _explain_hub_error(name, error, token) from None
    model.config.use_cache = False  # training; generation turns it back on per call
    if precision.device == "cpu":
        keep_4bit_weights_trainable_on_cpu(model)  # before any evaluation can repack them (4-bit layers only)
    return model, tokenizer


# --- what identifies a base checkpoint ---------------------------------------------------------


def _model_folder(model: str) -> Path:
    """The local folder of a model name: a path, 'embedded', or a hub id already in the cache."""
    if model == "embedded" or looks_like_path(model):
        return Path(resolve_model(model))
    config = try_to_load_from_cache(model, "config.json")
    if not isinstance(config, str):
        raise UserError(f"The base model {model} is not in the Hugging Face cache: download it again "
                        "(the same id and revision the run trained on).")
    return Path(config).parent


def _sampled_sha256(path: Path, *, sample: int = 1 << 20) -> str:
    """A safetensors file's header (names, dtypes, shapes, offsets) and three 1 MiB samples of its
    data, hashed: reading a few MiB tells a different checkpoint from the same one without
    hashing gigabytes."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        digest.update(f.read(min(header_len, size)))
        for start in (8 + header_len, (size + 8 + header_len) // 2, size - sample):
            f.seek(max(0, start))
            digest.update(f.read(sample))
    return digest.hexdigest()


def base_fingerprint(model_path: str) -> dict:
    """What identifies a base checkpoint: its config (less the keys a re-save changes) and, per
    safetensors file, its size and a sampled hash. Recorded at training time in
    `metrics.json["base"]`; `export` refuses a base that no longer matches."""
    folder = _model_folder(model_path)
    if not (folder / "config.json").is_file():
        raise UserError(f"The base model {model_path} is missing ({folder} has no config.json): restore it, "
                        "or export on the machine the run trained on.")
    config = json.loads((folder / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path", "use_cache"):
        config.pop(volatile, None)
    weights = {
        p.name: {"bytes": p.stat().st_size, "sha256_sampled": _sampled_sha256(p)} for p in sorted(folder.glob("*.safetensors"))
    }
    return {
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "weights": weights,
    }
