"""Command line: `python -m gemma_qlora train|compare ...` (also the `gemma-qlora` script).

Flags come from the settings dataclasses through `HfArgumentParser`, so
`python -m gemma_qlora train --help` lists every setting with its default.
A `UserError` prints as one line and exits 2.
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

from gemma_qlora.errors import UserError

USAGE = """usage: python -m gemma_qlora COMMAND [flags]

commands:
  train     fine-tune one arm (--bits 4|8|16) and write its run folder
  compare   train the 4-bit, 8-bit and 16-bit arms side by side and plot them
  report    summarise and plot the run folders already in a results folder
  plan      predict a run's GPU memory from the model's config.json, and whether it fits a GPU

`python -m gemma_qlora COMMAND --help` lists the flags."""


def parse(dataclass_type, argv: list[str]):
    (cfg,) = HfArgumentParser(dataclass_type).parse_args_into_dataclasses(args=argv)
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            from gemma_qlora.config import TrainConfig
            from gemma_qlora.train import train

            metrics = train(parse(TrainConfig, rest))
            if metrics:  # empty on the other ranks of a multi-GPU launch
                before = "n/a" if metrics["eval_before"] is None else f"{metrics['eval_before']:.3f}"
                print(f"eval loss {before} -> {metrics['eval_loss']:.3f}; run folder written.")
        elif command == "compare":
            from gemma_qlora.compare import CompareConfig, compare

            compare(parse(CompareConfig, rest))
        elif command == "report":
            from gemma_qlora.compare import ReportConfig, report

            report(parse(ReportConfig, rest))
        elif command == "plan":
            from gemma_qlora.plan import PlanConfig, run_plan

            print(run_plan(parse(PlanConfig, rest)))
        else:
            print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            return 2
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
