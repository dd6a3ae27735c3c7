"""A Gemma model's shape, read from its config.json alone, and the checks on that file.

The file is checked as JSON before transformers sees it, so that a null, mistyped or
non-positive size is one line naming the field rather than a validation traceback from
huggingface_hub. A field the file leaves out takes transformers' default, as `from_pretrained`
would: the plan is of the model transformers would build.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from gemma_qlora.config import GEMMA_TYPES
from gemma_qlora.embedded import embedded_model_dir
from gemma_qlora.errors import UserError

MULTIMODAL_TYPE = "gemma3"  # its config holds the language model's under "text_config"
# sizes the plan reads: where present, each a whole number above zero
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")
MAX_SIZE = 2**31 - 1  # no dimension of a model is larger; beyond it the arithmetic leaves floats
WHERE = "give a model folder (the one holding config.json), a config.json, a hub id or 'embedded'"


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from a Gemma config.json."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied: bool = True
    max_positions: int = 8192
    layer_types: tuple[str, ...] = ()
    softcap: bool = False  # Gemma 2's attention logit soft-capping (eager attention)

    @property
    def norms_per_layer(self) -> int:
        return 2 if self.model_type == "gemma" else 4

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def rope_types(self) -> int:
        return 2 if self.model_type == "gemma3_text" else 1

    @property
    def mask_types(self) -> int:
        return max(1, len(set(self.layer_types)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """The quantized projections of one decoder layer: name -> (in, out)."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def parameters(self) -> int:
        per_layer = sum(a * b for a, b in self.linears().values())
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size * (1 if self.tied else 2)

    @classmethod
    def from_config(cls, config, *, name: str) -> ModelShape:
        if getattr(config, "model_type", None) == MULTIMODAL_TYPE and hasattr(config, "text_config"):
            config = config.text_config  # multimodal Gemma 3: its language model, which is what trains
        model_type = getattr(config, "model_type", None)
        if model_type not in GEMMA_TYPES:
            raise UserError(
                f"{name} is a {model_type!r} model, not Gemma: plan a Gemma checkpoint ({', '.join(GEMMA_TYPES)}, or gemma3's text part)."
            )
        layer_types = tuple(getattr(config, "layer_types", None) or ())
        return cls(
            name=name,
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            tied=bool(getattr(config, "tie_word_embeddings", True)),
            max_positions=getattr(config, "max_position_embeddings", 8192),
            layer_types=layer_types,
            softcap=model_type == "gemma2" and bool(getattr(config, "attn_logit_softcapping", None)),
        )


def config_path(model: str) -> Path:
    """Where `model`'s config.json is: 'embedded', a folder, a config.json file, or a Hub id (of
    which only config.json is downloaded)."""
    if not model.strip():
        raise UserError(f"--model is empty: {WHERE}.")
    if model == "embedded":
        return embedded_model_dir() / "config.json"
    if not (model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).expanduser().exists()):
        return download_config(model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix != ".json":
        raise UserError(f"{model} is a file, not a folder: {WHERE}.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{model} is a folder without config.json: {WHERE}.")
        return path / "config.json"
    if not path.is_file():
        raise UserError(f"No config.json at {model}: nothing is there; {WHERE}.")
    return path


def download_config(repo: str) -> Path:
    # the hub client and the model loader's error advice are imported only for a hub id: a local
    # config is planned without either
    from huggingface_hub import hf_hub_download

    from gemma_qlora.model import _explain_hub_error, hf_token

    token = hf_token()
    try:
        return Path(hf_hub_download(repo, "config.json", token=token))
    except Exception as error:  # the hub's many error types: one line that says what to do
        raise _explain_hub_error(repo, error, token) from None


def read_json(path: Path) -> dict:
    """config.json as a dict, or one line that says what is wrong with the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not JSON ({error.msg} at line {error.lineno}, column {error.colno}): "
                        "copy or download the model's config.json again.") from None
    except (OSError, UnicodeDecodeError, RecursionError) as error:
        raise UserError(f"{path} cannot be read as a config.json ({type(error).__name__}): "
                        "copy or download the model's config.json again.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not a model's settings: give the model's own config.json.")
    return data


def field_problem(data: dict, key: str) -> str | None:
    """What is wrong with the size `key` of a config (None where it is fine or left out)."""
    if key not in data:
        return None
    value = data[key]
    whole = "it must be a whole number above 0"
    if value is None:
        return f'"{key}" is null; {whole}'
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return f'"{key}" is {json.dumps(value)[:40]}; {whole}'
    if value > MAX_SIZE:
        shown = f"{value:.3g}" if isinstance(value, float) or len(str(value)) <= 15 else f"a {len(str(value))}-digit number"
        return f'"{key}" is {shown}, beyond any model (at most {MAX_SIZE:,})'
    if value != int(value):
        return f'"{key}" is {value:g}, not a whole number; {whole}'
    if value <= 0:
        return f'"{key}" is {value:g}; {whole}'
    return None


FIX = "correct it in the file (or copy the model's config.json again)"


def check_config(data: dict, *, path: Path) -> dict:
    """A Gemma config.json the planner can read: its model type, then the language model's
    settings (a multimodal Gemma 3's text part) field by field. Returns `data`."""
    model_type = data.get("model_type")
    if "model_type" not in data or not isinstance(model_type, str):
        what = ' has no "model_type"' if "model_type" not in data else f': "model_type" is {json.dumps(model_type)[:40]}, not a name'
        raise UserError(f"{path}{what}: give the config.json saved with a Gemma model "
                        f"(its model_type is one of {', '.join(GEMMA_TYPES + (MULTIMODAL_TYPE,))}).")
    if model_type not in GEMMA_TYPES + (MULTIMODAL_TYPE,):
        raise UserError(f"{path} is a {model_type!r} model, not Gemma: plan a Gemma checkpoint "
                        f"({', '.join(GEMMA_TYPES)}, or gemma3's text part).")
    text = data
    if model_type == MULTIMODAL_TYPE:
        text = data.get("text_config") or {}
        if not isinstance(text, dict):
            raise UserError(f'{path}: "text_config" is {json.dumps(text)[:40]}, not a set of settings: {FIX}.')
    check_fields(text, path=path)
    return data


def check_fields(text: dict, *, path: Path) -> None:
    """The sizes and switches a language model's config holds, whatever its type: each fault is
    one line naming the field and what to do (also for a loader, before it reads the tokenizer,
    which reads config.json too and would be blamed for it)."""
    for key in SIZE_FIELDS:
        problem = field_problem(text, key)
        if problem:
            raise UserError(f"{path}: {problem}: {FIX}.")
    heads, kv_heads = text.get("num_attention_heads"), text.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise UserError(f'{path}: "num_attention_heads" ({heads}) is not a multiple of "num_key_value_heads" ({kv_heads}): {FIX}.')
    if "tie_word_embeddings" in text and not isinstance(text["tie_word_embeddings"], bool):
        raise UserError(f'{path}: "tie_word_embeddings" is {json.dumps(text["tie_word_embeddings"])[:40]}; it must be true or false: {FIX}.')
    softcap = text.get("attn_logit_softcapping")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))):
        raise UserError(f'{path}: "attn_logit_softcapping" is {json.dumps(softcap)[:40]}; it must be a number or null: {FIX}.')
    layer_types = text.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            raise UserError(f'{path}: "layer_types" is {json.dumps(layer_types)[:40]}; it must be a list of names, one per layer: {FIX}.')
        layers = text.get("num_hidden_layers")
        if layers is not None and len(layer_types) != layers:
            raise UserError(f'{path}: "layer_types" names {len(layer_types)} layers, "num_hidden_layers" says {layers}: {FIX}.')


def read_config(model: str):
    """The transformers config of `model` from its config.json alone: 'embedded', a folder, a
    config.json file, or a Hub id (only config.json is downloaded)."""
    path = config_path(model)
    data = check_config(read_json(path), path=path)
    # transformers is imported once the file has passed the checks: it is the slow part of `plan`
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**data)
    except Exception as error:  # noqa: BLE001  transformers and huggingface_hub validate a config with many error types
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: transformers cannot read this config ({reason}): correct the field it names "
                        "(or copy the model's config.json again).") from None


def load_shape(model: str) -> ModelShape:
    return ModelShape.from_config(read_config(model), name=model)
