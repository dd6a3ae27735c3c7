"""The GPU benchmark runs end to end on CPU at the tiny shape: one process per arm, one row per arm."""

import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"
ARMS = ["plain-4bit", "pkg-4bit", "plain-8bit-old", "pkg-4bit-peft-prepare"]


def test_bench_tiny_shape_on_cpu(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(BENCH), "--shape", "tiny", "--steps", "3", "--warmup", "1", "--arms", ",".join(ARMS),
           "--out", str(out), "--cache", str(tmp_path / "cache"), "--profile", "1"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    assert seconds < 240

    report = json.loads((out / "bench.json").read_text())
    assert [a["arm"] for a in report["arms"]] == ARMS
    for arm in report["arms"]:
        assert arm["status"] == "ok", arm.get("error")
        assert arm["tokens_per_second"] > 0 and arm["timed_steps"] == 3
        assert arm["import_seconds"] > 0 and arm["load_seconds"] > 0
        assert arm["epoch_seconds"] > 0 and arm["epoch_tokens"] > 0
        assert arm["final_loss"] is not None
        assert arm["allocated_peak_gib"] is None  # no GPU: no made-up GPU figures
        # the profiled step runs after the timed ones and is left out of them
        assert "1 profiled steps: wall" in (out / "arms" / f"{arm['arm']}.profile.txt").read_text()
        assert len(arm["losses"]) == 1 + 3
    by_arm = {a["arm"]: a for a in report["arms"]}
    assert by_arm["plain-8bit-old"]["batch_size"] == 1 and by_arm["plain-8bit-old"]["grad_accum"] == 4
    assert by_arm["plain-4bit"]["batch_size"] == 8 and by_arm["plain-4bit"]["packing"]
    assert by_arm["pkg-4bit"]["batch_size"] == 8 and by_arm["pkg-4bit"]["max_length"] == 512
    assert by_arm["pkg-4bit"]["tokens_per_second_vs_ref"] > 0  # ratio against plain-4bit
    assert by_arm["pkg-4bit"]["kbit_preparation"].startswith("gemma_qlora lean")
    assert by_arm["pkg-4bit-peft-prepare"]["kbit_preparation"] == "prepare_model_for_kbit_training"  # a lever arm
    assert report["model"]["random_weights"] is True
    assert set(report["environment"]["versions"]) >= {"torch", "transformers", "peft", "trl", "bitsandbytes"}

    table = (out / "bench.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| arm ")]
    assert [row.split("|")[1].strip() for row in rows] == ARMS
    assert "random weights" in table and "n/a" in table
    assert table in done.stdout  # the table is also printed
    assert (out / "bench_speed.png").stat().st_size > 0
    assert not (out / "bench_memory.png").exists()  # no GPU: no memory plot of made-up figures
