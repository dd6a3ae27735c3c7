"""The run folder: where a run writes, and how it writes so that a crash, a full disk or a
second run never leaves a half-written or mismatched file under a real name.

    <output_dir>/<run_name>/
        run.json          the settings the run started with (what a resume must match)
        metrics.json      settings, versions, GPU, memory by phase, losses, eval, speed
        generations.json  the prompts' continuations before and after training
        adapter/          the LoRA adapter (safetensors), reloadable onto a fresh base
        checkpoints/      resumable Trainer checkpoints (with --save_steps)
        .lock             while a run writes here: the process id holding the folder

A run name is a name, never a path; the folder is always a direct child of `--output_dir`.
A folder that already holds a run is continued (`--resume true`, only with the settings it
was started with) or replaced (`--overwrite true`), never mixed into.

`--overwrite` only ever removes what the package wrote, recognised by its marker: a run folder
by its run.json, an export folder by `EXPORT_MARKER`. It never removes the current directory,
a folder above it, a folder holding a run folder, or the run an export reads
(`check_replaceable`).
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import shutil
import zipfile
from dataclasses import MISSING, fields
from pathlib import Path

from gemma_qlora.config import resume_settings
from gemma_qlora.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the folder checks still apply
    fcntl = None

RUN_FILE, LOCK_FILE = "run.json", ".lock"
EXPORT_MARKER = ".gemma-qlora-export.json"  # written first into every export folder: what `--overwrite` may replace
# The results of a finished run, and what a save in progress leaves: removed when a run starts over.
OUTPUTS = ("metrics.json", "generations.json", "adapter", "merged")
LEFTOVERS = ("adapter.partial", "adapter.old", "merged.partial", "merged.old")
# What a full disk (or a vanished mount) raises from a save: OSError from Python's own writes,
# RuntimeError from torch.save's zip writer, SafetensorError from safetensors' Rust writer.
try:
    from safetensors import SafetensorError
except ImportError:  # very old safetensors
    SafetensorError = RuntimeError
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)

_held: dict[str, int] = {}  # run folder -> file descriptor of its lock, held by this process


def check_run_name(name: str) -> None:
    """A run name names one folder under --output_dir: no separators, no `..`, nothing absolute."""
    bad = (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or os.path.isabs(name)
        or name != name.strip()
    )
    if bad:
        raise UserError(
            f"--run_name {name!r} is not a folder name (no '/', '\\', '..', leading or trailing spaces, nothing absolute): "
            "give a plain name such as 4bit-r16, and --output_dir for where it goes."
        )


def run_dir_for(cfg) -> Path:
    """`<output_dir>/<run name>`, refusing a name (or a symbolic link) that would lead elsewhere."""
    check_run_name(cfg.name)
    parent = Path(cfg.output_dir).expanduser()
    run_dir = parent / cfg.name
    if parent.exists() and not parent.is_dir():
        raise UserError(f"--output_dir {parent} is a file, not a folder: give the folder run folders go into.")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run folder: choose another --run_name.")
    if run_dir.is_symlink() or run_dir.resolve().parent != parent.resolve():
        raise UserError(f"{run_dir} leads outside {parent} (a symbolic link): choose another --run_name.")
    return run_dir


def recorded_settings(cfg) -> dict:
    """The settings `run.json` keeps for a later resume to compare against: those a checkpoint's
    optimizer state, schedule and data order depend on (marked `resume=True` where declared)."""
    settings = {name: getattr(cfg, name) for name in resume_settings(cfg)}
    settings["processes"] = int(os.environ.get("WORLD_SIZE", 1))
    return settings


def _read_settings(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / RUN_FILE).read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _holds_a_run(run_dir: Path) -> list[str]:
    """What in `run_dir` a new run would destroy or mix into: results, checkpoints, anything not
    ours. A folder holding only a lock, run.json or leftovers of a failed save holds nothing."""
    if not run_dir.is_dir():
        return []
    found = []
    for entry in sorted(run_dir.iterdir()):
        if entry.name in (RUN_FILE, LOCK_FILE) + LEFTOVERS or entry.name.endswith(".tmp") or entry.name.startswith(".write-test-"):
            continue
        if entry.name == "checkpoints" and entry.is_dir() and not any(entry.iterdir()):
            continue
        found.append(entry.name + ("/" if entry.is_dir() else ""))
    return found


def _lock_owner(run_dir: Path) -> int | None:
    """The live process (not this one) holding `run_dir`'s lock, or None."""
    path = run_dir / LOCK_FILE
    if str(run_dir) in _held or not path.is_file():
        return None
    try:
        pid = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None  # nobody holds it: a lock left by a process that died
        except BlockingIOError:
            return pid or -1
        except OSError:
            pass  # a file system without flock: fall back to the process id
        finally:
            os.close(fd)
    return pid if pid and pid != os.getpid() and _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _written_by_train(run_dir: Path) -> bool:
    """Whether `run_dir/run.json` is the record `prepare_run_dir` writes."""
    try:
        return isinstance(json.loads((run_dir / RUN_FILE).read_text()).get("settings"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _is_export(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / EXPORT_MARKER).is_file()


def holds_runs(folder: Path) -> list[str]:
    """The run folders directly inside `folder` (each with its run.json)."""
    try:
        return sorted(p.parent.name for p in folder.glob(f"*/{RUN_FILE}"))
    except OSError:
        return []


def check_replaceable(path: Path, *, marker: str, flag: str, protected: tuple[Path, ...] = ()) -> None:
    """Refuse to remove `path` unless the package wrote it (it holds `marker`) and removing it
    takes nothing else with it: not the current directory or a folder above it, not a
    `protected` path (the run an export reads, its base model) or a folder holding one, not a
    folder holding run folders. A file where a folder is expected is said so."""
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link: {flag} replaces only folders it wrote; choose another one.")
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a folder: choose another {flag}.")
    resolved, here = path.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UserError(f"{path} holds the current directory: {flag} never removes it; choose another {flag}.")
    for keep in protected:
        kept = Path(keep).expanduser().resolve()
        if resolved == kept or resolved in kept.parents:
            raise UserError(f"{path} holds {keep}, which this command reads: choose another {flag}.")
    if (path / RUN_FILE).is_file():
        raise UserError(f"{path} is a run folder: {flag} never replaces a run; choose another {flag}.")
    runs = holds_runs(path)
    if runs:
        raise UserError(f"{path} holds run folders ({', '.join(runs[:3])}{', ...' if len(runs) > 3 else ''}): "
                        f"--overwrite never removes a run's parent; choose another {flag}.")
    if not (path / marker).is_file():
        raise UserError(f"{path} was not written by this command (it has no {marker}), so --overwrite leaves it alone: "
                        f"choose another {flag}, or move it away yourself.")


def remove_written(path: Path, *, marker: str, flag: str, protected: tuple[Path, ...] = ()) -> None:
    """`check_replaceable`, then remove `path`."""
    check_replaceable(path, marker=marker, flag=flag, protected=protected)
    if path.exists():
        shutil.rmtree(path)


def check_run_dir(cfg) -> str:
    """Whether a run with `cfg` may start in its folder, without touching it: 'new', 'resume' or
    'overwrite'; else a UserError that says what is there and what to do."""
    run_dir = run_dir_for(cfg)
    owner = _lock_owner(run_dir)
    if owner:
        who = f"process {owner}" if owner > 0 else "another process"
        raise UserError(f"Run folder {run_dir} is in use by {who}: wait for it to finish, or choose another --run_name.")
    held = _holds_a_run(run_dir)
    if cfg.overwrite:
        check_overwrite(run_dir, held)
        return "overwrite"
    recorded = _read_settings(run_dir)
    if cfg.resume:
        if not held and recorded is None:
            return "new"
        if recorded is None:
            raise UserError(
                f"Run folder {run_dir} records no settings ({RUN_FILE} missing or unreadable), so it cannot be continued safely: "
                "add --overwrite true to start it over, or choose another --run_name."
            )
        wanted = recorded_settings(cfg)
        # a setting the recording lacks (added to the tool since) counts as its default
        default = {f.name: f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
                   for f in fields(cfg) if f.default is not MISSING or f.default_factory is not MISSING}
        differ = [f"{k} {recorded.get(k, default.get(k))!r} (now {wanted[k]!r})" for k in wanted
                  if _norm(recorded.get(k, default.get(k))) != _norm(wanted[k])]
        if differ:
            raise UserError(
                f"Run folder {run_dir} was started with other settings: {', '.join(differ)}. To continue it, give its settings; "
                "to start it over, add --overwrite true; or choose another --run_name."
            )
        if (run_dir / "metrics.json").is_file():  # written last: the run finished
            raise UserError(
                f"Run folder {run_dir} holds a finished run (metrics.json): there is nothing to resume; "
                "add --overwrite true to train it again, or choose another --run_name."
            )
        return "resume"
    if held:
        raise UserError(
            f"Run folder {run_dir} already holds a run ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}): "
            "add --resume true to continue it, --overwrite true to replace it, or choose another --run_name."
        )
    return "new"


def check_overwrite(run_dir: Path, held: list[str]) -> None:
    """`--overwrite true` replaces a run folder only where train wrote it (its run.json), never
    the current directory, a folder above it, or a folder holding other run folders."""
    if not run_dir.exists():
        return
    here = Path.cwd().resolve()
    if run_dir.resolve() == here or run_dir.resolve() in here.parents:
        raise UserError(f"Run folder {run_dir} holds the current directory: --overwrite never removes it; choose another --run_name.")
    runs = holds_runs(run_dir)
    if runs:
        raise UserError(f"{run_dir} holds run folders ({', '.join(runs[:3])}): it is a results folder, not a run; "
                        "give it as --output_dir and choose a --run_name inside it.")
    if held and not _written_by_train(run_dir):
        raise UserError(f"{run_dir} holds files train did not write ({', '.join(held[:4])}; no {RUN_FILE}), so --overwrite "
                        "leaves them alone: choose another --run_name, or move them away yourself.")


def _norm(value):
    """JSON's view of a setting (tuples are lists, ints and equal floats compare equal)."""
    return json.loads(json.dumps(value))


def _lock(run_dir: Path) -> None:
    """Hold `run_dir/.lock` for this process (advisory flock, released by the kernel when the
    process dies, so a lock left by a killed run is simply taken over)."""
    key = str(run_dir)
    if key in _held:  # this process's earlier run of the same folder (a notebook cell run again)
        unlock(run_dir)
    path = run_dir / LOCK_FILE
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                owner = _lock_owner(run_dir)
                raise UserError(
                    f"Run folder {run_dir} is in use by {f'process {owner}' if owner and owner > 0 else 'another process'}: "
                    "wait for it to finish, or choose another --run_name."
                ) from None
            except OSError:  # no flock on this file system: the process id in the file names the holder
                owner = _lock_owner(run_dir)
                if owner:
                    os.close(fd)
                    raise UserError(f"Run folder {run_dir} is in use by process {owner}: wait for it to finish, or choose another --run_name.") from None
            try:
                if os.fstat(fd).st_ino != os.stat(path).st_ino:  # unlinked by its previous holder meanwhile
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        if not _held:
            atexit.register(_unlock_all)  # a run that ends in an error leaves no lock file behind
        _held[key] = fd
        return
    raise UserError(f"Could not lock run folder {run_dir}: another run keeps taking it; choose another --run_name.")


def unlock(run_dir: Path) -> None:
    """Let go of `run_dir`'s lock (the run is over) and remove the lock file."""
    fd = _held.pop(str(run_dir), None)
    if fd is None:
        return
    try:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
    except OSError:
        pass
    os.close(fd)


def _unlock_all() -> None:
    for key in list(_held):
        unlock(Path(key))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prepare_run_dir(cfg, *, main: bool = True) -> Path:
    """Claim `<output_dir>/<run name>` for a run with `cfg`: create it, lock it, decide (under the
    lock) whether the run is new, continues or replaces what is there, clear what would be stale,
    and record the settings in run.json. Other ranks of a launch only get the path: rank 0 owns
    the folder."""
    run_dir = run_dir_for(cfg)
    if not main:
        return run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _lock(run_dir)
    except OSError as error:
        raise UserError(f"Cannot write to {run_dir} ({error.strerror}): choose another --output_dir.") from None
    try:
        mode = check_run_dir(cfg)
        stale = [*OUTPUTS, "checkpoints"] if mode == "overwrite" else ["metrics.json", "generations.json"] if mode == "resume" else [*OUTPUTS]
        if mode == "overwrite":  # the exports of the run being replaced would describe another model
            stale += ["export.json", *(p.name for p in run_dir.iterdir() if _is_export(p))]
        # the figures of an earlier run go first, so that they never sit beside a newer adapter
        for name in (*stale, *LEFTOVERS):
            _remove(run_dir / name)
        for tmp in run_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        if mode != "resume":
            (run_dir / RUN_FILE).unlink(missing_ok=True)
        write_json(run_dir / RUN_FILE, {"run": cfg.name, "settings": recorded_settings(cfg), "started_as": mode})
    except OSError as error:
        unlock(run_dir)
        raise UserError(f"Cannot write to {run_dir} ({error.strerror}): choose another --output_dir.") from None
    except UserError:
        unlock(run_dir)
        raise
    return run_dir


def write_json(path: Path, data) -> None:
    """Write-then-rename, so a crash or a full disk never leaves a half-written file under the real name."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserError(f"Could not write {path} ({error.strerror}): free disk space or choose another --output_dir.") from None


def save_adapter(model, path: Path, *, tokenizer=None) -> None:
    """Save to a sibling folder, then swap it in: a failed save (a full disk included) leaves the
    previous adapter, or none, and no partial folder."""
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    except WRITE_ERRORS as error:
        reason = _reason(error, path)  # before the partial files go: they are what filled the disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"Could not save {path} ({reason}): free disk space or choose another --output_dir; "
            "nothing was written under that name."
        ) from None
    replace_folder(tmp, path)


def replace_folder(new: Path, path: Path) -> None:
    """Put the folder `new` under the name `path`, the old one moved aside first: at every moment
    `path` is either the old whole folder or the new whole folder."""
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _reason(error: BaseException, where: Path) -> str:
    """A write error in a few words: the OS's own words where there are some. torch's zip writer
    and safetensors' Rust writer report a full disk in their own words, so ask the disk."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    try:
        full = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free < 2**20
    except (OSError, StopIteration):
        full = False
    if full or "No space left" in text or "StorageFull" in text or f"os error {errno.ENOSPC}" in text:
        return "No space left on device"
    return f"{type(error).__name__}: {text.splitlines()[0][:160] if text else ''}"


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be loaded (header unreadable, file shorter or longer than
    its header says), or None. safetensors checks this itself when it opens a file; no tensor
    data is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (OSError, SafetensorError, ValueError) as error:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return None


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip whose directory is at its end: a truncated file has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as error:
        return str(error) or type(error).__name__
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from, or None. The Trainer writes
    trainer_state.json last, so a folder killed mid-save lacks it; a full disk can also leave
    truncated weights or optimizer files before it."""
    try:
        return _checkpoint_problem(path)
    except OSError as error:  # removed or unreadable while being looked at
        return error.strerror or type(error).__name__


def _checkpoint_problem(path: Path) -> str | None:
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json missing or unreadable"
    names = {p.name for p in path.iterdir()}
    if not any(n.startswith("optimizer") for n in names):
        return "no optimizer state"
    if not any(n.startswith("scheduler") for n in names):
        return "no scheduler state"
    weights = [p for p in path.glob("*.safetensors")]
    if not weights and not any(n.endswith(".bin") and "model" in n for n in names):
        return "no weights"
    for file in weights:
        problem = safetensors_problem(file)
        if problem:
            return f"{file.name}: {problem}"
    for file in path.iterdir():
        if file.suffix in (".pt", ".pth", ".bin") and file.is_file():
            problem = _torch_file_problem(file)
            if problem:
                return f"{file.name}: {problem}"
    return None


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = [(int(p.name.rsplit("-", 1)[1]), p) for p in folder.glob("checkpoint-*") if p.name.rsplit("-", 1)[1].isdigit()]
    return sorted(found, reverse=True)


def newest_checkpoint(folder: Path, *, before: int | None = None) -> str | None:
    """The newest checkpoint that can be resumed from: complete (the Trainer finished writing
    it) and undamaged (its weights, optimizer and scheduler files readable), and, with `before`,
    from a step before that one. (Resumed from its last step, the Trainer trains one step more
    than asked, so a run killed after its last checkpoint resumes from the one before.)"""
    for step, path in _checkpoints(Path(folder)):
        if before is not None and step >= before:
            continue
        if path.is_dir() and checkpoint_problem(path) is None:
            return str(path)
    return None


def remove_damaged_checkpoints(folder: Path) -> list[str]:
    """Delete the checkpoints a resume would skip, so the Trainer never keeps a damaged one as
    its newest when it rotates old checkpoints away. Returns their names."""
    removed = []
    for _, path in _checkpoints(Path(folder)):
        if path.is_dir() and checkpoint_problem(path) is not None:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def guard_checkpoint_writes(trainer, *, main: bool = True) -> None:
    """Make a failed checkpoint write (a full disk inside the Trainer's save) one line that says
    what is kept, and remove the half-written folder so that only complete checkpoints remain."""
    save = trainer._save_checkpoint  # the one method through which the Trainer writes checkpoints

    def save_or_explain(model, trial, *args, **kwargs):
        name = f"checkpoint-{trainer.state.global_step}"
        folder = Path(trainer.args.output_dir)
        try:
            return save(model, trial, *args, **kwargs)
        except WRITE_ERRORS as error:
            reason = _reason(error, folder)
            if main:
                shutil.rmtree(folder / name, ignore_errors=True)
            kept = newest_checkpoint(folder)
            then = (f"{Path(kept).name} is kept: free space, then run the same command with --resume true"
                    if kept else "no earlier checkpoint is kept: free space, then run the command again")
            raise UserError(
                f"Could not write {folder / name} ({reason}): {then}, or choose another --output_dir."
            ) from None

    trainer._save_checkpoint = save_or_explain
