"""Record memory while each phase of a run (load, train, generate, ...) happens.

On a GPU a background thread samples NVML's used device memory (what `nvidia-smi` and
Colab's panel show, so it includes the CUDA context and the allocator's cache), and each
phase also keeps the torch allocator's peak allocated and reserved bytes. With no GPU it
samples this process's resident memory (RSS) instead, and says so in `kind`: it never
writes a GPU number it did not read.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import psutil
import torch

GIB = 1024**3


@dataclass
class Phase:
    name: str
    start_s: float
    end_s: float | None = None
    peak_allocated_gib: float | None = None  # torch allocator, GPU only
    peak_reserved_gib: float | None = None
    end_allocated_gib: float | None = None
    peak_sampled_gib: float | None = None  # highest NVML (or RSS) sample during the phase
    end_sampled_gib: float | None = None  # the sample taken as the phase ended


@dataclass
class MemoryRecord:
    kind: str  # "nvml" (GPU memory used) or "rss" (process resident memory, CPU run)
    label: str  # axis label for plots
    device_name: str
    total_gib: float | None
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, GiB)
    phases: list[Phase] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def peak(self, phase: str | None = None) -> dict[str, float | None]:
        chosen = [p for p in self.phases if phase is None or p.name == phase]
        def top(attr):
            values = [getattr(p, attr) for p in chosen if getattr(p, attr) is not None]
            return max(values) if values else None
        return {
            "sampled_gib": top("peak_sampled_gib"),
            "allocated_gib": top("peak_allocated_gib"),
            "reserved_gib": top("peak_reserved_gib"),
        }


class MemoryRecorder:
    """`with recorder.phase("train"): ...` samples every `interval_s` in a background thread."""

    def __init__(self, interval_s: float = 0.1, device_index: int | None = None):
        self.interval_s = interval_s
        self.cuda = torch.cuda.is_available()
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if self.cuda:
            import pynvml  # from nvidia-ml-py

            pynvml.nvmlInit()
            index = torch.cuda.current_device() if device_index is None else device_index
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(_physical_index(index))
            info = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
            self.record = MemoryRecord("nvml", "GPU memory used (NVML), GiB", torch.cuda.get_device_name(index), info.total / GIB)
        else:
            self._process = psutil.Process(os.getpid())
            self.record = MemoryRecord("rss", "process RSS (CPU run, no GPU), GiB", "cpu", psutil.virtual_memory().total / GIB)
        self._thread = threading.Thread(target=self._run, daemon=True, name="memory-recorder")
        self._thread.start()

    def read_gib(self) -> float:
        if self.cuda:
            return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / GIB
        return self._process.memory_info().rss / GIB

    def _sample(self) -> float:
        value = self.read_gib()
        now = time.perf_counter() - self._t0
        with self._lock:
            self.record.samples.append((round(now, 3), round(value, 4)))
            for phase in self.record.phases:
                if phase.end_s is None:
                    phase.peak_sampled_gib = max(phase.peak_sampled_gib or 0.0, value)
        return value

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        current = Phase(name, round(time.perf_counter() - self._t0, 3))
        with self._lock:
            self.record.phases.append(current)
        self._sample()
        try:
            yield current
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                current.peak_allocated_gib = torch.cuda.max_memory_allocated() / GIB
                current.peak_reserved_gib = torch.cuda.max_memory_reserved() / GIB
                current.end_allocated_gib = torch.cuda.memory_allocated() / GIB
            current.end_sampled_gib = self._sample()
            current.end_s = round(time.perf_counter() - self._t0, 3)

    def stop(self) -> MemoryRecord:
        self._stop.set()
        self._thread.join(timeout=2)
        return self.record


def _physical_index(index: int) -> int:
    """NVML counts all GPUs; torch counts those in CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if index < len(ids) and ids[index].isdigit():
            return int(ids[index])
    return index
