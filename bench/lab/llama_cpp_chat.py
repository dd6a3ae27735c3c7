"""A chat run's exports where users load them, against what `generate --run` shows.

Trains a short 4-bit chat run of the embedded Gemma 3 270M on the fortunes conversations
(`chat_fortunes.py`'s data), exports it as GGUF (F16, Q8_0) and as a merged folder, and asks
each the run's held-out questions, greedy, three ways:

    package      `python -m gemma_qlora generate --run RUN --prompt QUESTION` (the adapter model)
    llama.cpp    `llama-completion -m FILE -p QUESTION -n N --temp 0 -st`: its defaults otherwise,
                 so conversation mode with the GGUF's own chat template
    transformers `AutoModelForCausalLM` on the merged folder, no PEFT: `apply_chat_template`
                 and `generate` with the folder's generation config (where it stops)

    python bench/lab/llama_cpp_chat.py --out OUT --llama PATH/TO/llama-completion [--steps 20]

Writes OUT/llama_cpp_chat.json (every answer, side by side) and OUT/llama_cpp_chat.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chat_fortunes import write_chat  # noqa: E402

USER_TURN = re.compile(r"<start_of_turn>user\n(.*?)<end_of_turn>", re.DOTALL)


def llama_cpp(binary: str, path: Path, question: str, *, max_new_tokens: int) -> str:
    """llama.cpp's greedy answer in conversation mode (one turn), its other settings its defaults."""
    done = subprocess.run(
        [binary, "-m", str(path), "-p", question, "-n", str(max_new_tokens), "--temp", "0", "-st", "-t", "2"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return done.stdout


def answer_of(stdout: str, question: str) -> str:
    """The answer in llama-completion's conversation-mode output, which echoes the rendered turn
    with its special tokens hidden ('user\\nQUESTION\\nmodel\\nANSWER'), less the marker it
    prints where the model ended its turn."""
    return stdout.split(f"{question}\nmodel\n", 1)[-1].strip().removesuffix("[end of text]").strip()


def transformers_answers(folder: str, questions: list[str], *, max_new_tokens: int) -> list[str]:
    """Plain transformers on the merged folder, as its model card would show it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    answers = []
    for question in questions:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--llama", required=True, help="llama-completion binary")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--eval_size", type=int, default=40)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--work", default=None, help="where the run and exports go (default: a temporary folder)")
    args = parser.parse_args()

    from gemma_qlora.chat import GenerateConfig, generate_command
    from gemma_qlora.config import TrainConfig
    from gemma_qlora.export import ExportConfig, export
    from gemma_qlora.train import train

    out, work = Path(args.out), Path(args.work or tempfile.mkdtemp(prefix="llama-cpp-chat-"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = TrainConfig(model="embedded", data=str(write_chat(work / "chat.jsonl")), bits=4, steps=args.steps,
                      batch_size=args.batch_size, max_seq_length=args.max_seq_length, eval_size=args.eval_size,
                      max_new_tokens=args.max_new_tokens, output_dir=str(work / "runs"), run_name="chat")
    train(cfg)
    run = work / "runs" / "chat"
    gguf = export(ExportConfig(run=str(run), into="gguf", out=str(work / "gguf")))
    merged = export(ExportConfig(run=str(run), into="merged", out=str(work / "merged")))
    questions = [m.group(1) for p in gguf["prompts"] if (m := USER_TURN.search(p))]

    package = generate_command(GenerateConfig(run=str(run), prompt=questions, max_new_tokens=args.max_new_tokens))
    package = [a.strip() for a in package]
    rows = {"generate --run (package)": package,
            "merged folder, plain transformers": transformers_answers(merged["out"], questions,
                                                                      max_new_tokens=args.max_new_tokens)}
    raw = {}
    for entry in gguf["exports"]:
        path = Path(entry["path"])
        outputs = [llama_cpp(args.llama, path, q, max_new_tokens=args.max_new_tokens) for q in questions]
        raw[path.name] = outputs
        rows[f"{path.name}, llama.cpp"] = [answer_of(o, q) for o, q in zip(outputs, questions)]
    result = {
        "settings": {k: getattr(cfg, k) for k in ("model", "bits", "steps", "batch_size", "max_seq_length", "eval_size",
                                                  "max_new_tokens")},
        "llama_cpp_command": f"{Path(args.llama).name} -m FILE -p QUESTION -n {args.max_new_tokens} --temp 0 -st -t 2",
        "questions": questions,
        "answers": rows,
        "identical_to_package": {name: sum(a == b for a, b in zip(answers, package)) for name, answers in rows.items()},
        "gguf_chat_template": [e.get("chat_template") for e in gguf["exports"]],
        "merged_generation_config": json.loads((Path(merged["out"]) / "generation_config.json").read_text()),
        "llama_cpp_stdout": raw,
        "seconds": time.perf_counter() - t0,
    }
    (out / "llama_cpp_chat.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "llama_cpp_chat.md").write_text(table(result))
    print(table(result))


def table(result: dict) -> str:
    settings, questions, rows = result["settings"], result["questions"], result["answers"]
    lines = [f"A {settings['steps']}-step 4-bit chat run of the embedded Gemma 3 270M; {len(questions)} held-out questions, "
             f"greedy, {settings['max_new_tokens']} new tokens at most. The package's and transformers' text leaves out "
             "special tokens (skip_special_tokens).", "",
             "| model | answers identical to `generate --run` |", "|---|---|"]
    lines += [f"| {name} | {n}/{len(questions)} |" for name, n in result["identical_to_package"].items()]
    lines += ["", "| question | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for i, q in enumerate(questions):
        cells = [q[:60] + ("…" if len(q) > 60 else "")] + [rows[name][i].replace("\n", " ⏎ ").replace("|", "/") for name in rows]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
