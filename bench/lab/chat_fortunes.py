"""A short chat fine-tune of the embedded Gemma 3 270M on the fortunes: who said it?

Every attributed fortune becomes a conversation (user: `Who said: "<quote>"?`, assistant: the
author), trained with the package's recipe on the assistant turns only (the messages format, the
embedded model getting Gemma 3's chat template). Before and after training, the model answers
the held-out conversations whose author the training split has (the package's fixed split):
author accuracy (the answer's first line equals the author, case and spaces aside), against
always naming the training split's most frequent author, and a few answers side by side.

    python bench/lab/chat_fortunes.py --out OUT [--bits 4 --steps 200 --batch_size 8 --max_seq_length 512]

Writes OUT/chat_fortunes.json (accuracy, answers, losses, memory, settings) and
OUT/chat_fortunes.md (the same as a table), and the training run's metrics.json as
OUT/chat_fortunes.metrics.json. On a CPU, small settings (`--steps 30 --batch_size 2
--max_seq_length 256 --eval_size 60`) finish in about a quarter of an hour.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter

import datasets
from pathlib import Path


def fortunes_chat() -> list[dict]:
    """Every attributed fortune as a one-question conversation."""
    from gemma_qlora.data import quote_conversation
    from gemma_qlora.fortunes import load_fortunes

    return [quote_conversation(r["quote"], r["author"]) for r in load_fortunes()]


def write_chat(path: Path) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in fortunes_chat()))
    return path


def answers(run, conversations: list[list[dict]], *, max_new_tokens: int = 16) -> list[str]:
    """Greedy answers to the conversations' questions, first line only."""
    from gemma_qlora.evaluate import generate
    from gemma_qlora.formats import chat_prompt

    prompts = [chat_prompt(messages, run.tokenizer) for messages in conversations]
    return [a.strip().split("\n", 1)[0].strip() for a in generate(run.model, run.tokenizer, prompts, max_new_tokens=max_new_tokens)]


def score(predicted: list[str], authors: list[str]) -> float | None:
    from gemma_qlora.evaluate import normalize_name

    hits = [normalize_name(p) == normalize_name(a) for p, a in zip(predicted, authors)]
    return sum(hits) / len(hits) if hits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--eval_size", type=int, default=200, help="held-out conversations (the package's fixed split)")
    parser.add_argument("--show", type=int, default=10, help="answers to keep side by side")
    args = parser.parse_args()

    from gemma_qlora.config import TrainConfig
    from gemma_qlora.evaluate import normalize_name
    from gemma_qlora.train import Run

    datasets.disable_progress_bars()  # a bar per map of a few thousand rows is noise here
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="chat_fortunes-"))
    cfg = TrainConfig(
        model=args.model, data=str(write_chat(work / "chat.jsonl")), bits=args.bits, steps=args.steps,
        batch_size=args.batch_size, max_seq_length=args.max_seq_length, learning_rate=args.learning_rate,
        eval_size=args.eval_size, eval_steps=args.steps + 1, logging_steps=max(1, args.steps // 20), max_new_tokens=16,
        output_dir=str(work / "runs"), run_name="chat",
    )  # eval_steps past the last step: the held-out loss is taken before and after training only
    t0 = time.perf_counter()
    run = Run(cfg)
    run.load()
    train_authors = Counter(normalize_name(m[-1]["content"]) for m in run.data["train"]["messages"])
    held = [m for m in run.data["test"]["messages"] if normalize_name(m[-1]["content"]) in train_authors]
    authors = [m[-1]["content"] for m in held]
    common = train_authors.most_common(1)[0][0]
    print(f"{len(held)} held-out conversations by authors the training split has; most frequent author: {common}", flush=True)

    before = answers(run, held)
    print(f"author accuracy before training: {score(before, authors):.1%}", flush=True)
    for step in ("generate_before", "prepare", "evaluate_before", "train", "evaluate_after", "generate_after", "save"):
        getattr(run, step)()
    after = answers(run, held)
    m = run.metrics
    result = {
        "model": args.model, "bits": args.bits, "steps": args.steps, "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length, "learning_rate": args.learning_rate,
        "conversations": {"train": len(run.data["train"]), "held_out": len(run.data["test"]), "held_out_known_author": len(held)},
        "tokens_trained": m["data"]["train"]["trained"], "tokens_masked": m["data"]["train"]["masked"],
        "accuracy_before": score(before, authors), "accuracy_after": score(after, authors),
        "accuracy_most_frequent_author": score([common] * len(held), authors), "most_frequent_author": common,
        "eval_loss_before": m["eval_before"], "eval_loss_after": m["eval_loss"],
        "train_seconds": m["train_seconds"], "total_seconds": time.perf_counter() - t0,
        "gpu": m.get("gpu"), "device": run.precision.device,
        "answers": [
            {"question": h[0]["content"], "author": a, "before": b, "after": f}
            for h, a, b, f in list(zip(held, authors, before, after))[: args.show]
        ],
    }
    (out / "chat_fortunes.json").write_text(json.dumps(result, indent=2, default=str))
    shutil.copy(run.run_dir / "metrics.json", out / "chat_fortunes.metrics.json")
    (out / "chat_fortunes.md").write_text(table(result))
    print(table(result))
    shutil.rmtree(work, ignore_errors=True)


def table(r: dict) -> str:
    pct = lambda x: "–" if x is None else f"{x:.1%}"  # noqa: E731
    lines = [
        f"Chat fine-tune of {r['model']} ({r['bits']}-bit) on fortunes conversations: {r['steps']} steps of "
        f"{r['batch_size']} × {r['max_seq_length']} packed tokens, {r['device']}",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| held-out loss (assistant tokens) | {r['eval_loss_before']:.3f} | {r['eval_loss_after']:.3f} |",
        f"| author accuracy, {r['conversations']['held_out_known_author']} held-out quotes | {pct(r['accuracy_before'])} | "
        f"{pct(r['accuracy_after'])} |",
        "",
        f"Always answering the most frequent training author ({r['most_frequent_author']}): {pct(r['accuracy_most_frequent_author'])}.",
        "",
        "| question | author | before | after |",
        "|---|---|---|---|",
    ]
    for a in r["answers"]:
        cells = [a["question"][:70] + ("…" if len(a["question"]) > 70 else ""), a["author"], a["before"], a["after"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
