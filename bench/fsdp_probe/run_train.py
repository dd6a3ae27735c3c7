"""The package's real train() (Trainer + accelerate FSDP) on CPU/gloo, with per-phase tensor accounting.
FSDP_VERSION=1|2 plus the yaml's env: see run_train.sh"""
import gc, os, sys, collections
from contextlib import contextmanager
from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[2])); sys.path.insert(0, str(Path(__file__).parent))
import force_fsdp  # noqa
import torch
from torch.distributed.tensor import DTensor
import gemma_qlora.train as T
from gemma_qlora.quant import Precision
from gemma_qlora.config import TrainConfig

T.detect_precision = lambda **kw: Precision("cpu", torch.bfloat16, bf16=True, fp16=False)  # the GPU run's dtypes
MB = 1 / 2**20
HOLD = {}

def live_bytes():
    gc.collect(); seen = {}
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor):
                t = o._local_tensor if isinstance(o, DTensor) else o
                if t.device.type == "meta": continue
                s = t.untyped_storage()
                if s.nbytes(): seen.setdefault(s.data_ptr(), (s.nbytes(), o))
        except Exception: pass
    return seen

def model_bytes(model):
    seen = {}
    for p in list(model.parameters()) + list(model.buffers()):
        t = p._local_tensor if isinstance(p, DTensor) else p
        s = t.untyped_storage()
        if s.nbytes(): seen[s.data_ptr()] = s.nbytes()
    return seen

class Recorder(T.MemoryRecorder):
    @contextmanager
    def phase(self, name):
        with super().phase(name):
            yield
        live = live_bytes()
        tr = HOLD.get("trainer"); m = tr.model if tr else None
        mb = model_bytes(m) if m is not None else {}
        extra = {p: v for p, v in live.items() if p not in mb}
        big = sorted(extra.values(), key=lambda v: -v[0])[:4]
        kinds = collections.Counter(type(p).__name__ for p in m.parameters()) if m is not None else None
        print(f"[rank{os.environ['RANK']}] end of {name}: live tensors {sum(v[0] for v in live.values())*MB:.2f} MiB; "
              f"trainer.model params+buffers (local) {sum(mb.values())*MB:.2f} MiB {dict(kinds) if kinds else ''}; "
              f"biggest others: {[(round(n*MB,2), type(t).__name__, tuple(t.shape), str(t.dtype)) for n, t in big]}", flush=True)
T.MemoryRecorder = Recorder
import transformers.trainer as _TT
_upd = _TT.update_fsdp_plugin_peft
def _upd2(model, acc):
    _upd(model, acc)
    if os.environ["RANK"] == "0":
        print("[probe] update_fsdp_plugin_peft ran: auto_wrap_policy =", acc.state.fsdp_plugin.auto_wrap_policy, flush=True)
_TT.update_fsdp_plugin_peft = _upd2
_orig_phase = Recorder.phase
@contextmanager
def phase2(self, name):
    with _orig_phase(self, name):
        yield
    tr = HOLD.get("trainer")
    if tr is not None and name in ("train", "eval_after") and os.environ.get("FSDP_VERSION") == "2":
        from torch.distributed.fsdp import FSDPModule
        m = tr.model
        if os.environ["RANK"] != "0": return
        print("  non-DTensor params:", [n for n, p in m.named_parameters() if not isinstance(p, DTensor)])
        for mod in m.modules():
            if isinstance(mod, FSDPModule):
                st = mod._get_fsdp_state()
                for g in ([st._fsdp_param_group] if getattr(st, "_fsdp_param_group", None) else []):
                    mods = [type(x).__name__ for x in g.modules]
                    if len(mods) > 1 or type(mod).__name__ in ("PeftModelForCausalLM",):
                        print(f"  group modules={mods} is_sharded={g.is_sharded} is_unsharded={g.is_unsharded} reshard_after_forward={g.post_forward_mesh_info is not None} params={[fp._param_fqn for fp in g.fsdp_params]}")
        if name == "eval_after" and os.environ.get("RESHARD_DEMO"):
            for mod in m.modules():
                if isinstance(mod, FSDPModule): mod.reshard()
            print("  after explicit reshard(): non-DTensor params:", [n for n, p in m.named_parameters() if not isinstance(p, DTensor)], f"live {sum(v[0] for v in live_bytes().values())*MB:.2f} MiB")
Recorder.phase = phase2
_mk = T.make_trainer
from transformers import TrainerCallback
class StepProbe(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        live = live_bytes()
        print(f"[rank{os.environ['RANK']}] after optimizer step {state.global_step}: live tensors {sum(v[0] for v in live.values())*MB:.2f} MiB", flush=True)
        if os.environ.get("FSDP_VERSION") == "1" and os.environ["RANK"] == "0" and state.global_step == 1:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            m = HOLD["trainer"].model_wrapped
            for f in FSDP.fsdp_modules(m):
                h = f._handle
                if h is None: continue
                fp = h.flat_param
                print(f"   FSDP unit {type(f.module).__name__:28s} flat_param storage {fp.untyped_storage().nbytes()*MB:7.3f} MiB local_shard {fp._local_shard.untyped_storage().nbytes()*MB:7.3f} MiB "
                      f"full_prec_shard {getattr(fp, '_full_prec_shard', None) is not None and fp._full_prec_shard.untyped_storage().nbytes()*MB} "
                      f"mp_shard {getattr(fp, '_mp_shard', None) is not None and fp._mp_shard.untyped_storage().nbytes()*MB} "
                      f"full_param_padded {fp._full_param_padded.untyped_storage().nbytes()*MB if hasattr(fp, '_full_param_padded') else None} dtype {fp.dtype}", flush=True)
            big = sorted(live.values(), key=lambda v: -v[0])[:8]
            print("   biggest live:", [(round(n*MB,3), type(t).__name__, tuple(t.shape), str(t.dtype)) for n, t in big], flush=True)
    def on_evaluate(self, args, state, control, **kw):
        live = live_bytes()
        print(f"[rank{os.environ['RANK']}] after evaluate at step {state.global_step}: live tensors {sum(v[0] for v in live.values())*MB:.2f} MiB", flush=True)
class ReshardAfterEval(TrainerCallback):
    """Proposed fix: an evaluate() (forward only) leaves FSDP2 groups with reshard_after_forward=False
    (the tied embed/lm_head group and the root) unsharded; give their memory back."""
    def on_evaluate(self, args, state, control, model=None, **kw):
        from torch.distributed.fsdp import FSDPModule
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
class HeadProbe(TrainerCallback):
    """live tensors at the end of the last decoder layer's first training forward: what sits next to the head"""
    def on_train_begin(self, args, state, control, model=None, **kw):
        layers = [m for n, m in model.named_modules() if type(m).__name__.endswith("DecoderLayer")]
        def hook(mod, inp, out):
            if mod.training and not HOLD.get("head_done"):
                HOLD["head_done"] = True
                live = live_bytes()
                emb = [p for n, p in model.named_parameters() if "embed_tokens" in n][0]
                print(f"[rank{os.environ['RANK']}] in step 1 before the LM head: live tensors {sum(v[0] for v in live.values())*MB:.2f} MiB; embed weight {type(emb).__name__} {tuple(emb.shape)}", flush=True)
        layers[-1].register_forward_hook(hook)
def make_trainer(*a, **kw):
    kw["callbacks"] = list(kw.get("callbacks", [])) + [StepProbe(), HeadProbe()] + ([ReshardAfterEval()] if os.environ.get("FIX") else [])
    HOLD["trainer"] = tr = _mk(*a, **kw); return tr
T.make_trainer = make_trainer

cfg = TrainConfig(model="/tmp/fsdp_probe/tiny_gemma", data="embedded", bits=4, quant_storage="bfloat16", steps=int(os.environ.get("STEPS", 3)),
                  batch_size=2, max_seq_length=128, eval_size=8, eval_steps=1000, max_train_examples=64, logging_steps=1,
                  max_new_tokens=4, author_eval=0, output_dir="/tmp/fsdp_probe/runs", run_name=f"fsdp{os.environ.get('FSDP_VERSION','-ddp')}",
                  optim="adamw_torch")
T.train(cfg)
