import json

import pytest

from gemma_qlora.compare import CompareConfig, arm_flags, compare
from gemma_qlora.errors import UserError


def test_compare_end_to_end_on_cpu(tiny_model, quotes_file, tmp_path):
    out = tmp_path / "results"
    cfg = CompareConfig(model=tiny_model, data=quotes_file, steps=3, batch_size=4, max_seq_length=128, eval_size=8,
                        author_eval=4, max_new_tokens=4, output_dir=str(out))
    result = compare(cfg)
    for name in ("comparison.json", "comparison.md", "memory_timeline.png", "memory_peaks.png", "losses.png", "throughput.png"):
        assert (out / name).stat().st_size > 0, name
    for arm in ("4bit", "8bit", "16bit"):
        metrics = json.loads((out / arm / "metrics.json").read_text())
        assert metrics["steps"] == 3 and metrics["config"]["seed"] == 42
        assert (out / arm / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / arm / "generations.json").is_file()
        assert metrics["memory"]["kind"] == "rss"
    saved = json.loads((out / "comparison.json").read_text())
    assert list(saved["arms"]) == ["4bit", "8bit", "16bit"]
    for arm, row in saved["arms"].items():
        assert 0 < row["memory_after_load_gib"]["mean"] <= row["peak_train_gib"]["mean"]
        assert row["tokens_per_second"]["mean"] > 0
        assert 1 < row["perplexity"]["mean"] < 2 * 600  # tiny vocab of 600: near-uniform model
        assert 0 <= row["author_accuracy"]["mean"] <= 1
    # identical data and settings: same number of trainable parameters in every arm
    assert len({row["trainable_parameters"] for row in saved["arms"].values()}) == 1
    errors = saved["weight_quant_error"]
    assert 0 < errors["int8"] < errors["nf4"] < errors["fp4"] < 0.5
    assert "process RSS" in saved["memory_kind"]
    table = (out / "comparison.md").read_text()
    assert table.count("\n| ") == 4  # header + 3 arms
    assert result["arms"].keys() == saved["arms"].keys()


def test_arm_flags_share_settings_and_differ_only_in_quantization():
    cfg = CompareConfig(model="m", data="d", steps=7, arms=["4bit-fp4", "8bit"])
    fp4 = arm_flags(cfg, "4bit-fp4", 1, "a")
    int8 = arm_flags(cfg, "8bit", 1, "b")
    assert fp4[fp4.index("--quant_type") + 1] == "fp4" and fp4[fp4.index("--bits") + 1] == "4"
    assert int8[int8.index("--bits") + 1] == "8"
    assert fp4[fp4.index("--steps") + 1] == int8[int8.index("--steps") + 1] == "7"


def test_unknown_arm():
    with pytest.raises(UserError, match="Unknown arm"):
        CompareConfig(arms=["3bit"])


def test_report_summarises_seeds_and_cut_short_runs(tmp_path, capsys):
    """`report` groups <arm>-seed<N> folders: mean and spread over the seeds each arm has."""
    import shutil

    from gemma_qlora.compare import ReportConfig, report

    def fake_run(name, seed, eval_loss):
        # a metrics.json as `train` writes it, with only the figures the summary reads
        run = {
            "run": name, "model_type": "gemma3_text", "gpu": "Test GPU", "versions": {"torch": "x"},
            "config": {"model": "m", "seed": seed, "bits": 4}, "parameters": {"trainable": 10},
            "memory": {"label": "GPU memory used (NVML), GiB", "samples": [[0, 1.0], [1, 2.0]],
                       "phases": [{"name": "train", "start_s": 0, "end_s": 1}]},
            "memory_after_load_gib": 1.0, "allocated_after_load_gib": 0.5,
            "peak_train_gib": {"sampled_gib": 2.0, "allocated_gib": 1.5}, "peak_generate_gib": {"sampled_gib": 1.5},
            "model_footprint_gib": 0.4, "steady_tokens_per_second": 100.0, "tokens_per_second": 90.0,
            "train_seconds": 5.0, "load_seconds": 1.0, "eval_before": 4.0, "eval_loss": eval_loss,
            "perplexity": 2.718281828 ** eval_loss, "authors_before": {"accuracy": 0.0}, "authors_after": {"accuracy": 0.5},
            "loss_history": [{"step": 1, "loss": 4.0}], "eval_history": [{"step": 0, "eval_loss": 4.0}],
        }
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(run))

    fake_run("4bit-seed1", 1, 3.0)
    fake_run("4bit-seed2", 2, 3.2)
    fake_run("16bit-seed1", 1, 2.5)
    result = report(ReportConfig(str(tmp_path)))
    assert list(result["arms"]) == ["4bit", "16bit"]
    loss = result["arms"]["4bit"]["eval_loss"]
    assert loss["n"] == 2 and loss["mean"] == pytest.approx(3.1) and loss["std"] == pytest.approx(0.1414, abs=1e-3)
    assert result["arms"]["16bit"]["eval_loss"]["n"] == 1
    assert result["seeds"] == {"4bit": [1, 2], "16bit": [1]}
    assert "3.100 ± 0.141" in (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "memory_timeline.png").is_file()
    shutil.rmtree(tmp_path / "4bit-seed1")
    shutil.rmtree(tmp_path / "4bit-seed2")
    shutil.rmtree(tmp_path / "16bit-seed1")
    with pytest.raises(UserError, match="No run folders"):
        report(ReportConfig(str(tmp_path)))

    # one damaged or foreign metrics.json is named and skipped; the good runs are still reported
    fake_run("4bit", 1, 3.0)
    (tmp_path / "8bit").mkdir()
    (tmp_path / "8bit" / "metrics.json").write_text('{"run": "8bit", "eval_lo')
    fake_run("16bit", 1, 2.5)
    metrics = json.loads((tmp_path / "16bit" / "metrics.json").read_text())
    del metrics["peak_train_gib"]
    (tmp_path / "16bit" / "metrics.json").write_text(json.dumps(metrics))
    result = report(ReportConfig(str(tmp_path)))
    assert list(result["arms"]) == ["4bit"]
    err = capsys.readouterr().err
    assert f"skipped {tmp_path / '8bit'}: metrics.json is not valid JSON" in err
    assert f"skipped {tmp_path / '16bit'}: metrics.json lacks the figure 'peak_train_gib'" in err
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        report(ReportConfig(str(tmp_path / "a_file")))
