"""The GGUF files, run by llama.cpp itself: greedy text compared with the package's.

Runs where llama.cpp's Python binding (`llama_cpp`, from llama-cpp-python) or a
`llama-completion` / `llama-cli` binary is installed, and is skipped with the reason otherwise:
neither is a dependency of the package (PyPI has llama-cpp-python only as a source package
that builds llama.cpp). The other export tests read the GGUF back with transformers' loader;
this one checks the file where users run it, with llama.cpp's defaults (no chat template, so
no conversation mode) and greedy decoding.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch


BINARIES = ("llama-completion", "llama-cli")


def llama_cpp() -> str | None:
    """'python' for the binding, a binary's path, or None."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return "python"
    return next((found for name in BINARIES if (found := shutil.which(name))), None)


RUNNER = llama_cpp()
pytestmark = pytest.mark.skipif(
    RUNNER is None,
    reason="llama.cpp is not installed: pip install llama-cpp-python (it builds llama.cpp), or put llama-completion "
           "(or llama-cli) from a llama.cpp build on PATH, to compare its greedy text with the package's",
)


def greedy(path: Path, prompts: list[str], *, max_new_tokens: int) -> list[str]:
    """llama.cpp's greedy continuation of each prompt (the prompt left out)."""
    if RUNNER == "python":
        from llama_cpp import Llama

        model = Llama(model_path=str(path), n_ctx=512, n_threads=2, seed=0, verbose=False)
        return [model.create_completion(p, max_tokens=max_new_tokens, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                        repeat_penalty=1.0)["choices"][0]["text"] for p in prompts]
    outputs = []
    for prompt in prompts:
        done = subprocess.run(
            [RUNNER, "-m", str(path), "-p", prompt, "-n", str(max_new_tokens), "--temp", "0", "--repeat-penalty", "1",
             "-s", "0", "-no-cnv", "--no-display-prompt", "--no-escape", "-c", "512", "-t", "2"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout.rstrip("\n").removesuffix(" [end of text]"))  # its end-of-generation marker
    return outputs


@pytest.fixture(scope="module")
def exported(tmp_path_factory, quotes_file):
    """A short 4-bit quote run of the real embedded Gemma 3 270M (a random tiny model's greedy
    choices are near-ties that any rounding flips), exported as F16 and Q8_0."""
    from gemma_qlora.config import TrainConfig
    from gemma_qlora.export import ExportConfig, export
    from gemma_qlora.train import train

    root = tmp_path_factory.mktemp("llama-cpp")
    cfg = TrainConfig(model="embedded", data=quotes_file, steps=5, batch_size=2, max_seq_length=128, eval_size=8,
                      output_dir=str(root / "runs"), max_new_tokens=12, bits=4)
    train(cfg)
    run = root / "runs" / cfg.name
    return export(ExportConfig(run=str(run), into="gguf", out=str(root / "gguf"))), cfg.max_new_tokens


# llama.cpp's CPU kernels round a F16 model's activations to fp16 too, so where the package's
# model is all but indifferent between two tokens either may come first (0.0019 nats apart where
# it happened to this test on an AMD EPYC CPU; machines differ in where it happens)
NEAR_TIE = 0.02


@torch.no_grad()
def parting_gap(model, tokenizer, prompt: str, ours: str, theirs: str) -> float:
    """How much likelier the package's model finds its own next token than llama.cpp's, in nats,
    at the first token where the two continuations part (end of text where one stops first)."""
    a, b = (tokenizer(prompt + text).input_ids for text in (ours, theirs))
    n = max(len(a), len(b))
    a, b = (ids + [tokenizer.eos_token_id] * (n - len(ids)) for ids in (a, b))
    k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    logprobs = model(torch.tensor([a[:k]])).logits[0, -1].float().log_softmax(-1)
    return float(logprobs[a[k]] - logprobs[b[k]])


@pytest.mark.slow
def test_llama_cpp_continues_each_prompt_of_the_f16_file_as_the_package_does(exported):
    """F16: the same text on every prompt, or parting only at a near-tie of the package's model."""
    from gemma_qlora.quant import detect_precision
    from gemma_qlora.trained import load_exported

    result, max_new_tokens = exported
    entry = next(e for e in result["exports"] if e["model"] == "f16")
    path = Path(entry["path"])
    ours = greedy(path, result["prompts"], max_new_tokens=max_new_tokens)
    package = entry["continuations"]  # the same file, read by transformers: what `generate --model` shows
    parted = [(p, a, b) for p, a, b in zip(result["prompts"], package, ours) if a != b]
    if parted:
        model, tokenizer = load_exported(path.parent, detect_precision("cpu"), gguf_file=path.name)
        gaps = [parting_gap(model, tokenizer, p, a, b) for p, a, b in parted]
        assert max(gaps) < NEAR_TIE, json.dumps({"gaps": gaps, "parted": parted}, indent=1)
    assert len(parted) <= len(package) // 4, json.dumps({"llama.cpp": ours, "package": package}, indent=1)


@pytest.mark.slow
def test_llama_cpp_continues_most_prompts_of_the_q8_0_file_as_the_package_does(exported):
    """Q8_0: most prompts (llama.cpp also rounds the activations its Q8_0 matmuls multiply to 8
    bits, which transformers' dequantized weights do not)."""
    result, max_new_tokens = exported
    entry = next(e for e in result["exports"] if e["model"] == "q8_0")
    ours = greedy(Path(entry["path"]), result["prompts"], max_new_tokens=max_new_tokens)
    package = entry["continuations"]
    same = sum(a == b for a, b in zip(ours, package))
    assert same >= 0.5 * len(package), json.dumps({"llama.cpp": ours, "package": package}, indent=1)
