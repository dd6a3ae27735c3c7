"""4-bit vs 8-bit vs 16-bit: each arm trained in its own process, same data, seed and
settings, then one table and the plots.

    results/
        <arm>/ ...            each arm's run folder (metrics.json, adapter/, generations.json)
        comparison.json       one summary row per arm (mean and spread over seeds)
        comparison.md         the same as a Markdown table
        memory_timeline.png, memory_peaks.png, losses.png, throughput.png
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from gemma_qlora.config import TrainConfig, read_settings_file
from gemma_qlora.embedded import embedded_model_dir
from gemma_qlora.errors import UserError
from gemma_qlora.evaluate import weight_quant_error
from gemma_qlora.model import load_model
from gemma_qlora.plots import FIGURES, save_all
from gemma_qlora.quant import detect_precision

# arm name -> the settings that differ from the shared ones
ARMS = {
    "4bit": {"bits": 4, "quant_type": "nf4", "double_quant": True},
    "4bit-nodq": {"bits": 4, "quant_type": "nf4", "double_quant": False},
    "4bit-fp4": {"bits": 4, "quant_type": "fp4", "double_quant": True},
    "8bit": {"bits": 8},
    "16bit": {"bits": 16},
}


@dataclass
class CompareConfig(TrainConfig):
    arms: list[str] = field(default_factory=lambda: ["4bit", "8bit", "16bit"], metadata={"help": f"Of {list(ARMS)}."})
    seeds: list[int] = field(default_factory=lambda: [42], metadata={"help": "One run per arm and seed."})
    output_dir: str = "results"
    # unset: from the preset of the machine (gemma_qlora/presets/gpu.yaml or cpu.yaml)
    steps: int | None = field(default=None, metadata={"help": "Default 60 on GPU, 15 on CPU (presets gpu, cpu)."})
    batch_size: int | None = field(default=None, metadata={"help": "Default 8 on GPU, 2 on CPU."})
    max_seq_length: int | None = field(default=None, metadata={"help": "Default 512 on GPU, 128 on CPU."})
    eval_size: int | None = field(default=None, metadata={"help": "Held-out quotes for eval loss; default 200 on GPU, 40 on CPU."})
    eval_steps: int | None = field(default=None, metadata={"help": "Default steps // 4 on GPU; on CPU only at the end."})
    author_eval: int | None = field(
        default=None, metadata={"help": "Held-out quotes for author accuracy (0: skip); default 100 on GPU, 20 on CPU."}
    )
    quant_error: bool = field(default=True, metadata={"help": "Measure NF4/FP4/int8 weight reconstruction error."})
    reuse: bool = field(default=False, metadata={"help": "Keep arms whose metrics.json exists (finish a cut-short run)."})

    def __post_init__(self) -> None:
        # what is left unset comes from the machine's preset (gemma_qlora/presets/cpu.yaml, gpu.yaml)
        gpu = torch.cuda.is_available()
        preset = read_settings_file("gpu" if gpu else "cpu")
        for name in ("steps", "batch_size", "max_seq_length", "eval_size", "author_eval"):
            if getattr(self, name) is None:
                setattr(self, name, preset[name])
        if self.eval_steps is None and not gpu:
            self.eval_steps = self.steps  # evaluating is slow on a CPU: only at the end
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise UserError(f"Unknown arm(s) {unknown}: choose from {list(ARMS)}.")
        for what, values, hint in (("arm", self.arms, "give --seeds 1 2 3 to repeat an arm"), ("seed", self.seeds, "give each seed once")):
            twice = sorted({v for v in values if values.count(v) > 1}, key=str)
            if twice:
                raise UserError(f"--{what}s names {', '.join(map(str, twice))} more than once: {hint}.")
        super().__post_init__()


def run_name(arm: str, seed: int, seeds: list[int]) -> str:
    return arm if len(seeds) == 1 else f"{arm}-seed{seed}"


def arm_flags(cfg: CompareConfig, arm: str, seed: int, name: str) -> list[str]:
    """The `train` command line for one arm: the shared settings plus the arm's own."""
    values = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}
    values.update(ARMS[arm], seed=seed, run_name=name, merge=False, overwrite=True)  # an arm that runs again starts over
    flags = []
    for name, value in values.items():
        if value is None:
            continue
        flags.append(f"--{name}")
        flags += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return flags


def summarise(runs: list[dict]) -> dict:
    """Mean and spread (sample standard deviation) over seeds of the figures the table shows."""
    def stat(get):
        values = [v for v in (get(r) for r in runs) if v is not None]
        if not values:
            return None
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}

    return {
        "memory_after_load_gib": stat(lambda r: r["memory_after_load_gib"]),
        "allocated_after_load_gib": stat(lambda r: r.get("allocated_after_load_gib")),
        "peak_train_gib": stat(lambda r: r["peak_train_gib"]["sampled_gib"]),
        "peak_train_allocated_gib": stat(lambda r: r["peak_train_gib"]["allocated_gib"]),
        "model_footprint_gib": stat(lambda r: r["model_footprint_gib"]),
        "tokens_per_second": stat(lambda r: r["steady_tokens_per_second"] or r["tokens_per_second"]),
        "train_seconds": stat(lambda r: r["train_seconds"]),
        "load_seconds": stat(lambda r: r["load_seconds"]),
        "eval_loss_before": stat(lambda r: r["eval_before"]),
        "eval_loss": stat(lambda r: r["eval_loss"]),
        "perplexity": stat(lambda r: r["perplexity"]),
        "author_accuracy_before": stat(lambda r: (r.get("authors_before") or {}).get("accuracy")),
        "author_accuracy": stat(lambda r: (r.get("authors_after") or {}).get("accuracy")),
        "trainable_parameters": runs[0]["parameters"]["trainable"],
    }


def _fmt(s, digits=2, pct=False):
    if s is None:
        return "n/a"
    scale = 100 if pct else 1
    text = f"{s['mean'] * scale:.{digits}f}"
    return text + (f" ± {s['std'] * scale:.{digits}f}" if s["n"] > 1 else "")


def markdown_table(summary: dict, where: str, memory_label: str) -> str:
    rows = [
        f"Measured on {where}. Sampled memory: {memory_label}; allocator: torch's allocated bytes (GPU only). "
        "Mean ± standard deviation over seeds where more than one.",
        "",
        "| arm | after load: sampled / allocator (GiB) | peak training: sampled / allocator (GiB) | tokens/s | "
        "eval loss before → after | perplexity | author accuracy before → after (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, s in summary.items():
        rows.append(
            f"| {arm} | {_fmt(s['memory_after_load_gib'])} / {_fmt(s['allocated_after_load_gib'])} | "
            f"{_fmt(s['peak_train_gib'])} / {_fmt(s['peak_train_allocated_gib'])} | {_fmt(s['tokens_per_second'], 0)} | "
            f"{_fmt(s['eval_loss_before'], 3)} → {_fmt(s['eval_loss'], 3)} | {_fmt(s['perplexity'], 1)} | "
            f"{_fmt(s['author_accuracy_before'], 1, True)} → {_fmt(s['author_accuracy'], 1, True)} |"
        )
    return "\n".join(rows) + "\n"


def compare(cfg: CompareConfig) -> dict:
    out = Path(cfg.output_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"Cannot write to {out} ({error.strerror}): choose another --output_dir.") from None
    if cfg.model == "embedded":  # materialise once here, not in every arm
        embedded_model_dir()
    jobs = [(arm, seed) for seed in cfg.seeds for arm in cfg.arms]  # arms interleaved within each seed
    started = time.perf_counter()
    for i, (arm, seed) in enumerate(jobs, 1):
        name = run_name(arm, seed, cfg.seeds)
        print(f"\n=== [{i}/{len(jobs)}] {name}: {cfg.steps} steps, batch {cfg.batch_size} x {cfg.max_seq_length} "
              f"({time.perf_counter() - started:.0f} s so far) ===", flush=True)
        metrics_file = out / name / "metrics.json"
        if not (cfg.reuse and metrics_file.is_file()):
            metrics_file.unlink(missing_ok=True)  # never mistake an earlier run's figures for this one's
            flags = arm_flags(cfg, arm, seed, name) + ["--output_dir", str(out)]
            try:
                done = subprocess.run([sys.executable, "-m", "gemma_qlora", "train", *flags])
            except KeyboardInterrupt:
                finished = [n for n in (run_name(a, s, cfg.seeds) for a, s in jobs[: i - 1])]
                raise KeyboardInterrupt(
                    f"compare stopped in arm {name}; {'the finished arms ' + ', '.join(finished) + ' are' if finished else 'no arm is'} "
                    f"kept in {out}: run the same command with --reuse true to keep them and train the rest."
                ) from None
            if done.returncode != 0:
                raise UserError(f"Arm {name} failed (exit {done.returncode}); the runs before it are kept in {out}.")

    names = [run_name(arm, seed, cfg.seeds) for arm, seed in jobs]
    result = report(ReportConfig(str(out), cfg.model if cfg.quant_error else None), names, time.perf_counter() - started)
    print(f"All arms in {result['wall_seconds'] / 60:.1f} min; results in {out}/")
    return result


@dataclass
class ReportConfig:
    folder: str = field(metadata={"help": "A results folder holding run folders (<arm> or <arm>-seed<N>)."})
    quant_error_model: str | None = field(
        default=None, metadata={"help": "Also measure NF4/FP4/int8 weight error of this model (e.g. embedded)."}
    )


def report(cfg: ReportConfig, names: list[str] | None = None, wall_seconds: float | None = None) -> dict:
    """Summarise the run folders under `cfg.folder` (or just `names`): comparison.json,
    comparison.md and the plots. `compare` ends with this (passing how long its arms took);
    on its own it summarises runs made elsewhere or cut short.
    """
    out = Path(cfg.folder).expanduser()
    if out.is_file():
        raise UserError(f"--folder {out} is a file, not a folder: give the results folder that holds the run folders.")
    if not out.is_dir():
        raise UserError(f"Results folder {out} does not exist: give the folder `compare` wrote (--output_dir).")
    runs: dict[str, list[dict]] = {}
    paths = [out / n / "metrics.json" for n in names] if names else sorted(out.glob("*/metrics.json"))
    for path in paths:
        metrics, problem = read_metrics(path)
        if problem:  # one bad folder does not hide the others
            print(f"skipped {path.parent}: {problem}", file=sys.stderr)
            continue
        arm = re.sub(r"-seed\d+$", "", path.parent.name)
        runs.setdefault(arm, []).append(metrics)
    if not runs:
        raise UserError(f"No run folders with a readable metrics.json under {out}: run `python -m gemma_qlora compare` first.")
    order = {arm: i for i, arm in enumerate(ARMS)}
    runs = dict(sorted(runs.items(), key=lambda item: order.get(item[0], len(order))))
    first = next(iter(runs.values()))[0]
    threads = f"CPU ({torch.get_num_threads()} threads)"
    where = f"{first.get('gpu') or threads}, {first['model_type']} {first['config']['model']}"
    summary = {arm: summarise(arm_runs) for arm, arm_runs in runs.items()}
    result = {
        "where": where,
        "settings": {k: v for k, v in first["config"].items() if k not in ("bits", "quant_type", "double_quant", "seed", "run_name")},
        "seeds": {arm: [r["config"]["seed"] for r in arm_runs] for arm, arm_runs in runs.items()},
        "versions": first["versions"],
        "memory_kind": first["memory"]["label"],
        "wall_seconds": wall_seconds,
        "arms": summary,
    }
    if cfg.quant_error_model:
        result["weight_quant_error"] = measure_quant_error(cfg.quant_error_model)
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    (out / "comparison.md").write_text(markdown_table(summary, where, first["memory"]["label"]))

    save_all([arm_runs[0] for arm_runs in runs.values()], out)
    print("\n" + (out / "comparison.md").read_text())
    return result


def read_metrics(path: Path) -> tuple[dict | None, str | None]:
    """A run's metrics.json, or why it cannot be summarised (unreadable, not JSON, a figure the
    table needs missing)."""
    try:
        metrics = json.loads(path.read_text())
    except OSError as error:
        return None, f"metrics.json cannot be read ({error.strerror})"
    except ValueError:
        return None, "metrics.json is not valid JSON (damaged or cut short)"
    try:  # what the table and the plots read, tried on this run alone
        summarise([metrics])
        markdown_table({"run": summarise([metrics])}, metrics["config"]["model"], metrics["memory"]["label"])
        for make in FIGURES.values():
            plt.close(make([metrics]))
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as error:
        what = f"the figure {error}" if isinstance(error, KeyError) else f"a figure in the right form ({type(error).__name__})"
        return None, f"metrics.json lacks {what}: it was not written by this version of train, or was edited"
    return metrics, None


def measure_quant_error(model: str) -> dict[str, float]:
    """Relative weight error of each scheme on the unquantized model's decoder linears."""
    base, _ = load_model(TrainConfig(model=model, bits=16), detect_precision("cpu"))
    return weight_quant_error(base)
