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
  export    merge a run's adapter into its base (--into merged) or write GGUF (--into gguf), verified
  generate  stream a run's or a model's continuations of prompts (--run or --model, --prompt)
  data      show which tokens of your data train and which are masked, and count them (--data, --model, --show N)

`python -m gemma_qlora COMMAND --help` lists the flags."""


# What Ctrl-C leaves, where the step it stopped has not said so itself (training and compare do).
KEPT_AFTER_CTRL_C = {
    "train": "stopped before training ended: the run folder holds no finished run (metrics.json is written last); "
             "run the command again.",
    "export": "stopped: nothing was written under the output folder (the unfinished export was removed).",
    "report": "stopped: comparison.md and the plots may be missing or from an earlier report; run report again.",
}


def parse(dataclass_type, argv: list[str], command: str = "train"):
    """Flags into the settings dataclass; a bad or unknown flag is one line (argparse would print
    its whole usage first)."""
    parser = HfArgumentParser(dataclass_type, prog=f"python -m gemma_qlora {command}")

    def error(message: str):
        raise UserError(f"{message}: see python -m gemma_qlora {command} --help.")

    parser.error = error
    cfg, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise UserError(f"unknown flag(s) {' '.join(unknown)}: see python -m gemma_qlora {command} --help.")
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    import datasets

    datasets.disable_progress_bars()  # a bar per map/filter of a few thousand rows is noise here
    try:
        if command == "train":
            from gemma_qlora.config import TrainConfig
            from gemma_qlora.train import train

            train(parse(TrainConfig, rest))  # each step prints its line
        elif command == "compare":
            from gemma_qlora.compare import CompareConfig, compare

            compare(parse(CompareConfig, rest, "compare"))
        elif command == "report":
            from gemma_qlora.compare import ReportConfig, report

            report(parse(ReportConfig, rest, "report"))
        elif command == "plan":
            from gemma_qlora.plan import PlanConfig, run_plan

            print(run_plan(parse(PlanConfig, rest, "plan")))
        elif command == "export":
            from gemma_qlora.export import ExportConfig, export

            result = export(parse(ExportConfig, rest, "export"))
            print(f"export verified: {result['out']}")
        elif command == "data":
            from gemma_qlora.formats import AuditConfig, audit

            audit(parse(AuditConfig, rest, "data"))
        elif command == "generate":
            from gemma_qlora.chat import GenerateConfig, generate_command

            generate_command(parse(GenerateConfig, rest, "generate"))
        else:
            print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            return 2
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:  # Ctrl-C: what was kept, in one line, not a traceback
        print(f"interrupted: {str(error) or KEPT_AFTER_CTRL_C.get(command, 'stopped; nothing was written.')}", file=sys.stderr)
        return 130
    return 0
