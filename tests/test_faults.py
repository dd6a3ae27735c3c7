"""Faults and bad input, as a user meets them: the command line on real files, a real tiny disk
where this machine lets a test mount one, Ctrl-C and divergence inside real training steps.

Each fault gives one line (exit 2, or 130 for Ctrl-C), writes nothing half-way and leaves no
file that says something untrue. Real runs are subprocesses of `python -m gemma_qlora train`
(or of `tests/fault_run.py`, the same CLI with a fault injected); refusals that happen before
anything loads call the same `main()` in this process, which is quicker and sees the same
stderr (captured at the file descriptor).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_qlora.cli import main
from gemma_qlora.rundir import newest_checkpoint

FAULT_RUN = str(Path(__file__).with_name("fault_run.py"))


def flags(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--output_dir", str(out), "--batch_size", "4",
            "--max_seq_length", "128", "--eval_size", "4", "--max_new_tokens", "2", "--logging_steps", "1", *extra]


def cli(*args, prefix=(), timeout=600):
    return subprocess.run([*prefix, sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def one_error_line(capfd, argv) -> str:
    """Run the CLI in this process; it must exit 2 with exactly one line on stderr."""
    capfd.readouterr()
    code = main(argv)
    err = capfd.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
    return lines[0]


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


# --- shared runs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted(tiny_model, quotes_file, tmp_path_factory):
    """A run of 4 steps, checkpointing every step, stopped by Ctrl-C inside step 3. Started with
    SIGINT ignored, as a background job or many CI runners start pytest: the runner must still
    get its Ctrl-C."""
    import signal

    out = tmp_path_factory.mktemp("interrupted")
    done = subprocess.run(
        [sys.executable, FAULT_RUN, "interrupt", "3", *flags(tiny_model, quotes_file, out, "--steps", "4", "--save_steps", "1")],
        capture_output=True, text=True, timeout=600, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    return out, done


@pytest.fixture(scope="module")
def resumed(interrupted, tiny_model, quotes_file, tmp_path_factory):
    """The interrupted run, its newest checkpoint damaged as a full disk leaves it, resumed."""
    source, _ = interrupted
    out = tmp_path_factory.mktemp("resumed")
    shutil.copytree(source / "4bit", out / "4bit")
    with open(out / "4bit" / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors", "r+b") as f:
        f.truncate(1000)
    done = cli("-m", "gemma_qlora", *flags(tiny_model, quotes_file, out, "--steps", "4", "--save_steps", "1", "--resume", "true"))
    return out, done


# --- 1. the run folder ------------------------------------------------------------------------


def test_run_folder_is_safe_by_construction(resumed, tiny_model, quotes_file, tmp_path, capfd):
    source, done = resumed
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "runs"
    shutil.copytree(source / "4bit", out / "4bit")  # a finished run of our own to refuse and overwrite
    run = out / "4bit"
    base = flags(tiny_model, quotes_file, out, "--steps", "4", "--save_steps", "1")

    # a run name is a name: never a path out of --output_dir, and nothing outside is touched
    victim = tmp_path / "precious"  # beside --output_dir
    (victim / "adapter").mkdir(parents=True)
    (victim / "adapter" / "mine.txt").write_text("the user's")
    (victim / "metrics.json").write_text("{}")
    for name in (str(victim), "../precious", "a/b", ".."):
        assert "is not a folder name" in one_error_line(capfd, base + ["--run_name", name])
    assert files_under(victim) == ["adapter/mine.txt", "metrics.json"] and (victim / "metrics.json").read_text() == "{}"
    (out / "link").symlink_to(victim)
    assert "leads outside" in one_error_line(capfd, base + ["--run_name", "link"])

    # an existing run is neither mixed into nor silently replaced
    before = {p: (run / p).read_bytes() for p in files_under(run)}
    assert "already holds a run" in one_error_line(capfd, base)
    # continued only with the settings it started with, naming the ones that differ
    line = one_error_line(capfd, base + ["--resume", "true", "--learning_rate", "1e-3", "--lora_r", "4"])
    assert "other settings" in line and "learning_rate" in line and "lora_r 8 (now 4)" in line and "steps" not in line
    assert "finished run" in one_error_line(capfd, base + ["--resume", "true"])  # nothing left to resume
    assert {p: (run / p).read_bytes() for p in files_under(run)} == before

    # two runs never write one folder: a live process holding the lock keeps others out
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
        "os.write(fd, str(os.getpid()).encode()); print('held', flush=True); time.sleep(120)"), str(run / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert f"in use by process {holder.pid}" in one_error_line(capfd, base + ["--overwrite", "true"])
    finally:
        holder.kill()
        holder.wait()
    assert {p: (run / p).read_bytes() for p in files_under(run) if p != ".lock"} == before

    # --overwrite true replaces the run (the lock of a process that died is taken over); nothing
    # of the old run stays beside the new one, and what is not the tool's stays
    (run / ".lock").write_text("999999999\n")
    (run / "notes.txt").write_text("the user's")
    assert main(flags(tiny_model, quotes_file, out, "--steps", "1", "--overwrite", "true")) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["config"]["overwrite"] is True
    kept = sorted(p.name for p in run.iterdir())
    assert kept == ["adapter", "checkpoints", "generations.json", "metrics.json", "notes.txt", "run.json"], kept
    assert not list((run / "checkpoints").iterdir())  # the old run's checkpoints are gone
    assert json.loads((run / "run.json").read_text())["settings"]["steps"] == 1


# --- 2. finite or fail ------------------------------------------------------------------------


def test_divergence_is_a_failure_and_saves_no_adapter(tiny_model, quotes_file, tmp_path, capfd):
    out = tmp_path / "runs"
    assert "--learning_rate must be a finite positive number" in one_error_line(
        capfd, flags(tiny_model, quotes_file, out, "--learning_rate", "inf"))
    code = main(flags(tiny_model, quotes_file, out, "--steps", "3", "--learning_rate", "1e30", "--warmup_steps", "0", "--save_steps", "1"))
    err = capfd.readouterr().err
    assert code == 2, err[-3000:]
    line = last_line(err)
    assert line.startswith("error: Training diverged") and "--learning_rate" in line and "Traceback" not in err
    run = out / "4bit"
    assert not any((run / name).exists() for name in ("adapter", "adapter.partial", "metrics.json", "generations.json"))
    # a checkpoint is written only from finite weights
    from safetensors.torch import load_file

    for checkpoint in (run / "checkpoints").glob("checkpoint-*"):
        assert all(t.isfinite().all() for t in load_file(checkpoint / "adapter_model.safetensors").values())


# --- 3. inputs checked up front ---------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_models(tiny_model, tmp_path_factory):
    """Copies of the tiny model, each broken one way."""
    root = tmp_path_factory.mktemp("broken")

    def copy(name):
        shutil.copytree(tiny_model, root / name)
        return root / name

    no_tokenizer = copy("no_tokenizer")
    for f in no_tokenizer.iterdir():
        if f.name.startswith("tokenizer"):
            f.unlink()
    truncated = copy("truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    garbage = copy("garbage")
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    bad_config = copy("bad_config")
    (bad_config / "config.json").write_text('{"model_type": "gemma3_te')
    return {"no_tokenizer": no_tokenizer, "truncated": truncated, "garbage": garbage, "bad_config": bad_config}


def test_bad_input_is_one_line_before_anything_loads(tiny_model, quotes_file, broken_models, tmp_path, capfd):
    data = tmp_path / "data"
    data.mkdir()
    rows = "\n".join(json.dumps({"quote": f"Quote number {i}.", "author": "Someone"}) for i in range(20))
    files = {
        "empty.jsonl": b"",
        "empty.csv": b"",
        "header.csv": b"quote,author\n",
        "latin1.csv": "quote,author\nCaf\xe9 society,Ren\xe9\n".encode("latin-1"),
        "truncated.jsonl": rows.encode()[:-9],
        "binary.jsonl": bytes(range(256)) * 8,
        "fake.parquet": b"not a parquet file at all",
        "quotes.txt": b"quote,author\n",
    }
    for name, content in files.items():
        (data / name).write_bytes(content)
    out = tmp_path / "runs"
    cases = {
        "empty.jsonl": "(JSON Lines) is empty",
        "empty.csv": "(CSV) is empty",
        "header.csv": "only a header and no rows",
        "latin1.csv": "is not UTF-8 (byte 0xe9 on line 2",
        "truncated.jsonl": "line 20 is not a JSON object (the file looks truncated)",
        "binary.jsonl": "is binary",
        "fake.parquet": "is not a Parquet file",
        "quotes.txt": "not a format this tool reads",
    }
    for name, message in cases.items():
        assert message in one_error_line(capfd, flags(tiny_model, data / name, out)), name

    models = {
        "no_tokenizer": "has no tokenizer",
        "truncated": "are damaged or truncated",
        "garbage": "are damaged or truncated",
        "bad_config": "no readable config.json",
    }
    for name, message in models.items():
        assert message in one_error_line(capfd, flags(broken_models[name], quotes_file, out)), name

    settings = {
        ("--max_seq_length", "1000000000"): "--max_seq_length must be at most 1,048,576",
        ("--max_seq_length", "1024"): "beyond the 512 positions",
        ("--learning_rate", "nan"): "finite positive",
        ("--optim", "adamw_fast"): "is not a transformers optimizer",
        ("--seed", "-1"): "--seed must be in",
        ("--warmup_steps", "-2"): "--warmup_steps must be 0 or more",
        ("--resume", "true", "--overwrite", "true"): "give one of them",
        ("--no_such_flag", "1"): "unknown flag",
    }
    for extra, message in settings.items():
        assert message in one_error_line(capfd, flags(tiny_model, quotes_file, out, *extra)), extra
    assert files_under(out) == []  # nothing written, not even a lock


# --- 4. saves that survive a full disk ----------------------------------------------------------


def tiny_disk_prefix(mount_point: Path, size: str) -> list[str] | None:
    """A command prefix that runs its command with a real tmpfs of `size` mounted on
    `mount_point` (in a private mount namespace, so nothing is left mounted), then copies what
    the command left there to `<mount_point>.copy`; None where this machine allows no such mount."""
    if shutil.which("unshare") is None or sys.platform != "linux":
        return None
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mount_point}"],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        return None
    script = (f'mount -t tmpfs -o size={size} tmpfs "{mount_point}" || exit 99; "$@"; rc=$?; '
              f'cp -a "{mount_point}/." "{mount_point}.copy/"; exit $rc')
    return ["unshare", "-rm", "sh", "-c", script, "sh"]


def full_disk_run(tmp_path, name, size, fail_at, args):
    """`args` run on a disk of `size` (or, without a mountable tmpfs, with writes to paths
    containing `fail_at` failing as on a full disk); returns the result and the output folder."""
    disk = tmp_path / name
    disk.mkdir()
    (tmp_path / f"{name}.copy").mkdir()
    prefix = tiny_disk_prefix(disk, size)
    if prefix is None:
        done = cli(FAULT_RUN, "full-disk", fail_at, *args(disk))
        return done, disk, False
    done = cli("-m", "gemma_qlora", *args(disk), prefix=prefix)
    return done, tmp_path / f"{name}.copy", True


def test_full_disk_leaves_the_last_good_state(tiny_model, quotes_file, tmp_path):
    # the adapter (about 70 kB) does not fit: no adapter, no partial folder, no metrics
    done, out, real = full_disk_run(tmp_path, "small", "64k", "adapter.partial",
                                    lambda d: flags(tiny_model, quotes_file, d, "--steps", "1"))
    assert done.returncode == 2, done.stderr[-3000:]
    line = last_line(done.stderr)
    assert line.startswith("error: Could not save") and "free disk space" in line and "Traceback" not in done.stderr
    assert "No space left on device" in line
    assert files_under(out) == ["4bit/run.json"]  # what the run started with, nothing it did not finish

    # the second checkpoint (about 290 kB each) does not fit: the first stays, whole, and is named
    done, out, real = full_disk_run(tmp_path, "medium", "450k", "checkpoint-2",
                                    lambda d: flags(tiny_model, quotes_file, d, "--steps", "3", "--save_steps", "1"))
    assert done.returncode == 2, done.stderr[-3000:]
    line = last_line(done.stderr)
    assert line.startswith("error: Could not write") and "checkpoint-2" in line and "Traceback" not in done.stderr
    assert "checkpoint-1 is kept" in line and "--resume true" in line
    checkpoints = out / "4bit" / "checkpoints"
    assert newest_checkpoint(checkpoints).endswith("checkpoint-1")
    assert not (checkpoints / "checkpoint-2").exists()
    assert not any((out / "4bit" / n).exists() for n in ("adapter", "adapter.partial", "metrics.json"))


def test_resume_skips_damaged_checkpoints(resumed):
    out, done = resumed
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Skipped and removed damaged checkpoint(s) checkpoint-2" in done.stdout
    metrics = json.loads((out / "4bit" / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-1") and metrics["steps"] == 4
    assert [h["step"] for h in metrics["loss_history"]] == [1, 2, 3, 4]


# --- 5. Ctrl-C ------------------------------------------------------------------------------


def test_ctrl_c_says_what_was_kept_and_how_to_resume(interrupted, tiny_model, quotes_file, tmp_path, capfd, monkeypatch):
    out, done = interrupted
    assert done.returncode == 130, done.stderr[-3000:]
    line = last_line(done.stderr)
    assert line.startswith("interrupted: training stopped at step 2 of 4") and "Traceback" not in done.stderr
    assert "checkpoint-2 is kept" in line and "--resume true" in line
    assert not (out / "4bit" / "metrics.json").exists() and not (out / "4bit" / ".lock").exists()

    # without --save_steps nothing can be kept, and the line says so (Ctrl-C as the signal
    # handler raises it, inside the first step)
    from transformers import Trainer

    def ctrl_c(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "training_step", ctrl_c)
    capfd.readouterr()
    try:
        code = main(flags(tiny_model, quotes_file, tmp_path, "--steps", "3"))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command line as a traceback")
    assert code == 130
    err = capfd.readouterr().err
    line = last_line(err)
    assert line.startswith("interrupted: training stopped at step 0 of 3") and "Traceback" not in err
    assert "nothing is kept" in line and "--save_steps" in line
