"""Settings declared once: the groups, what composes them, the resume mark, and settings files."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gemma_qlora.cli import parse
from gemma_qlora.config import (
    DataSettings,
    ModelSettings,
    QuantSettings,
    SequenceSettings,
    TrainConfig,
    from_file,
    preset_names,
    resume_settings,
)
from gemma_qlora.errors import UserError
from gemma_qlora.formats import AuditConfig
from test_faults import one_error_line


def names(settings_type) -> set[str]:
    return {f.name for f in dataclasses.fields(settings_type)}


def test_each_setting_is_declared_in_one_group_and_composed_where_needed():
    groups = [c for c in TrainConfig.__mro__ if c.__name__.endswith("Settings") and c.__name__ != "Settings"]
    declared = [f for g in groups for f in g.__annotations__]
    assert len(declared) == len(set(declared)) == len(names(TrainConfig))  # each field in exactly one group
    for group in (DataSettings, ModelSettings, SequenceSettings):  # what the audit shares with training
        assert names(group) <= names(AuditConfig) and names(group) <= names(TrainConfig)
    assert names(AuditConfig) - names(TrainConfig) == {"show"}
    assert names(QuantSettings) <= set(resume_settings(TrainConfig()))


def test_a_field_added_to_a_group_reaches_every_command_and_the_resume_check(tmp_path, monkeypatch):
    """A new field, one line in DataSettings, is a flag of train and data, checked alike, and
    recorded in run.json for a resume to compare (here on classes built the way the package
    builds its own)."""
    from gemma_qlora.config import setting
    from gemma_qlora.rundir import recorded_settings

    @dataclasses.dataclass
    class NewData(DataSettings):
        shuffle_buffer: int = setting(7, resume=True, help="A new setting.")

    @dataclasses.dataclass
    class Train(TrainConfig, NewData):
        pass

    @dataclasses.dataclass
    class Audit(AuditConfig, NewData):
        pass

    from gemma_qlora.config import BatchSettings
    from gemma_qlora.plan import PlanConfig

    @dataclasses.dataclass
    class NewBatch(BatchSettings):
        prefetch: int = setting(2, resume=True, help="A new memory setting.")

    @dataclasses.dataclass
    class Plan(PlanConfig, NewBatch):
        pass

    assert parse(Plan, ["--prefetch", "5"], "plan").prefetch == 5  # the plan composes the group it joined
    assert parse(Train, ["--shuffle_buffer", "3"]).shuffle_buffer == 3
    assert parse(Audit, ["--shuffle_buffer", "4"]).shuffle_buffer == 4
    with pytest.raises(UserError, match="--shuffle_buffer must be a whole number"):
        Audit(shuffle_buffer="x")
    assert recorded_settings(Train(shuffle_buffer=5))["shuffle_buffer"] == 5


def test_settings_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("bits: 8\nsteps: 11\nlora_targets: [q_proj, v_proj]\nmodel: embedded\n")
    cfg = parse(TrainConfig, ["--config", str(path), "--steps", "12"])
    assert (cfg.bits, cfg.steps, cfg.lora_targets) == (8, 12, ["q_proj", "v_proj"])  # the flag wins
    for preset in preset_names():
        parse(TrainConfig, ["--config", preset])  # every preset is valid settings
    assert {"colab-t4", "cpu", "gpu", "bench-8x512"} <= set(preset_names())
    colab = from_file(TrainConfig, "colab-t4", bits=8)
    assert (colab.model, colab.bits, colab.batch_size, colab.max_seq_length) == ("google/gemma-2b", 8, 8, 512)


def test_settings_file_errors_are_one_line(tmp_path, capfd):
    bad = {
        "unknown.yaml": ("bits: 4\nlearning_rte: 1e-4\n", "sets learning_rte, which `train` does not take"),
        "broken.yaml": ("bits: [4\n", "is not valid YAML (line 2)"),
        "list.yaml": ("- bits\n- 4\n", "must hold `setting: value` lines, not a list"),
        "typed.yaml": ("steps: many\n", "argument --steps: invalid int value: 'many'"),
    }
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        assert message in one_error_line(capfd, ["train", "--config", str(tmp_path / name)]), name
    assert "neither a file nor a preset" in one_error_line(capfd, ["train", "--config", "no-such-preset"])
    assert "is a folder, not a file" in one_error_line(capfd, ["train", "--config", str(tmp_path)])
    (tmp_path / "audit.yaml").write_text("bits: 4\n")
    assert "sets bits, which `data` does not take" in one_error_line(capfd, ["data", "--config", str(tmp_path / "audit.yaml")])


def test_resume_compares_exactly_the_marked_settings(fast_cfg):
    from gemma_qlora.rundir import prepare_run_dir, unlock

    cfg = fast_cfg()
    run_dir = prepare_run_dir(cfg)
    unlock(run_dir)
    recorded = json.loads((run_dir / "run.json").read_text())["settings"]
    assert set(recorded) == set(resume_settings(cfg)) | {"processes"}
    assert "logging_steps" not in recorded and "lora_r" in recorded and "max_seq_length" in recorded


def test_the_plan_takes_trains_groups_and_its_arithmetic_trains_defaults():
    """The plan's flags are train's groups; the arithmetic's own record (PlanInputs) takes only
    names train has, with train's defaults, so that neither can drift."""
    from gemma_qlora.config import BatchSettings, HardwareSettings, LoraSettings
    from gemma_qlora.plan import PlanConfig, PlanInputs
    from gemma_qlora.plan.inputs import INPUT_NAMES

    for group in (ModelSettings, SequenceSettings, QuantSettings, LoraSettings, BatchSettings, HardwareSettings):
        assert names(group) <= names(PlanConfig), group.__name__
    train, inputs = TrainConfig(), {f.name: f for f in dataclasses.fields(PlanInputs)}
    assert set(INPUT_NAMES) <= names(TrainConfig) and len(INPUT_NAMES) >= 14
    for name in INPUT_NAMES:
        default = inputs[name].default
        expected = getattr(train, name)
        assert (list(default) if isinstance(default, tuple) else default) == expected, name
    assert set(PlanConfig(lora_r=4).settings()) == set(INPUT_NAMES)


def test_plan_takes_liger_kernel_where_liger_is_not_installed_and_train_refuses_it(monkeypatch):
    """Liger changes a step's memory, so `plan --liger_kernel true` plans it from any machine
    (a laptop planning a GPU run); training with it asked for where it is missing is one line."""
    import gemma_qlora.config as config
    from gemma_qlora.plan import PlanConfig

    monkeypatch.setattr(config, "find_spec", lambda name: None)
    assert PlanConfig(lora_r=4, liger_kernel=True).settings()["liger_kernel"] is True
    with pytest.raises(UserError, match="--liger_kernel needs the liger-kernel package"):
        TrainConfig(liger_kernel=True)
    assert TrainConfig(liger_kernel=False).liger_kernel is False
