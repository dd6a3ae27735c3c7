"""Benchmark: gemma_qlora against what users pick instead (plain TRL, Unsloth, the old notebooks).

One command, one GPU. Every arm trains in its own process (this script re-run with `--worker ARM`),
one after the other, on the same quotes and the same model folder, and the parent collects each
arm's JSON into

    <out>/bench.json   settings, environment, model, every arm's figures and ratios
    <out>/bench.md     the same as one Markdown table (also printed)
    <out>/bench_speed.png, bench_memory.png
    <out>/arms/        each arm's result JSON and log

Arms (bench/arms.py): plain-* (the old notebooks' recipe: a reference), trl-* (plain TRL with
peft_config), unsloth-* (Unsloth's FastLanguageModel), pkg-* (the package at its defaults, and
levers: the package with TrainConfig fields changed). See bench/README.md.

Usage:
    python bench/bench.py                                  # Gemma-2B shape, random weights, the default arms
    python bench/bench.py --arms trl-4bit-wrapped,pkg-4bit,pkg-4bit-flat
    python bench/bench.py --shape 270m --arms pkg-4bit,pkg-8bit
    python bench/bench.py --shape /models/gemma-2b         # a real checkpoint folder
    python bench/bench.py --fp16 --gpu-memory-gib 15       # T4 emulation on a bigger GPU
    python bench/bench.py --cpus 0,1 --arms pkg-4bit,pkg-4bit-compiled  # a 2-core host, as on Colab
    python bench/bench.py --unsloth-path /tmp/site-unsloth # Unsloth arms on their own libraries
    python bench/bench.py --shape tiny --steps 3 --warmup 1  # CPU smoke test
    python bench/bench.py --arms pkg-4bit --profile 3      # where the time goes
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before any import, so a worker can time its imports

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from arms import ARMS, DEFAULT_ARMS  # noqa: E402
from shapes import SHAPES  # noqa: E402


@dataclass
class Settings:
    shape: str = "2b"  # 2b | 270m | tiny | a checkpoint folder
    arms: str = ",".join(DEFAULT_ARMS)
    warmup: int = 5  # optimizer steps left out of the speed figures
    steps: int = 100  # timed optimizer steps after the warm-up (a long run's pace: a slow step every few dozen shows)
    out: str = "results/bench"
    fp16: bool = False  # fp16 compute even where bf16 works (T4 emulation)
    gpu_memory_gib: float | None = None  # per-process GPU memory cap (T4 emulation: 15)
    cache: str = "~/.cache/gemma_qlora_bench"  # where random-weight models are built once
    seed: int = 42
    timeout: int = 900  # seconds one arm may take before it is killed and marked so
    profile: int = 0  # steps profiled after the timed ones (0: none)
    cpus: str | None = None  # pin every arm's process to these CPUs, e.g. "0,1" (Colab's 2 cores)
    unsloth_path: str | None = None  # PYTHONPATH of the Unsloth arms (their transformers and TRL)
    prestart: bool = True  # start the next arm's process (its imports) while an arm trains
    replot: bool = False  # only redraw the plots of <out>/bench.json
    worker: str | None = None  # internal: run this one arm in this process
    wait: bool = False  # internal: wait for a go line on stdin before the GPU work
    model_dir: str | None = None  # internal: the model folder the parent prepared


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("Usage:")[1])
    p.add_argument("--shape", default=Settings.shape, help="2b (Gemma-2B), 270m (Gemma 3 270M), tiny (CPU tests), or a checkpoint folder")
    p.add_argument("--arms", default=Settings.arms, help=f"comma list (default: {Settings.arms}); all: {', '.join(ARMS)}")
    p.add_argument("--warmup", type=int, default=Settings.warmup, help="warm-up optimizer steps, not timed")
    p.add_argument("--steps", type=int, default=Settings.steps, help="timed optimizer steps after the warm-up")
    p.add_argument("--out", default=Settings.out, help="folder for bench.json, bench.md, the plots and the arms' logs")
    p.add_argument("--fp16", action="store_true", help="fp16 compute even where bf16 works (T4 emulation)")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="cap each arm's GPU memory (T4 emulation: 15)")
    p.add_argument("--cache", default=Settings.cache, help="folder for the random-weight models, built once per shape")
    p.add_argument("--seed", type=int, default=Settings.seed)
    p.add_argument("--timeout", type=int, default=Settings.timeout, help="seconds one arm may run")
    p.add_argument("--profile", type=int, default=0, help="steps to profile after the timed ones (0: none)")
    p.add_argument("--cpus", help="pin each arm's process (and its compile workers) to these CPUs, e.g. 0,1 as on Colab")
    p.add_argument("--unsloth-path", help="PYTHONPATH for the Unsloth arms instead of this one's (os.pathsep list)")
    p.add_argument("--prestart", action=argparse.BooleanOptionalAction, default=True,
                   help="start the next arm's process while an arm trains, so that its imports (CPU only) overlap "
                   "(default; off with --cpus)")
    p.add_argument("--replot", action="store_true", help="only redraw the plots from <out>/bench.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    s = Settings(**vars(p.parse_args(argv)))
    unknown = [a.strip() for a in s.arms.split(",") if a.strip() and a.strip() not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}: choose from {', '.join(ARMS)}")
    if s.shape not in SHAPES and s.shape.startswith((".", "/", "~")) and not Path(s.shape).expanduser().is_dir():
        p.error(f"--shape {s.shape}: no such folder (give 2b, 270m, tiny or a checkpoint folder)")
    if s.warmup < 1 or s.steps < 1:
        p.error("--warmup and --steps must be at least 1 (the clock starts at the end of the last warm-up step)")
    if s.cpus and not all(c.strip().isdigit() for c in s.cpus.split(",")):
        p.error(f"--cpus {s.cpus}: give CPU numbers separated by commas, e.g. 0,1")
    return s


if __name__ == "__main__":
    settings = parse_args()
    if settings.replot:
        from report import save_plots

        save_plots(json.loads((Path(settings.out) / "bench.json").read_text()), Path(settings.out))
        sys.exit(0)
    if settings.worker:
        from worker import main_worker

        sys.exit(main_worker(settings, PROCESS_START))
    from runner import main_parent

    sys.exit(main_parent(settings))
