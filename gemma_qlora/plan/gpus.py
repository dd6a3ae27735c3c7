"""The GPUs the planner knows, and how a device's name is matched to one of them.

A device is recognised by the model word of its name as the driver reports it ('Tesla T4',
'NVIDIA L4', 'NVIDIA A100-SXM4-80GB', 'NVIDIA H100 80GB HBM3'), compared whole: an L40S is not
an L4. Where a model comes in several memory sizes (the A100's 40 and 80 GB), the size in the
name picks the entry, else the memory the device reports. Any other card is planned from the
memory it reports, with its CUDA context estimated, and said to be outside the catalogue.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from gemma_qlora.errors import UserError

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    """A GPU as the planner sees it: total memory as the driver reports it, whether it computes
    in bf16, and the CUDA context NVML counts above the allocator (load, training)."""

    name: str
    total_gib: float
    bf16: bool = True
    context_gib: tuple[float, float] = (1.21, 1.40)
    measured: bool = False  # context measured on this kind of GPU (else estimated)
    workspace_mib: float = 32.0  # cuBLAS workspace per thread (torch: 32 MiB on Hopper, 8 MiB before)
    model: str = ""  # the model word of the device name ('a100'); empty for a GPU outside the catalogue
    nominal_gb: int = 0  # the memory in its product name (A100 40GB / 80GB), where there are several

    @property
    def catalogued(self) -> bool:
        return bool(self.model)


GPUS = {
    "t4": GPU("T4", 15.0, bf16=False, context_gib=(0.45, 0.60), workspace_mib=8.125, model="t4"),
    "l4": GPU("L4", 22.5, context_gib=(0.55, 0.75), workspace_mib=8.125, model="l4"),
    "a100-40gb": GPU("A100 40GB", 39.6, context_gib=(0.75, 0.95), workspace_mib=8.125, model="a100", nominal_gb=40),
    "a100-80gb": GPU("A100 80GB", 79.3, context_gib=(0.75, 0.95), workspace_mib=8.125, model="a100", nominal_gb=80),
    "h100": GPU("H100 80GB", 79.6, measured=False, model="h100"),
    "h200": GPU("H200", 139.8, measured=True, model="h200"),
}
VENDOR_WORDS = ("nvidia", "tesla")


def name_words(device_name: str) -> list[str]:
    """'NVIDIA A100-SXM4-80GB' -> ['a100', 'sxm4', '80gb']: the name without its vendor."""
    return [w for w in re.split(r"[\s\-_/]+", device_name.lower()) if w and w not in VENDOR_WORDS]


def match_gpu(device_name: str, *, total_gib: float | None = None) -> GPU | None:
    """The catalogue's entry for `device_name` (with `total_gib`, the memory the device reports,
    where it has one), or None for a card the planner does not know."""
    words = name_words(device_name)
    candidates = [g for g in GPUS.values() if words and g.model == words[0]]
    sizes = [int(m.group(1)) for w in words[1:] if (m := re.fullmatch(r"(\d+)gb", w))]
    if sizes and any(g.nominal_gb for g in candidates):
        candidates = [g for g in candidates if g.nominal_gb == sizes[0]]
    elif len(candidates) > 1 and total_gib:
        candidates = [min(candidates, key=lambda g: abs(g.total_gib - total_gib))]
    if len(candidates) != 1:
        return None
    return replace(candidates[0], total_gib=total_gib) if total_gib else candidates[0]


def parse_gpu(value: str | float | GPU | None) -> GPU | None:
    """A known name (t4, l4, a100-40gb, a100-80gb, h100, h200, or a device name such as
    'NVIDIA A100-SXM4-80GB') or a size in GiB."""
    if value is None or isinstance(value, GPU):
        return value
    text = str(value).strip().lower()
    if text in GPUS:
        return GPUS[text]
    try:
        gib = float(text.removesuffix("gib").removesuffix("gb"))
    except ValueError:
        known = match_gpu(text)
        if known:
            return known
        sizes = [key for key, g in GPUS.items() if name_words(text)[:1] == [g.model]]
        if sizes:
            raise UserError(f"--gpu {value!r} comes in several sizes: give one of {', '.join(sizes)}.") from None
        raise UserError(
            f"Unknown GPU {value!r}: the planner knows {', '.join(GPUS)}; for another card give its memory in GiB "
            f"instead (e.g. --gpu 24)."
        ) from None
    if not 1 <= gib <= 4096:
        raise UserError(f"--gpu {value!r}: a GPU's memory in GiB is between 1 and 4096.")
    return GPU(f"{gib:g} GiB GPU", gib)


def device_gpu(device_name: str, *, total_gib: float, major: int) -> GPU:
    """The GPU a device reports (name, memory, compute capability's major version): the
    catalogue's entry at the reported memory, else a card planned from its memory alone."""
    known = match_gpu(device_name, total_gib=total_gib)
    gpu = known or GPU(f"{device_name} (not in the planner's list)", total_gib, bf16=major >= 8)
    return replace(gpu, workspace_mib=32.0 if major >= 9 else 8.125)


def current_gpu(cap_gib: float | None = None) -> GPU:
    """The GPU this process sees (total memory, or `cap_gib` where the run caps it)."""
    import torch  # only here, where a device is asked about: planning from a config needs no torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    gpu = device_gpu(props.name, total_gib=props.total_memory / GIB, major=props.major)
    return replace(gpu, total_gib=min(gpu.total_gib, cap_gib)) if cap_gib else gpu


def gpu_in_use(cap_gib: float | None = None) -> GPU:
    """The GPU this process sees (capped as the run caps it); without one, a T4, the notebooks' GPU."""
    import torch  # only here, where a device is asked about: planning from a config needs no torch

    return current_gpu(cap_gib) if torch.cuda.is_available() else GPUS["t4"]
