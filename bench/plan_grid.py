"""Predicted vs measured GPU memory over a grid of short real trainings: the memory planner's check.

    python bench/plan_grid.py --out results/plan-grid            # the whole grid, about 8 minutes on an H200
    python bench/plan_grid.py --out /tmp/g --quick                # three points per model (smoke test)
    python bench/plan_grid.py --out results/plan-grid --replot    # table and plot again from plan_grid.json

Models: the Gemma-2B shape with random weights (built once on the GPU, cached) and the real Gemma
3 270M (`--model-270m embedded`, the default; a random 270M shape stands in where the embedded
model is not installed, and the table says so). Each model runs in its own process (this parent
never touches CUDA); it loads the model once per bit width through the package (load_model,
attach_lora), then trains every point for two optimizer steps with the package's make_trainer,
the allocator's peak reset before each point and its cache emptied after. The package's
MemoryRecorder samples NVML. A third process repeats a few points in fp16 under a 15 GiB cap (T4
emulation: the cap binds the allocator, so out-of-memory there is compared with the planner's
fit). A time budget is shared out between the processes, the most telling points first; points
left when a process's share runs out are marked `skipped`.

Writes into --out (4 files): plan_grid.json (every point: settings, measured, predicted, errors),
plan_grid.md (the table and the points outside +-10 % / +-15 %), plan_grid.png (predicted vs
measured, allocator and NVML), plan_grid.log (the workers' output).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gemma_qlora.plan import GIB, GPU, GPUS, PlanInputs, build_plan, load_shape, match_gpu  # reads config.json only: no torch, no CUDA

ROOT = Path(__file__).resolve().parents[1]

# (micro-batch, sequence length, gradient checkpointing), most telling first: the default, then
# one setting moved at a time, then the corners.
POINTS = [(8, 512, True), (16, 512, True), (8, 1024, True), (1, 512, True), (8, 512, False), (16, 1024, True),
          (4, 512, True), (8, 256, True), (1, 256, True), (4, 1024, True), (1, 512, False), (4, 1024, False)]
T4_POINTS = {4: [(8, 512, True), (16, 512, True), (16, 1024, True)], 8: [(8, 512, True), (16, 512, True)],
             16: [(8, 512, True), (8, 512, False)]}
QUICK = [(8, 512, True), (1, 256, True), (8, 512, False)]
T4_CAP_GIB = 15.0

SHAPES = {  # random-weight shapes: transformers config class and fields
    "2b": ("GemmaConfig", dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                               num_key_value_heads=1, head_dim=256, vocab_size=256000, max_position_embeddings=8192)),
    "tiny": ("GemmaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=1, head_dim=16, vocab_size=8000, max_position_embeddings=2048)),
    "270m": ("Gemma3TextConfig", dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                                      num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512,
                                      max_position_embeddings=32768)),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_random(shape: str, *, folder: Path) -> None:
    """A random-weight checkpoint of `shape`, made on the GPU (seconds, not minutes on the CPU),
    saved in bf16 with the 8,000-token quotes tokenizer; in this process, which then exits."""
    # torch and the model code only in the child processes: the parent never touches CUDA
    import torch
    import transformers

    from gemma_qlora.tiny import build_tokenizer

    config_class, fields = SHAPES[shape]
    config = getattr(transformers, config_class)(**fields, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    build_tokenizer(vocab_size=8000, examples=None).save_pretrained(partial)
    os.replace(partial, folder)


def model_folder(kind: str, *, spec: str, cache: Path, logfile) -> tuple[str, str]:
    """(folder, label) of the model: 2b -> the random shape; 270m -> the embedded Gemma 3 270M
    (spec 'embedded'), a folder, or 'random'."""
    if kind == "270m" and spec != "random":
        if spec != "embedded":
            return spec, f"Gemma 3 270M ({spec})"
        try:
            from gemma_qlora.embedded import embedded_model_dir

            return str(embedded_model_dir()), "Gemma 3 270M (real weights)"
        except Exception as error:  # not installed here: the random shape measures the same memory, int8 outliers aside
            log(f"embedded Gemma 3 270M unavailable ({error}); using the random 270M shape")
    folder = cache / f"{kind}-random"
    if not (folder / "config.json").is_file():
        log(f"building the random {kind} shape in {folder} ...")
        t0 = time.time()
        subprocess.run([sys.executable, __file__, "--build", kind, "--folder", str(folder)], check=True, stdout=logfile, stderr=logfile)
        log(f"built in {time.time() - t0:.0f} s")
    return str(folder), f"{kind} shape (random weights)"


# ---------------------------------------------------------------------------------------------
# A worker: one model, its bit widths in turn, every point of each.
# ---------------------------------------------------------------------------------------------


def run_worker(job: dict) -> None:
    """Measure `job["points"]` of one model; one JSON line per point and per load in job["results"]."""
    # torch and the model code only in the worker process: the parent never touches CUDA
    import gc
    from dataclasses import replace

    import torch

    from gemma_qlora.config import TrainConfig
    from gemma_qlora.formats import load_examples
    from gemma_qlora.lora import attach_lora
    from gemma_qlora.memory import MemoryRecorder
    from gemma_qlora.model import load_model
    from gemma_qlora.quant import cap_gpu_memory, detect_precision
    from gemma_qlora.trainer import make_trainer

    out = open(job["results"], "a")

    def emit(record: dict) -> None:
        out.write(json.dumps({**record, "group": job["group"], "model": job["label"], "folder": job["folder"]}) + "\n")
        out.flush()

    fp16, cap = job["fp16"], job["cap_gib"]
    precision = detect_precision(force_fp16=fp16)
    if cap:
        cap_gpu_memory(cap)
    recorder = MemoryRecorder(interval_s=0.05)
    work = Path(job["work"])
    base = TrainConfig(model=job["folder"], data="embedded", steps=2, eval_size=8, eval_steps=1000, logging_steps=1,
                       warmup_steps=0, max_train_examples=2500, force_fp16=fp16, output_dir=str(work), report_to="none")
    data = load_examples(TrainConfig(data="embedded", eval_size=8, max_train_examples=2500))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        emit({"kind": "device", "gpu": props.name, "total_gib": props.total_memory / GIB, "torch": torch.__version__,
              "cuda": torch.version.cuda})
    else:  # the plumbing alone: CPU figures are the process's RSS, not comparable with the planner's
        emit({"kind": "device", "gpu": "CPU (no GPU: figures are RSS)", "total_gib": None, "torch": torch.__version__, "cuda": None})
    allocated = torch.cuda.memory_allocated if torch.cuda.is_available() else (lambda: 0)
    empty_cache = torch.cuda.empty_cache if torch.cuda.is_available() else (lambda: None)
    bits_list = list(job["points"])
    for k, bits in enumerate(bits_list):
        deadline = time.time() + (job["deadline"] - time.time()) / (len(bits_list) - k)
        if time.time() > job["deadline"] - 10:
            for b, s, ckpt in job["points"][bits]:
                emit({"kind": "point", "bits": bits, "batch": b, "length": s, "ckpt": ckpt, "status": "skipped"})
            continue
        cfg = replace(base, bits=bits)
        before = allocated() / GIB
        with recorder.phase(f"load-{bits}") as load:
            model, tokenizer = load_model(cfg, precision)
        emit({"kind": "load", "bits": bits, "allocated_before_gib": before, "allocated_gib": load.end_allocated_gib,
              "nvml_gib": load.end_sampled_gib})
        model = attach_lora(model, cfg)
        for b, s, ckpt in job["points"][bits]:
            point = {"kind": "point", "bits": bits, "batch": b, "length": s, "ckpt": ckpt}
            if time.time() > deadline:
                emit({**point, "status": "skipped"})
                continue
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            else:
                model.gradient_checkpointing_disable()
            pcfg = replace(cfg, batch_size=b, max_seq_length=s, gradient_checkpointing=ckpt)
            t0 = time.time()
            trainer = make_trainer(pcfg, model, tokenizer, data, precision=precision, output_dir=work / "checkpoints")
            point["setup_seconds"] = time.time() - t0
            collator = trainer.data_collator
            point["layout"] = "flat" if getattr(collator, "padding_free", False) else "rows"
            point.update(lora_dropout=pcfg.lora_dropout, offload_activations=pcfg.offload_activations)
            gc.collect()
            empty_cache()
            t0 = time.time()
            status = "ok"
            with recorder.phase(f"{bits}-{b}x{s}-{'ckpt' if ckpt else 'nockpt'}") as phase:
                try:
                    trainer.train()
                except torch.OutOfMemoryError:
                    status = "oom"
            steps = max(1, trainer.state.global_step)
            emit({**point, "status": status, "seconds": time.time() - t0, "steps": trainer.state.global_step,
                  "tokens_per_step": int(trainer.state.num_input_tokens_seen) / steps,
                  "allocated_peak_gib": phase.peak_allocated_gib, "reserved_peak_gib": phase.peak_reserved_gib,
                  "nvml_peak_gib": phase.peak_sampled_gib, "nvml_end_gib": phase.end_sampled_gib})
            del trainer, collator
            gc.collect()
            empty_cache()
        del model, tokenizer
        gc.collect()
        empty_cache()
    recorder.stop()


# ---------------------------------------------------------------------------------------------
# The parent: models, workers, predictions, report.
# ---------------------------------------------------------------------------------------------


# what a point recorded before it stored these settings ran at (the defaults of that time)
EARLIER_SETTINGS = {"layout": "flat", "lora_dropout": 0.05, "offload_activations": False}


def grid_gpu(records: list[dict]) -> GPU:
    """The GPU the grid ran on, as the planner knows it (by its exact name), else planned from its
    memory; the H200 for a run without one (the plumbing alone)."""
    device = next((r for r in records if r["kind"] == "device"), {})
    if not device.get("total_gib"):
        return GPUS["h200"]
    return match_gpu(device["gpu"], total_gib=device["total_gib"]) or GPU(device["gpu"], device["total_gib"])


def predict(record: dict, *, folder: str, fp16: bool, cap: float | None, gpu: GPU) -> dict:
    """The planner's figures for one measured point, at the settings it ran at, on the GPU it ran on."""
    shape = load_shape(folder)
    record = {**EARLIER_SETTINGS, **record}
    inputs = PlanInputs(shape, bits=record["bits"], batch_size=record["batch"], max_seq_length=record["length"],
                        gradient_checkpointing=record["ckpt"], dtype="float16" if fp16 else "bfloat16",
                        packing_layout=record["layout"], lora_dropout=record["lora_dropout"],
                        offload_activations=record["offload_activations"])
    p = build_plan(inputs, gpu=gpu)
    result = {"pred_allocated_gib": p.peak_allocated_gib, "pred_reserved_gib": p.peak_reserved_gib,
              "pred_nvml_gib": p.peak_nvml_gib, "pred_phase": p.peak_phase}
    if cap:  # the cap binds the allocator only: the context lies outside it
        result["pred_fits_cap"] = p.need_gib(gpu) - gpu.context_gib[1] <= cap
    return result


def predict_load(record: dict, *, folder: str, fp16: bool, gpu: GPU) -> dict:
    p = build_plan(PlanInputs(load_shape(folder), bits=record["bits"], dtype="float16" if fp16 else "bfloat16"), gpu=gpu)
    return {"pred_allocated_gib": p.after_load_allocated_gib, "pred_nvml_gib": p.after_load_nvml_gib}


def relative_error(predicted: float | None, *, measured: float | None) -> float | None:
    return None if not predicted or not measured else predicted / measured - 1


def build_report(records: list[dict], *, settings: dict) -> dict:
    points = [r for r in records if r["kind"] == "point"]
    device = next((r for r in records if r["kind"] == "device"), {})
    gpu = device.get("cuda") is not None  # on CPU the recorder reads RSS: nothing to compare
    for r in points:
        if r["status"] == "ok" and gpu:
            r["err_allocated"] = relative_error(r["pred_allocated_gib"], measured=r["allocated_peak_gib"])
            r["err_nvml"] = relative_error(r["pred_nvml_gib"], measured=r["nvml_peak_gib"])
    loads = [r for r in records if r["kind"] == "load"]
    for r in loads if gpu else []:
        r["err_allocated"] = relative_error(r["pred_allocated_gib"], measured=r["allocated_gib"])
        r["err_nvml"] = relative_error(r["pred_nvml_gib"], measured=r["nvml_gib"])
    ok = [r for r in points if r["status"] == "ok" and r.get("err_allocated") is not None and r.get("err_nvml") is not None]
    summary = {
        "points": len(points), "measured": len(ok), "oom": sum(r["status"] == "oom" for r in points),
        "skipped": sum(r["status"] == "skipped" for r in points),
        "within_10pct_allocated": sum(abs(r["err_allocated"]) <= 0.10 for r in ok),
        "within_15pct_nvml": sum(abs(r["err_nvml"]) <= 0.15 for r in ok),
        "max_abs_err_allocated": max((abs(r["err_allocated"]) for r in ok), default=None),
        "max_abs_err_nvml": max((abs(r["err_nvml"]) for r in ok), default=None),
        "fit_checks": [{"point": f"{r['bits']}-bit {r['batch']}x{r['length']}", "predicted_fits": r["pred_fits_cap"],
                        "measured": r["status"]} for r in points if "pred_fits_cap" in r and r["status"] != "skipped"],
    }
    return {"settings": settings, "device": device, "summary": summary, "loads": loads, "points": points}


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} %"


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def markdown(report: dict) -> str:
    s, d = report["summary"], report["device"]
    lines = [
        "# Memory planner: predicted vs measured",
        "",
        f"- device: {d.get('gpu', 'n/a')} ({gib(d.get('total_gib'))} GiB), torch {d.get('torch', 'n/a')}, CUDA {d.get('cuda', 'n/a')}",
        f"- {s['measured']} points measured ({s['oom']} out of memory, {s['skipped']} skipped for time) of {s['points']}; "
        f"allocator peak within ±10 %: **{s['within_10pct_allocated']}/{s['measured']}** (largest error {pct(s['max_abs_err_allocated'])}); "
        f"NVML peak within ±15 %: **{s['within_15pct_nvml']}/{s['measured']}** (largest {pct(s['max_abs_err_nvml'])})",
        "- each point: two optimizer steps of the package's recipe (LoRA r=8 on 7 projections, fused AdamW, packed quotes); "
        "bf16 unless marked fp16 (15 GiB allocator cap, T4 emulation)",
        "",
        "| model | bits | dtype | micro-batch × length | ckpt | layout | tokens/step | allocator peak: measured / predicted | error "
        "| NVML peak: measured / predicted | error | peak phase |",
        "|---|--:|---|---|---|---|--:|---|--:|---|--:|---|",
    ]
    for r in report["points"]:
        dtype = "fp16" if r["group"].endswith("fp16") else "bf16"
        head = f"| {r['model']} | {r['bits']} | {dtype} | {r['batch']} × {r['length']} | {'on' if r['ckpt'] else 'off'} | {r.get('layout', '')} |"
        if r["status"] == "skipped":
            lines.append(head + " | skipped (time) | | | | |")
            continue
        fit = f" (predicted {'fits' if r['pred_fits_cap'] else 'out of memory'})" if "pred_fits_cap" in r else ""
        if r["status"] == "oom":
            lines.append(head + f" {r.get('tokens_per_step', 0):,.0f} | **out of memory**{fit} / {gib(r['pred_allocated_gib'])} | | | | {r['pred_phase']} |")
            continue
        lines.append(head + f" {r['tokens_per_step']:,.0f} | {gib(r['allocated_peak_gib'])} / {gib(r['pred_allocated_gib'])}{fit} | "
                     f"{pct(r.get('err_allocated'))} | {gib(r['nvml_peak_gib'])} / {gib(r['pred_nvml_gib'])} | {pct(r.get('err_nvml'))} | {r['pred_phase']} |")
    lines += ["", "After loading:", "", "| model | bits | dtype | allocated: measured / predicted | NVML: measured / predicted |", "|---|--:|---|---|---|"]
    for r in report["loads"]:
        dtype = "fp16" if r["group"].endswith("fp16") else "bf16"
        lines.append(f"| {r['model']} | {r['bits']} | {dtype} | {gib(r['allocated_gib'])} / {gib(r['pred_allocated_gib'])} "
                     f"({pct(r.get('err_allocated'))}) | {gib(r['nvml_gib'])} / {gib(r['pred_nvml_gib'])} ({pct(r.get('err_nvml'))}) |")
    outside = [r for r in report["points"] if r["status"] == "ok" and r.get("err_allocated") is not None
               and (abs(r["err_allocated"]) > 0.10 or abs(r["err_nvml"]) > 0.15)]
    if outside:
        lines += ["", "Outside the target:", ""] + [
            f"- {r['model']} {r['bits']}-bit {r['batch']}×{r['length']} ckpt {'on' if r['ckpt'] else 'off'}: "
            f"allocator {pct(r['err_allocated'])}, NVML {pct(r['err_nvml'])}" for r in outside]
    return "\n".join(lines) + "\n"


def plot(report: dict, *, path: Path) -> None:
    import matplotlib  # only where a plot is drawn: the workers do without

    matplotlib.use("Agg")  # before pyplot is imported: no display on the GPU machine
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    ok = [r for r in report["points"] if r["status"] == "ok" and r.get("err_allocated") is not None]
    if not ok:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    colors = {4: "#1f4e79", 8: "#b5651d", 16: "#4d8b31"}
    for ax, key, band, title in ((axes[0], "allocated", 0.10, "allocator peak"), (axes[1], "nvml", 0.15, "NVML peak")):
        meas = [r[f"{key}_peak_gib"] for r in ok]
        pred = [r[f"pred_{key}_gib"] for r in ok]
        lo, hi = min(meas + pred) * 0.8, max(meas + pred) * 1.25
        xs = [lo, hi]
        ax.plot(xs, xs, color="black", lw=0.8)
        ax.fill_between(xs, [x * (1 - band) for x in xs], [x * (1 + band) for x in xs], color="#dddddd", label=f"±{band:.0%}")
        for r, m, p in zip(ok, meas, pred):
            marker = "o" if "270M" in r["model"] else "s"
            ax.scatter(m, p, color=colors[r["bits"]], marker=marker, s=22, edgecolors="white" if r["ckpt"] else "red", linewidths=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel(f"measured {title}, GiB")
        ax.set_ylabel(f"predicted {title}, GiB")
        ax.set_title(title)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=f"{b}-bit") for b, c in colors.items()]
    handles += [plt.Line2D([], [], color="gray", marker="s", ls="", label="Gemma-2B shape"),
                plt.Line2D([], [], color="gray", marker="o", ls="", label="Gemma 3 270M"),
                plt.Line2D([], [], color="gray", marker="o", ls="", markeredgecolor="red", label="no checkpointing")]
    axes[0].legend(handles=handles, fontsize=8, loc="upper left")
    d = report["device"]
    fig.suptitle(f"Memory planner vs measured training steps on {d.get('gpu', 'GPU')} (torch {d.get('torch', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict, *, out: Path) -> None:
    (out / "plan_grid.json").write_text(json.dumps(report, indent=2))
    (out / "plan_grid.md").write_text(markdown(report))
    plot(report, path=out / "plan_grid.png")


def repredict(report: dict, *, cache: Path) -> dict:
    """The stored measurements against the planner as it is now. The planner reads config.json
    only, so a random shape's folder from the GPU machine is stood in for by its config alone."""
    import transformers  # only here: the parent of a measuring run never needs it

    def local(folder: str) -> str:
        if Path(folder, "config.json").is_file():
            return folder
        kind = Path(folder).name.removesuffix("-random")
        config_class, fields = SHAPES[kind]
        stand_in = cache / f"{kind}-config"
        getattr(transformers, config_class)(**fields, pad_token_id=0, eos_token_id=1, bos_token_id=2).save_pretrained(stand_in)
        return str(stand_in)

    records = [dict(report["device"], kind="device")] + report["loads"] + report["points"]
    gpu = grid_gpu(records)
    for r in records:
        fp16 = r.get("group", "").endswith("fp16")
        if r["kind"] == "point" and r["status"] != "skipped":
            r.update(predict(r, folder=local(r["folder"]), fp16=fp16, cap=T4_CAP_GIB if fp16 else None, gpu=gpu))
        elif r["kind"] == "load":
            r.update(predict_load(r, folder=local(r["folder"]), fp16=fp16, gpu=gpu))
    return build_report(records, settings=report["settings"])


def main_parent(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot or args.repredict:
        report = json.loads((out / "plan_grid.json").read_text())
        if args.repredict:
            report = repredict(report, cache=Path(args.cache).expanduser())
        write_outputs(report, out=out)
        print(markdown(report))
        return 0
    start = time.time()
    deadline = start + args.budget
    work = Path(tempfile.mkdtemp(prefix="plan_grid_"))
    results = work / "points.jsonl"
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    with open(out / "plan_grid.log", "a") as logfile:
        points = QUICK if args.quick else POINTS
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        groups = []
        for kind in models:
            if kind == "2b" and args.model_2b:
                folder, label = args.model_2b, "2b shape"
            else:
                folder, label = model_folder(kind, spec=args.model_270m if kind == "270m" else "random", cache=cache, logfile=logfile)
            share = 0.5 if kind == "2b" else 0.55
            groups.append((f"{kind}-bf16", folder, label, False, None, {b: points for b in (4, 8, 16)}, share))
            if kind == "2b" and not args.no_t4:
                t4 = {b: p[:1] for b, p in T4_POINTS.items()} if args.quick else T4_POINTS
                groups.append(("2b-fp16", folder, label, True, T4_CAP_GIB, t4, None))
        groups.sort(key=lambda g: g[0] == "2b-fp16")  # the T4 emulation last: what time is left
        folders = {g[0]: g[1] for g in groups}
        for name, folder, label, fp16, cap, pts, share in groups:
            share = share if share and name != groups[-1][0] else 1.0
            left = deadline - time.time()
            if left < 30:
                log(f"{name}: no time left")
                continue
            job = {"group": name, "folder": folder, "label": label, "fp16": fp16, "cap_gib": cap, "points": pts,
                   "deadline": time.time() + share * left, "results": str(results), "work": str(work / name)}
            job_file = work / f"{name}.json"
            job_file.write_text(json.dumps(job))
            log(f"{name}: {sum(len(v) for v in pts.values())} points, {share * left:.0f} s")
            try:
                subprocess.run([sys.executable, __file__, "--worker", str(job_file)], stdout=logfile, stderr=logfile,
                               env=env, timeout=share * left + 90)
            except subprocess.TimeoutExpired:
                log(f"{name}: killed at its time limit")
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    groups_by_name = {g[0]: g for g in groups}
    gpu = grid_gpu(records)
    for r in records:
        _, folder, _, fp16, cap, _, _ = groups_by_name[r["group"]]
        if r["kind"] == "point" and r["status"] != "skipped":
            r.update(predict(r, folder=folder, fp16=fp16, cap=cap, gpu=gpu))
        elif r["kind"] == "load":
            r.update(predict_load(r, folder=folder, fp16=fp16, gpu=gpu))
    report = build_report(records, settings={"budget_s": args.budget, "quick": args.quick, "seconds": time.time() - start,
                                    "models": folders})
    write_outputs(report, out=out)
    print(markdown(report))
    return 0 if any(r["status"] == "ok" for r in report["points"]) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/plan-grid", help="folder for plan_grid.json/.md/.png/.log")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole grid, model building included")
    p.add_argument("--quick", action="store_true", help="three points per model and bit width")
    p.add_argument("--replot", action="store_true", help="only rewrite the table and plot from <out>/plan_grid.json")
    p.add_argument("--repredict", action="store_true", help="the measurements in <out>/plan_grid.json against the planner as it is now")
    p.add_argument("--cache", default="~/.cache/gemma_qlora_plan_grid", help="where the random-weight models are built once")
    p.add_argument("--model-2b", default=None, help="an existing Gemma-2B-shaped folder (default: build the random shape)")
    p.add_argument("--model-270m", default="embedded", help="embedded (real Gemma 3 270M), a folder, or random")
    p.add_argument("--models", default="2b,270m", help="comma list of 2b, 270m (tiny: a CPU check of this script)")
    p.add_argument("--no-t4", action="store_true", help="skip the fp16 points under a 15 GiB cap")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--build", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build:
        build_random(args.build, folder=Path(args.folder))
        return 0
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        job["points"] = {int(b): [tuple(x) for x in v] for b, v in job["points"].items()}
        run_worker(job)
        return 0
    return main_parent(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
