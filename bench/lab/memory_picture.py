"""The README's 4-bit vs 8-bit memory picture, drawn by the notebooks' own plot
(`gemma_qlora.plots.memory_peaks`) from a benchmark run's arms: NVML after load and the NVML peak
while training, per arm.

    python bench/lab/memory_picture.py bench/results/h100-hot images/h100_memory_4bit_8bit.png \
        pkg-4bit pkg-8bit trl-8bit-wrapped unsloth-4bit
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from gemma_qlora.plots import memory_peaks  # noqa: E402  (after the backend is chosen)

NAMES = {
    "pkg-4bit": "gemma_qlora 4-bit",
    "pkg-8bit": "gemma_qlora 8-bit",
    "trl-8bit-wrapped": "plain TRL 8-bit",
    "trl-4bit-wrapped": "plain TRL 4-bit",
    "unsloth-4bit": "Unsloth 4-bit",
}


def as_run(arm: dict) -> dict:
    """A benchmark arm in the shape of a run's metrics.json, as far as the plot reads it."""
    return {
        "run": NAMES.get(arm["arm"], arm["arm"]),
        "model_type": "Gemma-2B shape (random weights), 8 x 512 tokens",
        "gpu": arm["gpu"],
        "memory_after_load_gib": arm["nvml_after_load_gib"],
        "peak_train_gib": {"sampled_gib": arm["nvml_peak_gib"]},
        "memory": {"label": "GPU memory used (NVML), GiB"},
    }


def main(folder: str, out: str, *arms: str) -> None:
    found = {a["arm"]: a for a in json.loads((Path(folder) / "bench.json").read_text())["arms"]}
    figure = memory_peaks([as_run(found[name]) for name in arms])
    figure.savefig(out, dpi=110)
    for name in arms:
        a = found[name]
        print(f"{name}: after load {a['nvml_after_load_gib']:.2f} GiB, peak {a['nvml_peak_gib']:.2f} GiB NVML "
              f"({a['allocated_peak_gib']:.2f} allocator), {a['tokens_per_second_median']:,.0f} tokens/s by median step")


if __name__ == "__main__":
    main(*sys.argv[1:])
