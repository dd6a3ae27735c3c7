"""Make accelerate apply FSDP on a CPU/gloo job: its AcceleratorState only turns FSDP on for GPU-like
distributed types (MULTI_GPU, ...), never for MULTI_CPU. We flip it after init, with the plugin that
accelerate built from the FSDP_* env vars (as `accelerate launch --config_file fsdp_qlora.yaml` sets)."""
import os
# FSDP1 + sync_module_states: the plugin asks for a GPU to build param_init_fn; build it with sync off, turn it on below
_SYNC = os.environ.get("FSDP_SYNC_MODULE_STATES") == "true" and os.environ.get("FSDP_VERSION") == "1"
if _SYNC:
    os.environ["FSDP_SYNC_MODULE_STATES"] = "false"
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_orig_init = AcceleratorState.__init__
def _init(self, *a, fsdp_plugin=None, **kw):
    _orig_init(self, *a, fsdp_plugin=fsdp_plugin, **kw)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        plugin = fsdp_plugin or FullyShardedDataParallelPlugin()
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)
        if _SYNC:
            plugin.sync_module_states = True
            plugin.param_init_fn = lambda x: x.to_empty(device="cpu", recurse=False)
        import torch
        from accelerate.state import PartialState
        PartialState._shared_state["device"] = torch.device("cpu")  # FSDP1 rejects device_id cpu:0 vs compute device cpu
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        if os.environ.get("RANK") == "0":
            print(f"[force_fsdp] distributed_type -> FSDP, fsdp_version={plugin.fsdp_version}", flush=True)
AcceleratorState.__init__ = _init
