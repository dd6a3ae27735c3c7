"""The memory planner against the package's benchmark runs: each uncompiled `pkg-*` arm of the
given bench.json files (the arms' shapes and settings), predicted and measured, as a Markdown table.

    python bench/lab/plan_vs_bench.py bench/results/h200-bench-rows-2/bench.json bench/results/h200-offload-1/bench.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import transformers

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from arms import ARMS  # noqa: E402
from shapes import SHAPES  # noqa: E402

from gemma_qlora.plan import GPUS, ModelShape, PlanInputs, build_plan  # noqa: E402


def shape_of(name: str) -> ModelShape:
    config_class, fields = SHAPES[name]
    return ModelShape.from_config(getattr(transformers, config_class)(**fields), name=f"{name} shape")


def ran_with(arm: dict, *, spec) -> dict:
    """The planner's settings of a measured arm: what its record says it ran at, else its arm's
    settings; an arm recorded without its offloading setting ran before offloading was the default."""
    settings = {k: v for k, v in spec.settings.items() if k in PlanInputs.__dataclass_fields__}
    settings.setdefault("offload_activations", False)
    recorded = {"lora_dropout": arm.get("lora_dropout"), "packing_layout": arm.get("packing_layout"),
                "offload_activations": arm.get("offload_activations")}
    settings.update({k: v for k, v in recorded.items() if v is not None})
    return {"bits": spec.bits, "batch_size": arm["batch_size"], "max_seq_length": arm["max_length"],
            "dtype": "float16" if arm["precision"] == "fp16" else "bfloat16", **settings}


def rows(path: Path) -> list[str]:
    bench = json.loads(path.read_text())
    shape = shape_of(bench["settings"]["shape"])
    out = []
    for arm in bench["arms"]:
        spec = ARMS.get(arm["arm"])
        if not spec or spec.family != "pkg" or arm.get("status") != "ok" or spec.settings.get("torch_compile"):
            continue
        inputs = PlanInputs(shape, **ran_with(arm, spec=spec))
        p = build_plan(inputs, gpu=GPUS["h200"])
        a, n = arm["allocated_peak_gib"], arm["nvml_peak_gib"]
        out.append(f"| {arm['arm']} ({path.parent.name}) | {a:.2f} / {p.peak_allocated_gib:.2f} | {p.peak_allocated_gib / a - 1:+.1%} "
                   f"| {n:.2f} / {p.peak_nvml_gib:.2f} | {p.peak_nvml_gib / n - 1:+.1%} |")
    return out


def main(paths: list[str]) -> int:
    print("| arm (results folder) | allocator peak GiB: measured / predicted | error | NVML peak GiB: measured / predicted | error |")
    print("|---|---|---|---|---|")
    for path in paths:
        print("\n".join(rows(Path(path))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
