"""The parent process: the model folder, one process per arm, the report after each arm.

The parent never touches CUDA. Each arm runs `bench.py --worker ARM` in a fresh process, one
after the other, so that no arm inherits another's CUDA context, allocator cache or library
patches. While an arm runs, the next arm's process is already started and imports its libraries
(CPU work only: it waits for the go line before it creates a CUDA context), which hides about 15 s
of imports per arm; --no-prestart turns that off, and so does --cpus, so that a pinned arm has its
CPUs to itself.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from importlib.util import find_spec
from pathlib import Path

from arms import ARMS
from report import fmt, save_plots, write_report
from shapes import log, prepare_model, read_checkpoint

BENCH = Path(__file__).resolve().parent / "bench.py"
REPO = BENCH.parents[1]
GIB = 1024**3


def nvml_used_gib() -> float | None:
    """GPU memory in use before an arm starts (other processes, leftovers), read through NVML
    so that the parent never creates a CUDA context of its own. None without a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(first) if first.isdigit() else 0)
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / GIB
    except Exception:  # no driver, no GPU, no nvidia-ml-py
        return None


def unsloth_missing(s) -> str | None:
    """Why the Unsloth arms cannot run here, or None."""
    if s.unsloth_path:
        if not any((Path(p) / "unsloth" / "__init__.py").is_file() for p in s.unsloth_path.split(os.pathsep)):
            return f"unsloth is not in --unsloth-path {s.unsloth_path}"
        return None
    return None if find_spec("unsloth") else "unsloth is not installed (or give --unsloth-path)"


class Worker:
    """One arm's process: started early (imports), told to go, waited for, or killed with its children."""

    def __init__(self, arm: str, s, model_dir: str, random_weights: bool):
        self.arm, self.s = arm, s
        arms_dir = Path(s.out) / "arms"
        self.result_file, self.log_file = arms_dir / f"{arm}.json", arms_dir / f"{arm}.log"
        self.result_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(BENCH), "--worker", arm, "--wait", "--model-dir", model_dir, "--out", s.out,
               "--warmup", str(s.warmup), "--steps", str(s.steps), "--seed", str(s.seed), "--profile", str(s.profile)]
        if s.fp16:
            cmd.append("--fp16")
        if s.gpu_memory_gib:
            cmd += ["--gpu-memory-gib", str(s.gpu_memory_gib)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        if random_weights:
            env["HF_HUB_OFFLINE"] = "1"  # everything is local: no Hub calls in the timings
        if ARMS[arm].family == "unsloth":
            env.update(UNSLOTH_DISABLE_STATISTICS="1", UNSLOTH_COMPILE_LOCATION=str(Path(s.cache).expanduser() / "unsloth_compiled_cache"))
            if s.unsloth_path:  # its own transformers and TRL, not the ones the other arms run on
                env["PYTHONPATH"] = os.pathsep.join([s.unsloth_path, str(REPO)])
        cpus = [int(c) for c in s.cpus.split(",")] if s.cpus else None
        if cpus:
            env["OMP_NUM_THREADS"] = str(len(cpus))
        self.log_stream = open(self.log_file, "w")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=self.log_stream, stderr=subprocess.STDOUT, env=env, text=True,
            start_new_session=True,  # its own process group: a timeout ends its compile workers too
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        self.nvml_before, self.started = None, None

    def go(self) -> None:
        self.nvml_before = nvml_used_gib()
        self.started = time.perf_counter()
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.close()
        except BrokenPipeError:  # it died while importing: its log says why
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.log_stream.close()

    def finish(self) -> dict:
        """Wait for the arm (at most --timeout seconds after its go) and read its result."""
        try:
            rc = self.proc.wait(timeout=self.s.timeout)
        except subprocess.TimeoutExpired:
            rc = None
        self.kill()
        seconds = time.perf_counter() - self.started
        arm = self.arm
        result = (json.loads(self.result_file.read_text()) if self.result_file.is_file()
                  else {"arm": arm, "bits": ARMS[arm].bits, "family": ARMS[arm].family, "what": ARMS[arm].what, "status": "failed"})
        if rc is None:
            result.update(status="timeout", error=f"killed after --timeout {self.s.timeout} s")
        elif rc != 0 and result["status"] == "ok":
            result["status"] = "failed"
        if result["status"] == "failed" and not result.get("error"):
            result["error"] = " | ".join(self.log_file.read_text(errors="replace").strip().splitlines()[-3:])
        result.update(process_seconds=seconds, nvml_before_gib=self.nvml_before, log=str(self.log_file))
        return result


def skipped(arm: str, why: str) -> dict:
    return {"arm": arm, "bits": ARMS[arm].bits, "family": ARMS[arm].family, "what": ARMS[arm].what, "status": "skipped", "error": why}


def main_parent(s) -> int:
    """Every arm in turn; exit status 1 if an arm crashed or timed out (running out of memory is a result)."""
    out = Path(s.out)
    (out / "arms").mkdir(parents=True, exist_ok=True)
    # The libraries are imported once, unmeasured, for the same reason as read_checkpoint; in a
    # separate process, so that this one never creates a CUDA context on the GPU being measured.
    warm_imports = subprocess.Popen([sys.executable, "-c", "import torch, transformers, peft, trl, bitsandbytes, gemma_qlora.trainer"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model_dir, model_info = prepare_model(s.shape, cache=s.cache, seed=s.seed)
    read_checkpoint(model_dir)
    warm_imports.wait()
    report = {"settings": asdict(s), "environment": {"python": platform.python_version(), "platform": platform.platform()},
              "model": model_info, "arms": []}
    arms = [a.strip() for a in s.arms.split(",") if a.strip()]
    no_unsloth = unsloth_missing(s) if any(ARMS[a].family == "unsloth" for a in arms) else None
    runnable = [a for a in arms if not (ARMS[a].family == "unsloth" and no_unsloth)]
    start = lambda arm: Worker(arm, s, model_dir, model_info["random_weights"])  # noqa: E731
    prestart = s.prestart and not s.cpus
    # a SIGTERM (the shell's `timeout`) ends the run like Ctrl-C: children killed, report kept
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    current = upcoming = None
    try:
        for i, arm in enumerate(arms, 1):
            if arm not in runnable:
                result = skipped(arm, no_unsloth)
            else:
                current = upcoming if upcoming and upcoming.arm == arm else start(arm)
                upcoming = None
                log(f"[{i}/{len(arms)}] {arm} ...")
                current.go()
                following = [a for a in arms[i:] if a in runnable]
                if prestart and following:
                    upcoming = start(following[0])
                result = current.finish()
                current = None
            report["arms"].append(result)
            write_report(report, out)
            if result["status"] == "ok":
                log(f"[{i}/{len(arms)}] {arm}: {result['tokens_per_second']:,.0f} tokens/s (window), "
                    f"{result.get('tokens_per_second_median') or 0:,.0f} (median step), allocator peak "
                    f"{fmt(result.get('allocated_peak_gib'))} GiB, {result['process_seconds']:.0f} s")
            else:
                where = f" (log: {result['log']})" if result.get("log") else ""
                log(f"[{i}/{len(arms)}] {arm}: {result['status']}: {result.get('error', '')}{where}")
    finally:
        for worker in (current, upcoming):
            if worker:
                worker.kill()
    print(write_report(report, out))
    save_plots(report, out)
    log(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 1 if any(a["status"] in ("failed", "timeout") for a in report["arms"]) else 0
