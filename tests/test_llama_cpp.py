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


@pytest.mark.slow
@pytest.mark.parametrize(("qtype", "at_least"), [("f16", 1.0), ("q8_0", 0.5)])
def test_llama_cpp_continues_each_prompt_as_the_package_does(exported, qtype, at_least):
    """F16: the same text on every prompt; Q8_0: on most (llama.cpp also rounds the activations
    its Q8_0 matmuls multiply to 8 bits, which transformers' dequantized weights do not)."""
    result, max_new_tokens = exported
    entry = next(e for e in result["exports"] if e["model"] == qtype)
    ours = greedy(Path(entry["path"]), result["prompts"], max_new_tokens=max_new_tokens)
    package = entry["continuations"]  # the same file, read by transformers: what `generate --model` shows
    same = sum(a == b for a, b in zip(ours, package))
    assert same >= at_least * len(package), json.dumps({"llama.cpp": ours, "package": package}, indent=1)
