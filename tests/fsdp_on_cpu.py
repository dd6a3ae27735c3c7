"""Run `python -m gemma_qlora ...` under FSDP on CPU processes (gloo), for the tests.

accelerate applies FSDP only on accelerators: on CPU it keeps `MULTI_CPU` and ignores the
FSDP settings. This runner sets the environment `accelerate launch --config_file
gemma_qlora/fsdp_qlora.yaml` would set, then switches the state to FSDP after accelerate built
it, so the package's FSDP branch (no evaluation before training, the adapter gathered by the
Trainer) runs in CI. Start it with `torchrun --nproc_per_node 2 tests/fsdp_on_cpu.py train ...`.
"""

import os
import sys
from importlib.resources import files

from accelerate.commands.config.config_args import load_config_from_file
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

for key, value in load_config_from_file(str(files("gemma_qlora") / "fsdp_qlora.yaml")).fsdp_config.items():
    os.environ[key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
os.environ["ACCELERATE_USE_FSDP"] = "true"

_init = AcceleratorState.__init__


def _init_with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin or FullyShardedDataParallelPlugin()


AcceleratorState.__init__ = _init_with_fsdp

from gemma_qlora.cli import main  # noqa: E402  (after the patch)

sys.exit(main())
