"""The run folder: where a run writes, and how it writes so that a crash or a full disk never
leaves a half-written file under its real name.

    <output_dir>/<run_name>/
        metrics.json      settings, versions, GPU, memory by phase, losses, eval, speed
        generations.json  the prompts' continuations before and after training
        adapter/          the LoRA adapter (safetensors), reloadable onto a fresh base
        checkpoints/      resumable Trainer checkpoints (with --save_steps)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from gemma_qlora.errors import UserError


def prepare_run_dir(cfg) -> Path:
    """Create `<output_dir>/<run name>` and check this process can write there."""
    run_dir = Path(cfg.output_dir).expanduser() / cfg.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # per process: ranks of one launch share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"Cannot write to {run_dir} ({error.strerror}): choose another --output_dir.") from None
    return run_dir


def write_json(path: Path, data) -> None:
    """Write-then-rename, so a crash never leaves a half-written file under the real name."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserError(f"Could not write {path} ({error.strerror}): free disk space or choose another --output_dir.") from None


def save_adapter(model, path: Path) -> None:
    """Save to a sibling folder, then swap it in: a failed save leaves the old adapter (or none)."""
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
    except (OSError, RuntimeError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"Could not save the adapter to {path} ({error}): free disk space or choose another --output_dir.") from None
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def newest_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing. It writes trainer_state.json last,
    so a folder killed mid-save lacks it (or holds it truncated) and is skipped."""
    complete = []
    for path in folder.glob("checkpoint-*"):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if path.name.split("-")[-1].isdigit():
            complete.append((int(path.name.split("-")[-1]), str(path)))
    return max(complete)[1] if complete else None
