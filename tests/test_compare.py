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
