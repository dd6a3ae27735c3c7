"""Command line: `python -m gemma_qlora train|compare ...` (also the `gemma-qlora` script).

Flags come from the settings dataclasses through `HfArgumentParser` (TRL's `TrlParser`, which
also reads `--config FILE.yaml`), so `python -m gemma_qlora train --help` lists every setting
with its default.
A `UserError` prints as one line and exits 2.
"""

from __future__ import annotations

import dataclasses
import sys
import typing

from trl import TrlParser

from gemma_qlora.config import RESUME, preset_names, read_settings_file
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

`python -m gemma_qlora COMMAND --help` lists the flags; `--config FILE.yaml` (or a preset:
colab-t4, cpu, gpu, bench-8x512) sets them from a file, flags overriding."""


# What Ctrl-C leaves, where the step it stopped has not said so itself (training and compare do).
KEPT_AFTER_CTRL_C = {
    "train": "stopped before training ended: the run folder holds no finished run (metrics.json is written last); "
             "run the command again.",
    "export": "stopped: nothing was written under the output folder (the unfinished export was removed).",
    "report": "stopped: comparison.md and the plots may be missing or from an earlier report; run report again.",
}


def parse(dataclass_type, argv: list[str], command: str = "train"):
    """Flags into the settings dataclass, after the settings of `--config FILE.yaml` (or a
    preset's name) if given: flags override the file. A bad or unknown flag or file is one line
    (argparse would print its whole usage first)."""
    argv, from_file = config_file(argv, command)
    flags = _for_argparse(dataclass_type)
    parser = TrlParser(flags, prog=f"python -m gemma_qlora {command}")

    def error(message: str):
        raise UserError(f"{message}: see python -m gemma_qlora {command} --help.")

    parser.error = error
    if from_file:
        path, values = from_file
        unknown = parser.set_defaults_with_config(**values)  # TRL's way: the file's values become the defaults
        if unknown:
            names = sorted({u.lstrip("-") for u in unknown[::2]})
            raise UserError(f"{path} sets {', '.join(names)}, which `{command}` does not take: see python -m gemma_qlora {command} --help.")
    parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise UserError(f"unknown flag(s) {' '.join(unknown)}: see python -m gemma_qlora {command} --help.")
    return dataclass_type(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(flags)})


def config_file(argv: list[str], command: str) -> tuple[list[str], tuple[str, dict] | None]:
    """`--config FILE.yaml` (or `--config NAME`, a preset in gemma_qlora/presets/) taken out of
    `argv`, and the file's settings."""
    if "--config" not in argv:
        return argv, None
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise UserError(f"--config needs a YAML file or a preset's name ({', '.join(preset_names())}).")
    name, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    return argv, (name, read_settings_file(name))


def _for_argparse(dataclass_type):
    """The settings dataclass as `HfArgumentParser` takes it: the same fields with only argparse's
    keys in their metadata (argparse refuses others, such as the resume mark)."""
    hints = typing.get_type_hints(dataclass_type)
    specs = []
    for f in dataclasses.fields(dataclass_type):
        metadata = {k: v for k, v in f.metadata.items() if k != RESUME}
        default = ({"default": f.default} if f.default is not dataclasses.MISSING else
                   {"default_factory": f.default_factory} if f.default_factory is not dataclasses.MISSING else {})
        specs.append((f.name, hints[f.name], dataclasses.field(metadata=metadata, **default)))
    return dataclasses.make_dataclass(dataclass_type.__name__, specs)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    import datasets

    datasets.disable_progress_bars()  # a bar per map/filter of a few thousand rows is noise here
    try:  # each command imports its module here, so that --help and a bad flag answer at once
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
