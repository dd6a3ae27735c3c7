"""The GPU benchmark runs end to end on CPU at the tiny shape: one process per arm, one row per arm,
an arm that cannot run here skipped with a note. No GPU, no Unsloth needed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"
ARMS = ["plain-4bit", "pkg-4bit-flat", "pkg-4bit-rows", "trl-4bit-wrapped", "unsloth-4bit"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out, no_unsloth = tmp / "bench", tmp / "empty-site"
    no_unsloth.mkdir()
    cmd = [sys.executable, str(BENCH), "--shape", "tiny", "--steps", "2", "--warmup", "1", "--arms", ",".join(ARMS),
           "--out", str(out), "--cache", str(tmp / "cache"), "--profile", "1", "--unsloth-path", str(no_unsloth)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done, json.loads((out / "bench.json").read_text())


def test_every_arm_runs_in_its_own_process_and_reports(bench_run):
    out, _, report = bench_run
    assert [a["arm"] for a in report["arms"]] == ARMS
    ran = [a for a in report["arms"] if a["family"] != "unsloth"]
    for arm in ran:
        assert arm["status"] == "ok", arm.get("error")
        assert arm["tokens_per_second"] > 0 and arm["timed_steps"] == 2
        # both figures, from the same steps: the median step's pace and the window's
        assert arm["tokens_per_second_median"] > 0 and arm["step_seconds_p90"] >= arm["step_seconds_median"] > 0
        assert len(arm["step_seconds"]) == 2 and arm["steps_per_epoch"] >= 1
        assert [row["step"] for row in sorted(arm["slowest_steps"], key=lambda r: r["step"])] == [2, 3]
        assert all(row["tokens"] > 0 and row["epoch"] > 0 and "gc_seconds" in row for row in arm["slowest_steps"])
        assert arm["import_seconds"] > 0 and arm["load_seconds"] > 0
        assert arm["epoch_seconds"] > 0 and arm["epoch_tokens"] > 0
        assert arm["final_loss"] is not None and len(arm["losses"]) == 1 + 2
        assert arm["allocated_peak_gib"] is None  # no GPU: no made-up GPU figures
        # the profiled step runs after the timed ones and is left out of them
        assert "1 profiled steps: wall" in (out / "arms" / f"{arm['arm']}.profile.txt").read_text()
        assert set(arm["versions"]) >= {"torch", "transformers", "peft", "trl", "bitsandbytes"}
    unsloth = report["arms"][-1]
    assert unsloth["status"] == "skipped" and "unsloth is not in --unsloth-path" in unsloth["error"]
    assert report["model"]["random_weights"] is True


def test_arms_train_the_recipes_they_name(bench_run):
    by_arm = {a["arm"]: a for a in bench_run[2]["arms"]}
    assert by_arm["plain-4bit"]["kbit_preparation"] == "prepare_model_for_kbit_training"
    assert by_arm["plain-4bit"]["lora_dropout"] == 0.05 and by_arm["plain-4bit"]["packing_layout"] == "flat"
    assert by_arm["trl-4bit-wrapped"]["kbit_preparation"] == "none (TRL with peft_config)"
    assert by_arm["trl-4bit-wrapped"]["lora_dropout"] == 0 and by_arm["trl-4bit-wrapped"]["packing_layout"] == "wrapped"
    assert by_arm["pkg-4bit-flat"]["packing_layout"] == "flat" and by_arm["pkg-4bit-rows"]["packing_layout"] == "rows"
    assert by_arm["pkg-4bit-rows"]["kbit_preparation"].startswith("gemma_qlora lean")
    for arm in by_arm.values():
        if arm["status"] == "ok":
            assert arm["batch_size"] == 8 and arm["max_length"] == 512 and arm["trainable_parameters"] > 0
    # rows and the flattened row hold the same bins and targets: the first step (LoRA's B still zero,
    # so dropout cannot differ) has the same loss
    assert by_arm["pkg-4bit-rows"]["losses"][0] == pytest.approx(by_arm["pkg-4bit-flat"]["losses"][0], rel=1e-4)


def test_ratios_use_the_bar_that_ran(bench_run):
    by_arm = {a["arm"]: a for a in bench_run[2]["arms"]}
    # Unsloth skipped: plain TRL with wrapped rows is the 4-bit bar
    assert by_arm["pkg-4bit-rows"]["bar_arm"] == "trl-4bit-wrapped"
    assert by_arm["pkg-4bit-rows"]["tokens_per_second_vs_bar"] > 0
    assert by_arm["pkg-4bit-rows"]["plain_arm"] == "plain-4bit" and by_arm["pkg-4bit-rows"]["tokens_per_second_vs_plain"] > 0
    assert by_arm["unsloth-4bit"]["tokens_per_second_vs_bar"] is None


def test_table_and_plots(bench_run):
    out, done, _ = bench_run
    table = (out / "bench.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| arm ")]
    assert [row.split("|")[1].strip() for row in rows] == ARMS
    assert "wrapped: examples attend to each other" in table and "BFD, kept apart, rows" in table
    assert "tokens/s (median step)" in table and "Slowest timed steps" in table and "- pkg-4bit-rows (median " in table
    assert "**skipped**" in table and "- unsloth-4bit: skipped:" in table
    assert "random weights" in table and "n/a" in table
    assert table in done.stdout  # the table is also printed
    assert (out / "bench_speed.png").stat().st_size > 0
    assert not (out / "bench_memory.png").exists()  # no GPU: no memory plot of made-up figures


def test_unknown_arm_is_one_clear_line():
    done = subprocess.run([sys.executable, str(BENCH), "--arms", "pkg-4bit,pkg-5bit"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown arms ['pkg-5bit']: choose from" in done.stderr.strip().splitlines()[-1]
