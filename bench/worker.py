"""One arm, in its own process: imports, load, set-up, training, and its figures as JSON.

The runner may start this process while the arm before it still trains: the process then
imports the libraries it can import without touching the GPU, and waits for a line on its
standard input before it creates a CUDA context (and before Unsloth, which queries the GPU as
it imports). Its import time is counted without the wait.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from pathlib import Path

from arms import ARMS, BUILDERS, describe

GIB = 1024**3


def import_libraries(family: str) -> None:
    """What can be imported before the GPU is ours: all of it but for Unsloth, which must come
    before transformers and TRL (it patches them as they import) and which queries the GPU."""
    import torch  # noqa: F401

    if family == "unsloth":
        return
    import bitsandbytes  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    if family == "pkg":
        import gemma_qlora.trainer  # noqa: F401  (and through it the rest of the package)


def steady_speed(steps: list[tuple[int, float, int]], warmup: int, last: int | None = None,
                 diagnostics: dict[int, dict] | None = None) -> dict:
    """Speed over the timed steps. `steps` holds (optimizer step, time, non-pad tokens seen so far)
    at the end of every step; the clock starts at the end of step `warmup`, so kernel autotuning,
    compilation, allocator growth and the optimizer's first allocations stay out of the figure, and
    stops at the end of step `last` (the profiled steps after it run slower).

    Two figures, because they answer different questions: the window's tokens/s (all tokens over
    all the time, slow steps included: what a run of this length feels) and the median step's
    (tokens per step over the median step time: the steady pace, which a slow step every few
    dozen steps does not move). The slowest steps are listed with their step numbers and what
    `diagnostics` (StepDiagnostics) saw in them, so that a gap between the two figures is explained."""
    timed = [step for step in steps if step[0] >= warmup and (last is None or step[0] <= last)]
    if len(timed) < 2:
        return {"tokens_per_second": None, "tokens_per_second_median": None, "step_seconds_median": None,
                "step_seconds_p90": None, "timed_steps": 0, "timed_tokens": 0, "slowest_steps": [], "step_seconds": []}
    (_, t0, n0), (_, t1, n1) = timed[0], timed[-1]
    per_step = [{"step": b[0], "seconds": b[1] - a[1], "tokens": b[2] - a[2]} for a, b in zip(timed, timed[1:])]
    for row in per_step:
        row.update((diagnostics or {}).get(row["step"], {}))
    seconds = sorted(row["seconds"] for row in per_step)
    median = statistics.median(seconds)
    p90 = seconds[min(len(seconds) - 1, round(0.9 * (len(seconds) - 1)))]
    slowest = sorted(per_step, key=lambda row: -row["seconds"])[:5]
    return {
        "tokens_per_second": (n1 - n0) / (t1 - t0),
        "tokens_per_second_median": statistics.median(row["tokens"] for row in per_step) / median,
        "step_seconds_median": median,
        "step_seconds_p90": p90,
        "timed_steps": len(timed) - 1,
        "timed_tokens": n1 - n0,
        # a step is "slow" at twice the median: these are what the window's figure pays beyond the median's
        "slow_steps": sum(1 for s in seconds if s > 2 * median),
        "slow_steps_extra_seconds": sum(s - median for s in seconds if s > 2 * median),
        "slowest_steps": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in slowest],
        "step_seconds": [round(row["seconds"], 4) for row in per_step],
    }


def make_diagnostics_callback():
    """A TrainerCallback that notes, for every optimizer step, what can make one step slower than
    the rest: the seconds Python's garbage collector ran, torch.compile frames compiled (a new
    shape recompiles), the epoch the step ended in (a new epoch rebuilds the data iterator; the
    last batch of one may be short), the batch's shape, and whether the step logged. Same for
    every arm, so that the slowest steps of each can be told apart."""
    import gc

    from transformers import TrainerCallback

    class StepDiagnostics(TrainerCallback):
        def __init__(self):
            self.by_step: dict[int, dict] = {}
            self.gc_seconds, self._gc_start = 0.0, None
            gc.callbacks.append(self._gc)

        def _gc(self, phase, info):
            if phase == "start":
                self._gc_start = time.perf_counter()
            elif self._gc_start is not None:
                self.gc_seconds += time.perf_counter() - self._gc_start
                self._gc_start = None

        @staticmethod
        def _frames() -> int:
            try:
                from torch._dynamo.utils import counters

                return int(sum(counters["frames"].values()))
            except Exception:
                return 0

        def on_step_begin(self, args, state, control, **kwargs):
            self._begin = (self.gc_seconds, self._frames())

        def on_step_end(self, args, state, control, **kwargs):
            gc0, frames0 = getattr(self, "_begin", (self.gc_seconds, self._frames()))
            row = {"epoch": round(state.epoch or 0.0, 4), "gc_seconds": round(self.gc_seconds - gc0, 4),
                   "compiled_frames": self._frames() - frames0}
            if args.logging_steps and state.global_step % args.logging_steps == 0:
                row["logged"] = True
            self.by_step[state.global_step] = row

    return StepDiagnostics()


def make_profiler_callback(first_step: int, steps: int, path: Path):
    """A TrainerCallback that profiles optimizer steps first_step+1 .. first_step+steps and writes
    the GPU's busy share of them and the top kernels to `path`."""
    import torch
    from transformers import TrainerCallback

    class ProfileSteps(TrainerCallback):
        def __init__(self):
            self.profiler, self.start = None, None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first_step and self.profiler is None:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is None or state.global_step != first_step + steps:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.start
            self.profiler.__exit__(None, None, None)
            events = self.profiler.key_averages()
            device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
            head = f"{steps} profiled steps: wall {wall:.3f} s"
            if torch.cuda.is_available():
                head += f", GPU kernels {device_us / 1e6:.3f} s (busy {100 * device_us / 1e6 / wall:.0f} %)"
            sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            path.write_text(head + "\n\n" + events.table(sort_by=sort, row_limit=40, max_name_column_width=90))
            self.profiler = None

    return ProfileSteps()


def versions(precision) -> dict:
    """The package's record of library versions, plus Unsloth's where this arm has it (its arms
    run on the transformers and TRL that Unsloth allows, which may differ from the others')."""
    from importlib.metadata import PackageNotFoundError, version

    from gemma_qlora.metrics import environment

    found = environment(precision)["versions"]
    for lib in ("unsloth", "unsloth_zoo"):
        try:
            found[lib] = version(lib)
        except PackageNotFoundError:
            pass
    return found


def measure_arm(arm: str, s, result: dict, imported_s: float) -> None:
    """Import, load, set up and train one arm, filling `result` as figures become known (so a
    failure halfway still reports what was measured before it)."""
    t0 = time.perf_counter()
    spec = ARMS[arm]
    if spec.family == "unsloth":
        try:
            import unsloth  # noqa: F401  (first: it patches transformers and TRL as they import)
        except Exception as error:  # unsloth raises plain Exceptions without a supported GPU
            result.update(status="skipped", error=f"import unsloth failed: {type(error).__name__}: {' '.join(str(error).split())[:300]}")
            return
    import_libraries(spec.family)
    import torch
    import transformers

    from gemma_qlora.fortunes import load_fortunes
    from gemma_qlora.memory import MemoryRecorder
    from gemma_qlora.metrics import StepTimer
    from gemma_qlora.quant import cap_gpu_memory, detect_precision

    result["import_seconds"] = imported_s + time.perf_counter() - t0
    precision = detect_precision(force_fp16=s.fp16)
    transformers.set_seed(s.seed)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        result.update(gpu=props.name, gpu_total_gib=props.total_memory / GIB, compute_capability=f"{props.major}.{props.minor}",
                      cuda=torch.version.cuda)
        if s.gpu_memory_gib:
            cap_gpu_memory(s.gpu_memory_gib)
    result["versions"] = versions(precision)
    recorder, timer = MemoryRecorder(), StepTimer()  # NVML sampled every 0.1 s in a thread (RSS on CPU)
    gpu = recorder.record.kind == "nvml"
    records = load_fortunes()

    t0 = time.perf_counter()
    trainer = BUILDERS[spec.family](arm, s, records, recorder, timer)
    diagnostics = make_diagnostics_callback()
    trainer.add_callback(diagnostics)
    if s.profile:
        trainer.add_callback(make_profiler_callback(s.warmup + s.steps, s.profile, Path(s.out) / "arms" / f"{arm}.profile.txt"))
    load = recorder.record.phases[0]
    result["load_seconds"] = load.end_s - load.start_s
    result["setup_seconds"] = time.perf_counter() - t0 - result["load_seconds"]
    result["nvml_after_load_gib"] = load.end_sampled_gib if gpu else None
    result["allocated_after_load_gib"] = load.end_allocated_gib

    args, model = trainer.args, trainer.model
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    result.update(
        describe(arm, trainer),
        batch_size=args.per_device_train_batch_size,
        grad_accum=args.gradient_accumulation_steps,
        max_length=args.max_length,
        packing=args.packing,
        optim=getattr(args.optim, "value", str(args.optim)),
        precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        attention=getattr(model.config, "_attn_implementation", None),
        trainable_parameters=model.get_nb_trainable_parameters()[0],
        epoch_examples=len(records),
        epoch_sequences=len(lengths),
        # a wrapped row holds only the tokens of its 512 (the rest carries over to the next row)
        epoch_tokens=sum(lengths),
    )

    train_start = time.perf_counter()
    try:
        with recorder.phase("train"):
            trainer.train()
    finally:  # also after an out-of-memory error: the peak that hit the wall
        train = recorder.record.phases[-1]
        result.update(
            allocated_peak_gib=torch.cuda.max_memory_allocated() / GIB if gpu else None,
            reserved_peak_gib=torch.cuda.max_memory_reserved() / GIB if gpu else None,
            nvml_peak_gib=train.peak_sampled_gib if gpu else None,
            rss_peak_gib=None if gpu else train.peak_sampled_gib,
        )
        recorder.stop()
    result["train_seconds"] = train.end_s - train.start_s
    # the warm-up steps hold the one-off costs (compilation, autotuning, first allocations)
    result["warmup_seconds"] = next((t - train_start for step, t, _ in timer.steps if step == s.warmup), None)
    result.update(steady_speed(timer.steps, s.warmup, last=s.warmup + s.steps, diagnostics=diagnostics.by_step))
    if result.get("tokens_per_second"):
        train_rows = len(trainer.train_dataset)
        result["steps_per_epoch"] = -(-train_rows // (args.per_device_train_batch_size * args.gradient_accumulation_steps))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] <= s.warmup + s.steps]
    result["losses"] = losses
    result["final_loss"] = statistics.fmean(losses[-5:]) if losses else None
    if result["tokens_per_second"]:
        result["epoch_seconds"] = result["epoch_tokens"] / result["tokens_per_second"]


def main_worker(s, process_start: float) -> int:
    """Run the arm `s.worker`; with `s.wait`, first import what is safe and wait for the go line."""
    arm = s.worker
    result = {"arm": arm, "bits": ARMS[arm].bits, "family": ARMS[arm].family, "what": ARMS[arm].what, "status": "ok"}
    code = 0
    try:
        import_libraries(ARMS[arm].family)
        imported_s = time.perf_counter() - process_start
        if s.wait and sys.stdin.readline().strip() != "go":
            return 3  # the runner went away before this arm's turn
        measure_arm(arm, s, result, imported_s)
    except Exception as error:
        traceback.print_exc()
        oom = type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()
        message = " ".join(str(error).split())[:500]  # one line: it ends up in a Markdown list
        result.update(status="oom" if oom else "failed", error=f"{type(error).__name__}: {message}")
        code = 1
    path = Path(s.out) / "arms" / f"{arm}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return code
