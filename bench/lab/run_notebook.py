"""Run a notebook's code cells top to bottom in plain Python, for machines without Jupyter.
Values after the path override the cell tagged
"parameters", papermill-style; figures are saved as PNGs into --figures.

    python bench/lab/run_notebook.py notebooks/X.ipynb --figures out/ CHANGES='{"model": "embedded", "steps": 60}'
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import types
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def ipython_stub() -> None:
    """Where IPython is missing, just enough of it for cells that call display(Markdown(...)):
    text is printed; figures stay open and are saved after each cell."""
    try:
        import IPython.display  # noqa: F401

        return
    except ImportError:
        pass
    display = types.ModuleType("IPython.display")
    display.display = lambda *objs, **_: [print(getattr(o, "data", o)) for o in objs]
    display.Markdown = display.HTML = lambda data: types.SimpleNamespace(data=data)
    package = types.ModuleType("IPython")
    package.display = display
    package.get_ipython = lambda: None  # matplotlib asks whether it runs inside IPython
    package.version_info = (0, 0, 0)
    sys.modules.update({"IPython": package, "IPython.display": display})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("notebook")
    parser.add_argument("--figures", default="figures")
    parser.add_argument("overrides", nargs="*", help="NAME=python-literal")
    args = parser.parse_intermixed_args()
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    ipython_stub()
    overrides = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    namespace: dict = {"__name__": "__main__"}
    cells = [c for c in json.loads(Path(args.notebook).read_text())["cells"] if c["cell_type"] == "code"]
    stem = Path(args.notebook).stem
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        print(f"--- cell {i} ---", flush=True)
        exec(compile(source, f"{stem}[{i}]", "exec"), namespace)
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            namespace.update(overrides)
        for n, num in enumerate(plt.get_fignums()):
            plt.figure(num).savefig(figures / f"{stem}-cell{i}-{n}.png", dpi=110)
        plt.close("all")
    print(f"{len(cells)} code cells ran", flush=True)


if __name__ == "__main__":
    main()
