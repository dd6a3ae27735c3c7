"""Ship a run: merge its LoRA adapter into the base, write GGUF, and prove each export is the
model that was trained.

`export(cfg)` (`python -m gemma_qlora export --run runs/4bit ...`) writes one of:

    merged/   a plain safetensors checkpoint (bf16, or fp32 where bf16 would round the
              adapter's update away) with its tokenizer and generation config:
              AutoModelForCausalLM loads it with no PEFT
    gguf/     model-f16.gguf and model-q8_0.gguf, written with the `gguf` package the way
              llama.cpp's converter writes Gemma, tokenizer included

Either carries a chat template, and stops at `<end_of_turn>` as well as EOS, only when the run
trained on chat (messages): clients switch to chat whenever a template is present.

It then verifies the export, every time: each exported model is loaded back the way a user
would load it (the GGUF through transformers' GGUF loader), scored on the run's held-out split
with the training's own evaluation, and its greedy continuations compared with the adapter
model's. The figures go to `<run>/export.json`. Each file is judged on its own against the
limits in `MAX_LOSS_RISE` (only a rise of the loss fails): one that fails is withheld, moved
aside to `<out>.rejected` while the files that passed stay in `<out>`, and the command says
which and exits 2.

Everything is written to `<out>.partial` and renamed only once verified, so a full disk or a
crash never leaves a model under the real name.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from safetensors import SafetensorError

from gemma_qlora.errors import UserError
from gemma_qlora.export.gguf import add_tokenizer, write_gguf
from gemma_qlora.export.merge import choose_save_dtype, file_sizes, merged_model, update_survival, write_export
from gemma_qlora.export.settings import (
    BASES,
    BF16_MIN_SURVIVING,
    EXPORT_RECORD,
    GGUF_ARCHS,
    GGUF_TYPES,
    INTO,
    MAX_LOSS_RISE,
    ORIGINAL_BASE_ALLOWANCE,
    REFERENCE_NAMES,
    SAVE_DTYPES,
    ExportConfig,
)
from gemma_qlora.export.verify import (
    adapter_reference,
    agreement,
    agreement_prompts,
    config_mismatches,
    held_out_texts,
    judge,
    loss_limit,
    verify_all,
)
from gemma_qlora.formats import encoded_examples, format_of
from gemma_qlora.model import base_fingerprint, looks_like_path, resolve_model
from gemma_qlora.quant import detect_precision, method_of
from gemma_qlora.rundir import EXPORT_MARKER, check_replaceable, remove_written, write_json
from gemma_qlora.trained import check_base, load_adapter_model, load_exported, read_run, release_memory

__all__ = [  # the command, and what its parts export for tests, the bench and other modules
    "BASES", "BF16_MIN_SURVIVING", "EXPORT_RECORD", "GGUF_ARCHS", "GGUF_TYPES", "INTO", "MAX_LOSS_RISE",
    "ORIGINAL_BASE_ALLOWANCE", "REFERENCE_NAMES", "SAVE_DTYPES", "ExportConfig", "adapter_reference", "add_tokenizer",
    "agreement", "agreement_prompts", "base_fingerprint", "check_base", "choose_save_dtype", "config_mismatches",
    "export", "file_sizes", "held_out_texts", "judge", "load_adapter_model", "load_exported", "loss_limit",
    "merged_model", "output_folder", "read_run", "update_survival", "verify_all", "write_export", "write_gguf",
]


def _disk_error(out: Path, error: Exception) -> UserError:
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
    return UserError(f"Could not write the export to {out} ({reason}): free disk space or choose another --out.")

def output_folder(cfg: ExportConfig, run_dir: Path, *, base: str | None = None) -> Path:
    """Where the export goes, refused before anything loads if writing there could remove what
    export did not write: `--overwrite` replaces only an earlier export (its `EXPORT_MARKER`),
    never the run, its base, a folder holding either or holding runs, or the current directory;
    the same holds for the `.partial` and `.rejected` folders beside it."""
    out = Path(cfg.out).expanduser() if cfg.out else run_dir / cfg.into
    protected = (run_dir,) + ((Path(base),) if base else ())
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: choose another --out.")
    if out.exists() and not cfg.overwrite:
        raise UserError(f"Output folder {out} already exists: choose another --out, or add --overwrite true to replace it.")
    check_replaceable(out, marker=EXPORT_MARKER, flag="--out", protected=protected)
    out = Path(os.path.abspath(out)) if not out.name else out  # `.` or a path ending in `..` has no name to add to
    for folder in (out.with_name(out.name + ".partial"), out.with_name(out.name + ".rejected")):
        check_replaceable(folder, marker=EXPORT_MARKER, flag="--out", protected=protected)
    return out

def record(run_dir: Path, out: Path, entry: dict) -> None:
    """Add this export's figures to `<run>/export.json`, keyed by its output folder."""
    path = run_dir / EXPORT_RECORD
    try:
        exports = json.loads(path.read_text())
    except (OSError, ValueError):
        exports = {}
    exports[str(out)] = entry
    write_json(path, exports)

def _finish(partial: Path, out: Path, *, passed: bool) -> Path:
    """Move the verified folder under its real name (or a rejected one aside)."""
    target = out if passed else out.with_name(out.name + ".rejected")
    remove_written(target, marker=EXPORT_MARKER, flag="--out")
    os.replace(partial, target)
    return target

def place(partial: Path, out: Path, checked: list[dict], files) -> tuple[Path | None, Path | None]:
    """Passing files under `out`, failing ones aside in `<out>.rejected`; returns both folders
    (None where nothing went). A merged checkpoint is one file: it goes one way or the other."""
    failed = [path for (kind, path, _), e in zip(files, checked) if not e["passed"]]
    if not failed:
        return _finish(partial, out, passed=True), None
    if len(failed) == len(checked):
        return None, _finish(partial, out, passed=False)
    withheld = out.with_name(out.name + ".withheld.partial")
    remove_written(withheld, marker=EXPORT_MARKER, flag="--out")
    withheld.mkdir()
    shutil.copy2(partial / EXPORT_MARKER, withheld / EXPORT_MARKER)  # so that a later --overwrite may replace it
    for path in failed:
        os.replace(path, withheld / path.name)
    return _finish(partial, out, passed=True), _finish(withheld, out, passed=False)

def refusal(checked: list[dict], *, kept: Path | None, rejected: Path, reference: dict, reference_name: str,
            record_path: Path) -> UserError:
    """One line: which files were withheld and why, where they are, and what was kept."""
    reasons = []
    for bad in (e for e in checked if not e["passed"]):
        why = (f"its settings came back different ({'; '.join(bad['config_mismatches'])})" if bad.get("config_mismatches")
               else f"held-out loss {bad['eval_loss']:.4f} vs {reference['eval_loss']:.4f} for {reference_name}, "
                    f"{bad['loss_drift']:+.2%} where the limit is +{bad['max_loss_drift']:.2%}")
        reasons.append(f"{bad['file']}: {why}")
    good = [e["file"] for e in checked if e["passed"]]
    kept_line = f" Kept, verified: {', '.join(good)} in {kept}." if kept else ""
    return UserError(f"Withheld, as not matching the trained model: {'; '.join(reasons)}; moved to {rejected}.{kept_line} "
                     f"Figures in {record_path}.")

def export(cfg: ExportConfig) -> dict:
    """Export one run, verify the export, record the figures; see the module docstring."""

    run_dir = Path(cfg.run).expanduser()
    train_cfg, metrics = read_run(run_dir)
    out = output_folder(cfg, run_dir, base=resolve_model(train_cfg.model) if looks_like_path(train_cfg.model) else None)
    model_type = metrics.get("model_type")
    if cfg.into == "gguf" and model_type not in GGUF_ARCHS:
        raise UserError(f"GGUF export supports Gemma 2 and Gemma 3 (transformers reads no other Gemma GGUF back to verify it), "
                        f"not {model_type!r}: export --into merged.")
    base_check = check_base(train_cfg, metrics)
    method = method_of(train_cfg)
    base = cfg.base if method.quantized else "original"
    precision = detect_precision(force_fp16=train_cfg.force_fp16)
    data, _, run_tokenizer = encoded_examples(train_cfg)
    chat = format_of(data["test"]) == "messages"
    prompts = agreement_prompts(data, run_tokenizer, cfg.agreement_prompts)

    reference = adapter_reference(train_cfg, run_dir, precision, data=data, prompts=prompts)
    reference["recorded_eval_loss"] = metrics.get("eval_loss")
    dense = None
    if method.rounds_activations:
        # LLM.int8 also rounds every activation to 8 bits at inference, which no checkpoint can
        # carry: an 8-bit run's exports are held to the trained weights, computed plainly, and
        # compared with the int8 adapter model (what `generate --run` shows) as well
        dense = adapter_reference(train_cfg, run_dir, precision, data=data, prompts=prompts, dequantized=True)
        dense["int8_activation_gap"] = (reference["eval_loss"] - dense["eval_loss"]) / dense["eval_loss"]
        into = "the dequantized int8 weights" if base == "dequantized" else "the original 16-bit weights"
        print(f"8-bit run: this export is the adapter merged into {into}, computed without LLM.int8's activation "
              "rounding; `generate --run` shows the int8 adapter model, so some continuations differ (both agreements "
              "follow).", flush=True)
    yardstick = dense or reference
    reference_name = REFERENCE_NAMES[dense is not None]

    partial = out.with_name(out.name + ".partial")
    remove_written(partial, marker=EXPORT_MARKER, flag="--out")  # an earlier export's, cut short
    t0 = time.perf_counter()
    try:
        partial.mkdir(parents=True)
        (partial / EXPORT_MARKER).write_text(json.dumps({"run": str(run_dir.resolve()), "into": cfg.into}))
        files, config, tokenizer, merge_seconds, kept = write_export(
            cfg, train_cfg, run_dir, partial, precision=precision, base=base, chat=chat)
    except (OSError, SafetensorError) as error:  # a full disk, mostly: nothing stays behind
        shutil.rmtree(partial, ignore_errors=True)
        raise _disk_error(out, error) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    release_memory()
    export_seconds = time.perf_counter() - t0
    context = dict(cfg=cfg, train_cfg=train_cfg, data=data, precision=precision, prompts=prompts, base=base,
                   config=config, tokenizer=tokenizer, texts=held_out_texts(data, tokenizer),
                   int8=reference if dense else None, reference_name=reference_name)
    t0 = time.perf_counter()
    try:
        checked = verify_all(files, reference=yardstick, context=context, out=out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    verify_seconds = time.perf_counter() - t0

    kept_folder, rejected = place(partial, out, checked, files)
    for entry in checked:
        folder = kept_folder if entry["passed"] else rejected
        entry["path"] = str(folder if entry["model"] == "merged" else folder / entry["file"])
    passed = rejected is None
    result = {
        "into": cfg.into, "base": base, "out": str(kept_folder or rejected), "passed": passed, "base_check": base_check,
        "withheld": [e["file"] for e in checked if not e["passed"]], "rejected_out": str(rejected) if rejected else None,
        "chat_template": chat, "device": precision.device, "compute_dtype": precision.name,
        "save_dtype": kept.get("save_dtype"), "save_dtype_reason": kept.get("save_dtype_reason"),
        "update_survival": kept["update_survival"],
        "merge_seconds": merge_seconds, "export_seconds": export_seconds, "verify_seconds": verify_seconds,
        "prompts": prompts, "adapter": reference, "adapter_dequantized": dense,
        "yardstick": "adapter_dequantized" if dense else "adapter", "exports": checked,
    }
    record(run_dir, out, result)
    if not passed:
        raise refusal(checked, kept=kept_folder, rejected=rejected, reference=yardstick, reference_name=reference_name,
                      record_path=run_dir / EXPORT_RECORD)
    return result
