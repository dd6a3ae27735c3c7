"""Talk to a trained model: `python -m gemma_qlora generate --run runs/4bit --prompt "Quote: ..."`.

The model is a run's adapter on its base, quantized as it trained (`--run`), or any exported
or plain checkpoint (`--model`: a merged folder, a `.gguf` file, a hub id or 'embedded').
Prompts come from the command line or a file; each continuation is printed token by token as
it is generated (transformers' `TextStreamer`). A chat template wraps the prompt only where
the model has one (exports carry one only from runs that trained on chat), except for a run
that trained on plain text.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TextStreamer, set_seed

from gemma_qlora import formats
from gemma_qlora.config import TrainConfig
from gemma_qlora.errors import UserError
from gemma_qlora.model import hf_token, load_config, load_model, resolve_model
from gemma_qlora.quant import detect_precision, method_of
from gemma_qlora.trained import check_base, load_adapter_model, load_exported, read_run


@dataclass
class GenerateConfig:
    run: str | None = field(default=None, metadata={"help": "Run folder: its adapter on its base, loaded as it trained."})
    model: str | None = field(
        default=None, metadata={"help": "Or a model: merged checkpoint folder, .gguf file, hub id, or 'embedded'."}
    )
    prompt: list[str] = field(default_factory=list, metadata={"help": "One or more prompts."})
    prompts_file: str | None = field(
        default=None, metadata={"help": "File of prompts: a JSON list of strings, or one prompt per line."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens to generate per prompt, at most."})
    chat: bool | None = field(
        default=None,
        metadata={"help": "Wrap each prompt in the tokenizer's chat template. Default: yes when it has one, except for "
                  "a --run that trained on plain text (quotes, text, prompt/completion)."},
    )
    sample: bool = field(default=False, metadata={"help": "Sample (temperature, top_p) instead of greedy decoding."})
    temperature: float = field(default=0.7, metadata={"help": "With --sample: lower is more predictable."})
    top_p: float = field(default=0.95, metadata={"help": "With --sample: keep the likeliest tokens up to this probability mass."})
    seed: int = field(default=0, metadata={"help": "Random seed for --sample."})

    def __post_init__(self) -> None:
        if isinstance(self.prompt, str):
            self.prompt = [self.prompt]
        if (self.run is None) == (self.model is None):
            raise UserError("Give either --run (a run folder) or --model (a checkpoint folder, .gguf file or hub id), not both or neither.")
        if self.max_new_tokens <= 0:
            raise UserError(f"--max_new_tokens must be a positive number, not {self.max_new_tokens}.")
        if self.sample and not self.temperature > 0:
            raise UserError(f"--temperature must be above 0 with --sample true, not {self.temperature}: "
                            "for the likeliest tokens leave out --sample (greedy decoding).")
        if self.sample and not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], not {self.top_p}.")


def read_prompts(cfg: GenerateConfig) -> list[str]:
    """--prompt values, then the prompts file's."""
    prompts = list(cfg.prompt)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file).expanduser()
        if not path.is_file():
            raise UserError(f"Prompts file {path} does not exist.")
        text = path.read_text()
        if path.suffix == ".json":
            try:
                loaded = json.loads(text)
            except ValueError:
                loaded = None
            if not (isinstance(loaded, list) and all(isinstance(p, str) for p in loaded)):
                raise UserError(f"{path} is not a JSON list of strings: write [\"first prompt\", \"second prompt\"].")
            prompts += loaded
        else:
            prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError("No prompt: give --prompt \"...\" or --prompts_file FILE.")
    empty = [i for i, p in enumerate(prompts, 1) if not p.strip()]
    if empty:
        raise UserError(f"Prompt {empty[0]} is empty: give each prompt some text to continue.")
    return prompts


def check_length(cfg: GenerateConfig, config) -> None:
    """Refuse more new tokens than the model has positions for (its rotary positions would be
    extrapolated, and memory for the cache is reserved up front)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if limit and cfg.max_new_tokens >= limit:
        raise UserError(f"--max_new_tokens {cfg.max_new_tokens:,} is beyond the {limit:,} positions this model handles: "
                        f"give at most {limit - 1:,}, less the prompt's length.")


def load(cfg: GenerateConfig, precision=None):
    """(model, tokenizer, trained on plain text?) for `--run` or `--model`."""
    if cfg.run:
        train_cfg, metrics = read_run(cfg.run)
        check_base(train_cfg, metrics)  # the adapter means nothing on a base that changed since training
        check_length(cfg, load_config(resolve_model(train_cfg.model), hf_token()))
        precision = precision or detect_precision(force_fp16=train_cfg.force_fp16)
        model, tokenizer = load_adapter_model(train_cfg, Path(cfg.run).expanduser(), precision)
        if method_of(train_cfg).rounds_activations:
            print("(8-bit run: this is the adapter on the int8 base, where LLM.int8 also rounds activations; an export "
                  "is the adapter merged into the dequantized weights and continues some prompts differently: "
                  "export.json's agreement_int8 says how many)", file=sys.stderr)
        # a chat run answers inside the chat template it trained with, and ends its turn
        chat_run = metrics.get("data", {}).get("train", {}).get("format") == "messages"
        if chat_run:
            formats.stop_at_end_of_turn(model, tokenizer)
        return model, tokenizer, not chat_run
    precision = precision or detect_precision()
    path = Path(cfg.model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist.")
        model, tokenizer = load_exported(path.parent, precision, gguf_file=path.name)
        check_length(cfg, model.config)
        return model, tokenizer, False
    check_length(cfg, load_config(resolve_model(cfg.model), hf_token()))
    model, tokenizer = load_model(TrainConfig(model=cfg.model, bits=16), precision)
    return model.eval(), tokenizer, False


def encode(tokenizer, prompt: str, *, chat: bool, device) -> dict:
    """The prompt's ids: inside the chat template as a user turn, or as plain text."""
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(device)
    return tokenizer(prompt, return_tensors="pt").to(device)


@torch.no_grad()
def stream(model, tokenizer, prompts: list[str], *, chat: bool = False, max_new_tokens: int = 64,
           sample: bool = False, temperature: float = 0.7, top_p: float = 0.95) -> list[str]:
    """Print each prompt, then its continuation as it is generated; return the continuations.

    The notebooks call this with the model they trained; the command line with a loaded one.
    """
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    settings = dict(do_sample=sample, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
    outputs = []
    try:
        with torch.compiler.set_stance("force_eager"):  # a few tokens are not worth compiling
            for prompt in prompts:
                inputs = encode(tokenizer, prompt, chat=chat, device=device)
                print(f"user: {prompt}\nmodel: " if chat else prompt, end="", flush=True)
                ids = model.generate(
                    **inputs, streamer=streamer, max_new_tokens=max_new_tokens, use_cache=True,
                    pad_token_id=tokenizer.pad_token_id, **settings,
                )
                outputs.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


def generate_command(cfg: GenerateConfig) -> list[str]:
    """`python -m gemma_qlora generate`: load, say whether the chat template is used, stream."""
    prompts = read_prompts(cfg)
    model, tokenizer, plain_text = load(cfg)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = cfg.chat if cfg.chat is not None else has_template and not plain_text
    if chat and not has_template:
        raise UserError("This model's tokenizer has no chat template: leave out --chat true to send the prompts as plain text.")
    if has_template:
        why = "--chat" if cfg.chat is not None else ("the run trained on plain text" if plain_text else "the tokenizer has one")
        print(f"(chat template {'on' if chat else 'off'}: {why})", file=sys.stderr)
    if chat:  # a turn ends at <end_of_turn>, which a GGUF's generation settings do not carry to transformers
        formats.stop_at_end_of_turn(model, tokenizer)
    set_seed(cfg.seed)
    return stream(model, tokenizer, prompts, chat=chat, max_new_tokens=cfg.max_new_tokens,
                  sample=cfg.sample, temperature=cfg.temperature, top_p=cfg.top_p)
